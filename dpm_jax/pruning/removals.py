"""Removals: what selection does to a channel, and how every step lands.

- ``Hard``: zeroed at once and held at zero (the base methods' one-step removal).
- ``Soft``: the filter's weights are zeroed at once but free to train and regrow; every event
  selects afresh (SFP, He et al. 2018).
- ``SmoothPruning``: decays to zero over ``decay_steps`` optimizer steps while training
  continues (DPM's smooth pruning, "+SP").
- ``SelfRectifying``: smooth pruning that releases channels whose pruning looks like a
  mistake (DPM's self-rectifying, "+SR").
- ``Protective``: soft pruning whose zeroed channels are restored from a backup when their
  gradients pulse (PSAP's protective reconstruction).
- ``HalfSpace``: redundant channels pushed towards zero until OTOv2's half-space projection
  hands them to ``Hard``, ``SmoothPruning`` or ``SelfRectifying``.

``SmoothPruning`` and ``SelfRectifying`` take ``soft=True`` to run on top of soft pruning
(our reading of SFP + DPM): a selected channel decays to zero over ``decay_steps`` steps
instead of at once, is then free to regrow as a soft-pruned one, and the next event
selects afresh.

A step lands by rescaling each channel's producer slices (kernel output slice, bias,
normalisation scale and bias) after the inner optimizer's step ``x~ = x + u``: factor 0 holds
a channel at zero, factor 1 leaves it to the optimizer.

Example:

  >>> import numpy as np
  >>> from dpm_jax.pruning import removals
  >>> from dpm_jax.pruning.base import ACTIVE, DECAYING, PRUNED
  >>> status = np.array([ACTIVE, DECAYING, DECAYING, PRUNED], np.int8)
  >>> status, n, factor = removals.decay_factors(
  ...     status, decay_step=np.array([0, 0, 3, 0]), init_norm=np.full(4, 2.0),
  ...     norms_after=np.full(4, 2.0), decay_steps=4)
  >>> status.tolist(), n.tolist(), factor.tolist()   # 3/4 and 0/4 of L_init = 2
  ([0, 1, 2, 2], [0, 1, 4, 0], [1.0, 0.75, 0.0, 0.0])
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax import channels
from dpm_jax.pruning.base import (ACTIVE, DECAYING, PRUNED, PUSHED, SOFT, Context, Removal,
                                  State, Step, check_float, check_int)

__all__ = [
    "Hard",
    "Soft",
    "SmoothPruning",
    "SelfRectifying",
    "DecayState",
    "RectifyState",
    "decay_factors",
    "update_gradient_history",
    "release",
    "record_release",
    "Protective",
    "ProtectState",
    "HalfSpace",
]

_NEVER = np.iinfo(np.int32).min // 2
LOGICS = ("and", "or")


def _norms(ctx: Context, params: Any) -> jax.Array:
  return jnp.sqrt(channels.sq_norms(ctx.index, params))


def _land(ctx: Context, stepped: Any, factor: jax.Array) -> Any:
  return channels.scale(ctx.index, stepped, factor)


def _none(status: jax.Array) -> jax.Array:
  return jnp.zeros(status.shape, bool)


@dataclasses.dataclass(frozen=True)
class Hard(Removal):
  """Selected channels are zeroed at once and held at zero."""

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    del ctx, params
    return jnp.where(new, jnp.int8(PRUNED), status), state

  def land(self, ctx: Context, state: State, status: jax.Array, step: Step, stepped: Any,
           marked: jax.Array) -> tuple[Any, jax.Array, State, jax.Array]:
    del step, marked
    factor = (status != PRUNED).astype(jnp.float32)
    return _land(ctx, stepped, factor), status, state, _none(status)


ZEROS = ("weights", "producers")


@dataclasses.dataclass(frozen=True)
class Soft(Removal):
  """Selected channels are zeroed at their event, then train freely and may regrow; every
  event selects afresh from the current weights (SFP). ``finalize`` zeroes the last
  selection's producer slices, for surgery.

  Attributes:
    zero: ``producers`` zeroes every producer slice (kernel, bias, normalisation scale and
      bias): the channel outputs zero, and regrows by the momentum the optimizer still
      carries and the gradients that then reach it. ``weights`` zeroes only its kernel
      slices, as SFP's reference code does; after BatchNorm such a filter regrows within a
      step (its kernel's gradient is scaled by ``1/sqrt(eps)``, its batch variance being
      zero), so the network never trains without it: on MNIST-1D at 10% of the FLOPs SFP
      ended at 0.46 test accuracy with ``weights`` and 0.96 with ``producers`` (fine-tuned,
      seed 0). Our default is ``producers``.
  """

  zero: str = "producers"

  def __post_init__(self):
    if self.zero not in ZEROS:
      raise ValueError(f"Soft: zero={self.zero!r}; choose one of {', '.join(ZEROS)}.")

  def begin_event(self, ctx: Context, state: State,
                  status: jax.Array) -> tuple[jax.Array, State]:
    del ctx
    return jnp.full_like(status, ACTIVE), state  # every event selects afresh

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    del ctx, params
    return jnp.where(new, jnp.int8(SOFT), status), state

  def busy(self, ctx: Context, state: State, status: jax.Array) -> jax.Array:
    del ctx, state, status
    return jnp.asarray(False)  # only events zero channels

  def land(self, ctx: Context, state: State, status: jax.Array, step: Step, stepped: Any,
           marked: jax.Array) -> tuple[Any, jax.Array, State, jax.Array]:
    del step
    factor = (~marked).astype(jnp.float32)
    landed = channels.scale(ctx.index, stepped, factor,
                            min_ndim=2 if self.zero == "weights" else 0)
    return landed, status, state, _none(status)


# ----------------------------------------------------------------------------------------
# Smooth pruning and self-rectifying (DPM).


class DecayState(NamedTuple):
  """Smooth pruning's memory.

  Attributes:
    decay_step: ``[K]`` decay steps taken since selection (n).
    init_norm: ``[K]`` the channel's norm at selection (L_init).
  """

  decay_step: jax.Array
  init_norm: jax.Array


class RectifyState(NamedTuple):
  """Self-rectifying's memory: smooth pruning's, and the gradient history.

  Attributes:
    decay_step: ``[K]`` decay steps taken since selection (n).
    init_norm: ``[K]`` the channel's norm at selection (L_init).
    grad_norm_ema: ``[K]`` EMA of the channel's gradient norm.
    rate_ema: ``[K]`` EMA of a decaying channel's rate.
    released: ``[K]`` how many times the channel was released.
    released_at: ``[K]`` the step of its last release.
  """

  decay_step: jax.Array
  init_norm: jax.Array
  grad_norm_ema: jax.Array
  rate_ema: jax.Array
  released: jax.Array
  released_at: jax.Array


def decay_factors(status: jax.Array, decay_step: jax.Array, init_norm: jax.Array,
                  norms_after: jax.Array, decay_steps: int,
                  hold: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One smooth-pruning step: the factor that puts each channel on its decayed norm.

  Our reading of DPM's smooth pruning: after the optimizer's step gives ``x~``, a decaying
  channel takes its ``n += 1``-th step and is rescaled, keeping its direction, to
  ``||x|| = L_init * (N - n) / N``; at ``n = N`` it is zero and becomes ``PRUNED`` (held at
  zero) or, with ``hold=False``, ``SOFT`` (free to regrow). Pruned channels get factor 0, the
  others 1.

  Args:
    status: ``[K]`` channel status.
    decay_step: ``[K]`` decay steps taken (n).
    init_norm: ``[K]`` norms at selection (L_init).
    norms_after: ``[K]`` channel norms after the optimizer step (``||x~||``).
    decay_steps: N.
    hold: whether a channel that reaches zero is held there.

  Returns:
    The new status, the new decay steps and the ``[K]`` factors to multiply ``x~`` by.
  """
  decaying = status == DECAYING
  n = decay_step + decaying.astype(jnp.int32)
  target = init_norm * (decay_steps - n).astype(jnp.float32) / decay_steps
  safe = jnp.where(norms_after > 0, norms_after, 1.0)
  factor = jnp.where(decaying, jnp.where(norms_after > 0, target / safe, 0.0), 1.0)
  factor = jnp.where(status == PRUNED, 0.0, factor)
  done = jnp.int8(PRUNED if hold else SOFT)
  return jnp.where(decaying & (n >= decay_steps), done, status), n, factor


def update_gradient_history(status: jax.Array, decay_step: jax.Array,
                            grad_norm_ema: jax.Array, rate_ema: jax.Array,
                            grad_norms: jax.Array, rate: jax.Array,
                            ema_decay: float) -> tuple[jax.Array, jax.Array]:
  """EMAs of every channel's gradient norm and of decaying channels' rate.

  A channel's rate EMA starts from its first rate (at decay step 0).

  Returns:
    The new ``grad_norm_ema`` and ``rate_ema``.
  """
  decaying = status == DECAYING
  first = decaying & (decay_step == 0)
  new_rate = jnp.where(first, rate, ema_decay * rate_ema + (1 - ema_decay) * rate)
  return (ema_decay * grad_norm_ema + (1 - ema_decay) * grad_norms,
          jnp.where(decaying, new_rate, rate_ema))


def release(status: jax.Array, decay_step: jax.Array, rate_ema: jax.Array,
            relative_grad: jax.Array, *, rate_threshold: float, len_threshold: float,
            logic: str, min_decay_steps: int) -> jax.Array:
  """Self-rectifying's test: the ``[K]`` decaying channels to release now.

  Our reading of DPM's self-rectifying test: release when ``rate_ema > T_rate`` and (or, with
  ``logic='or'``) ``relative_grad > T_len``, after at least ``min_decay_steps`` decay steps.
  ``relative_grad`` is the channel's gradient-norm EMA over the mean of its group's active
  channels (C_len).
  """
  by_rate = rate_ema > rate_threshold
  by_len = relative_grad > len_threshold
  test = (by_rate & by_len) if logic == "and" else (by_rate | by_len)
  return (status == DECAYING) & (decay_step >= min_decay_steps) & test


def record_release(state: RectifyState, status: jax.Array, go: jax.Array,
                   count: jax.Array) -> tuple[RectifyState, jax.Array]:
  """The channels ``go`` become active: they keep their partly decayed weights and what they
  remembered of their decay (``L_init``); their release is counted, at step ``count``.

  Returns:
    The new state and status.
  """
  state = state._replace(decay_step=jnp.where(go, 0, state.decay_step),
                         released=state.released + go.astype(jnp.int32),
                         released_at=jnp.where(go, count, state.released_at))
  return state, jnp.where(go, jnp.int8(ACTIVE), status)


@dataclasses.dataclass(frozen=True)
class SmoothPruning(Removal):
  """DPM's smooth pruning: a selected channel decays to zero over ``decay_steps`` steps.

  Our reading: at selection the norm of the channel's producer slices is remembered as
  ``L_init``; each step, after the inner optimizer's ``x~ = x + u``, the channel is rescaled,
  keeping its direction, to ``||x|| = L_init (N - n) / N`` (see ``decay_factors``). Kernel,
  bias and BatchNorm scale and bias decay together: conv -> BN is scale-invariant, so
  decaying the kernel alone would change nothing.

  Attributes:
    decay_steps: N, the optimizer steps a selected channel takes to reach zero (1 zeroes it
      at the step of its selection, like ``Hard``).
    soft: once at zero the channel is free to regrow, as a soft-pruned one, and every event
      selects afresh (SFP + smooth pruning, our reading); ``False`` holds it at zero.
  """

  decay_steps: int = 100
  soft: bool = False

  def __post_init__(self):
    check_int(type(self).__name__, "decay_steps", self.decay_steps, 1)
    if not isinstance(self.soft, bool):
      raise ValueError(f"{type(self).__name__}: soft={self.soft!r} must be a bool.")

  @property
  def settle_steps(self) -> int:
    return self.decay_steps

  def init(self, ctx: Context, params: Any) -> DecayState:
    del params
    return DecayState(jnp.zeros(ctx.num_channels, jnp.int32),
                      jnp.zeros(ctx.num_channels, jnp.float32))

  def begin_event(self, ctx: Context, state: State,
                  status: jax.Array) -> tuple[jax.Array, State]:
    del ctx
    if self.soft:  # every event selects afresh
      return jnp.full_like(status, ACTIVE), state
    return status, state

  def busy(self, ctx: Context, state: State, status: jax.Array) -> jax.Array:
    del ctx, state
    return jnp.any(status == DECAYING) if self.soft else jnp.any(status != ACTIVE)

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    state = state._replace(decay_step=jnp.where(new, 0, state.decay_step),
                           init_norm=jnp.where(new, _norms(ctx, params), state.init_norm))
    return jnp.where(new, jnp.int8(DECAYING), status), state

  def land(self, ctx: Context, state: State, status: jax.Array, step: Step, stepped: Any,
           marked: jax.Array) -> tuple[Any, jax.Array, State, jax.Array]:
    del marked

    def decay(state, status):
      norms_after = _norms(ctx, stepped)
      state, status, freed = self._rectify(ctx, state, status, step, norms_after)
      status, n, factor = decay_factors(status, state.decay_step, state.init_norm, norms_after,
                                        self.decay_steps, hold=not self.soft)
      return _land(ctx, stepped, factor), status, state._replace(decay_step=n), freed

    def hold(state, status):  # nothing decays: pruned channels are held, no norms needed
      factor = (status != PRUNED).astype(jnp.float32)
      return _land(ctx, stepped, factor), status, state, _none(status)

    return jax.lax.cond(jnp.any(status == DECAYING), decay, hold, state, status)

  def _rectify(self, ctx: Context, state: State, status: jax.Array, step: Step,
               norms_after: jax.Array) -> tuple[State, jax.Array, jax.Array]:
    """Self-rectifying's hook: smooth pruning releases nothing."""
    del ctx, step, norms_after
    return state, status, _none(status)


@dataclasses.dataclass(frozen=True)
class SelfRectifying(SmoothPruning):
  """DPM's smooth pruning with self-rectifying: a decaying channel whose pruning looks like a
  mistake is released.

  Our reading: for every decaying channel, ``rate = (||x~|| - ||x||) / ||x||`` (how much the
  optimizer pushes its norm back up) and ``len`` = its gradient-norm EMA over the mean of its
  group's active channels (C_len). EMAs with ``ema_decay`` are the gradient history. A channel
  is released when ``rate_ema > rate_threshold`` and (``logic='or'``: or)
  ``len > len_threshold``, after ``min_decay_steps`` decay steps; it keeps its partly decayed
  weights, trains normally, and may not be selected again for ``cooldown`` steps; the
  allocation selects a replacement in the same step, from the parameters the step lands on,
  so the FLOPs target holds after every step. Releases stop ``release_steps`` after the
  schedule's last event, so that the pruning settles: every replacement finishes its decay
  by the recipe's ``last_step`` (``settle_steps = release_steps + decay_steps`` after the last
  event), and the prune phase, which must cover ``last_step``, never ends mid-decay.

  Attributes:
    decay_steps: N, as for ``SmoothPruning``.
    soft: as for ``SmoothPruning``.
    rate_threshold: T_rate.
    len_threshold: T_len.
    ema_decay: decay of the EMAs of the rate and the gradient norm.
    logic: ``and`` releases when both EMAs pass their thresholds, ``or`` when either does.
    min_decay_steps: a channel decays at least this many steps before it may be released.
    cooldown: steps after a release during which the channel may not be selected again.
    release_steps: how many steps after the schedule's last event channels may still be
      released; None (the default) is ``decay_steps``: a channel selected at the last event
      may be released for as long as it decays. Our reading: the paper does not say when
      self-rectifying stops.

  The paper publishes no values. The defaults come from ``bench/dpm_ablation.py`` (DepGraph +
  DPM, MNIST-1D CNN, 10% of the FLOPs, fine-tuned test accuracy over seeds 0-2, one knob at
  a time from N = one epoch, T_rate 0, T_len 1, EMA 0.9, ``and``; DepGraph's hard removal:
  95.8 +- 0.3):

  - ``ema_decay`` 0.5: 97.6 +- 0.5 (236 releases), against 96.5 +- 0.3 at 0.9 and
    96.3 +- 0.4 at 0.99: a short gradient history releases more, and better.
  - ``rate_threshold`` 0: 96.5 +- 0.3; -0.01: 96.3 +- 0.5; 0.01: 96.0 +- 0.6; 0.05:
    95.9 +- 0.1 (3 releases).
  - ``len_threshold`` 1: 96.5 +- 0.3; 0.5: 96.9 +- 1.1 (1204 releases, one seed lower);
    2 and 4: 95.3 and 95.6, hardly any release (smooth pruning alone).
  - ``logic`` ``and``: 96.5 +- 0.3; ``or``: 97.5 +- 0.2 with 1874 releases, channels
    churning to the end (kept ``and``: the gain comes with ten times the releases).
  - ``decay_steps`` (N) one epoch: 96.5 +- 0.3; two: 97.3 +- 0.2; half: 95.9 +- 1.4; a
    quarter: 88.6 +- 13.0 (one seed's first layer ended with 1 of 32 channels). With
    ``ema_decay`` 0.5, two epochs give 97.5 +- 0.3: no gain over one. Give N about an epoch,
    and no less.
  """

  rate_threshold: float = 0.0
  len_threshold: float = 1.0
  ema_decay: float = 0.5  # 0.9 before the study; see above.
  logic: str = "and"
  min_decay_steps: int = 10
  cooldown: int = 100
  release_steps: int | None = None

  def __post_init__(self):
    super().__post_init__()
    name = type(self).__name__
    if self.release_steps is not None:
      check_int(name, "release_steps", self.release_steps, 0)
    # A relative change of a channel's norm in one step.
    check_float(name, "rate_threshold", self.rate_threshold, -1.0, 1.0, low_open=True,
                high_open=True)
    check_float(name, "len_threshold", self.len_threshold, 0.0, float("inf"))
    check_float(name, "ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
    if self.logic not in LOGICS:
      raise ValueError(f"{name}: logic={self.logic!r}; choose one of {', '.join(LOGICS)}.")
    check_int(name, "min_decay_steps", self.min_decay_steps, 0)
    if self.min_decay_steps >= self.decay_steps:
      raise ValueError(f"{name}: min_decay_steps={self.min_decay_steps} must be less than "
                       f"decay_steps={self.decay_steps}.")
    check_int(name, "cooldown", self.cooldown, 0)

  @property
  def release_window(self) -> int:
    """Steps after the last event during which channels may still be released."""
    return self.decay_steps if self.release_steps is None else self.release_steps

  @property
  def settle_steps(self) -> int:
    # A replacement selected at the last release decays for decay_steps more.
    return self.release_window + self.decay_steps

  def init(self, ctx: Context, params: Any) -> RectifyState:
    del params
    k = ctx.num_channels
    zeros = lambda: jnp.zeros(k, jnp.float32)  # distinct buffers, so the state can be donated
    return RectifyState(jnp.zeros(k, jnp.int32), zeros(), zeros(), zeros(),
                        jnp.zeros(k, jnp.int32), jnp.full(k, _NEVER, jnp.int32))

  def candidates(self, ctx: Context, state: State, status: jax.Array,
                 count: jax.Array) -> jax.Array:
    del ctx
    return (status == ACTIVE) & (count - state.released_at >= self.cooldown)

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    status, state = super().mark(ctx, state, status, new, params)
    return status, state._replace(rate_ema=jnp.where(new, 0.0, state.rate_ema))

  def _rectify(self, ctx: Context, state: State, status: jax.Array, step: Step,
               norms_after: jax.Array) -> tuple[State, jax.Array, jax.Array]:
    norms = _norms(ctx, step.params)
    rate = (norms_after - norms) / jnp.maximum(norms, 1e-12)
    grad_norms = _norms(ctx, step.grads)
    grad_ema, rate_ema = update_gradient_history(status, state.decay_step, state.grad_norm_ema,
                                                 state.rate_ema, grad_norms, rate,
                                                 self.ema_decay)
    active_mean = channels.segment_mean(ctx.index, grad_ema, status == ACTIVE)
    relative = grad_ema / jnp.maximum(active_mean, 1e-12)
    go = release(status, state.decay_step, rate_ema, relative,
                 rate_threshold=self.rate_threshold, len_threshold=self.len_threshold,
                 logic=self.logic, min_decay_steps=self.min_decay_steps)
    if ctx.last_event is not None:  # then the pruning settles
      go = go & (step.count < ctx.last_event + self.release_window)
    state, status = record_release(state._replace(grad_norm_ema=grad_ema, rate_ema=rate_ema),
                                   status, go, step.count)
    return state, status, go


# ----------------------------------------------------------------------------------------
# Protective reconstruction (PSAP).


REFERENCES = ("zeroed", "active")


class ProtectState(NamedTuple):
  """Protective reconstruction's memory.

  Attributes:
    backup: a params-shaped tree holding, in every channel's producer slices, the values they
      had when the channel was zeroed (other entries are zero): one copy of the params.
    saved: ``[K]`` whether the channel's backup holds its weights (from its zeroing until its
      restoration).
    grad_norm_ema: ``[K]`` EMA of the channel's gradient norm (its producer slices).
    protected: ``[K]`` events during which the channel may not be selected.
    released: ``[K]`` how many times the channel was restored by a pulse.
    released_at: ``[K]`` the step of its last restoration.
  """

  backup: Any
  saved: jax.Array
  grad_norm_ema: jax.Array
  protected: jax.Array
  released: jax.Array
  released_at: jax.Array


@dataclasses.dataclass(frozen=True)
class Protective(Removal):
  """PSAP's soft pruning with protective reconstruction.

  Our reading of "Protective Self-Adaptive Pruning" (Li and Zhao 2023), whose formulas are
  not public. At an event every zeroed channel is released and the selection is made afresh
  (soft pruning). A selected channel's producer slices (kernel slice, bias, normalisation
  scale and bias) are saved when it is first zeroed, and zeroed (as ``Soft``) at every event
  that selects it; it keeps training. While it is zeroed, the EMA of its gradient norm (restarted at zero
  when it is zeroed) is watched: a pulse above ``gamma`` times the mean EMA of the
  ``reference`` channels of its group restores the saved slices exactly, and the channel may
  not be selected for the next ``protect_events`` events; the allocation selects another
  channel in the same step (zeroed at the next step), so the FLOPs target holds. A zeroed
  channel that an event's selection leaves active is restored too (its zeroing is undone).
  ``finalize`` zeroes the last selection for surgery.

  The backup is one copy of the params (4 bytes per float32 parameter), in the pruning state
  of protective recipes only.

  Attributes:
    gamma: the pulse threshold, relative to the reference channels' mean.
    ema_decay: decay of the gradient-norm EMA.
    protect_events: events a restored channel is protected from selection.
    reference: ``zeroed``: the group's other zeroed channels (a pulse stands out among its
      peers; after BatchNorm a zeroed kernel's gradient is scaled by ``1/sqrt(eps)``, the
      same for all of them, so only peers compare; a group with one zeroed channel has no
      pulse); ``active``: the group's active channels (for networks without
      normalisation).
    zero: as for ``Soft``: ``producers`` (the default) or ``weights``.
  """

  gamma: float = 2.0
  ema_decay: float = 0.9
  protect_events: int = 2
  reference: str = "zeroed"
  zero: str = "producers"

  def __post_init__(self):
    check_float("Protective", "gamma", self.gamma, 0.0, float("inf"))
    check_float("Protective", "ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
    check_int("Protective", "protect_events", self.protect_events, 0)
    if self.reference not in REFERENCES:
      raise ValueError(f"Protective: reference={self.reference!r}; choose one of "
                       f"{', '.join(REFERENCES)}.")
    if self.zero not in ZEROS:
      raise ValueError(f"Protective: zero={self.zero!r}; choose one of {', '.join(ZEROS)}.")

  def init(self, ctx: Context, params: Any) -> ProtectState:
    k = ctx.num_channels
    return ProtectState(jax.tree.map(jnp.zeros_like, params), jnp.zeros(k, bool),
                        jnp.zeros(k, jnp.float32), jnp.zeros(k, jnp.int32),
                        jnp.zeros(k, jnp.int32), jnp.full(k, _NEVER, jnp.int32))

  def candidates(self, ctx: Context, state: State, status: jax.Array,
                 count: jax.Array) -> jax.Array:
    del ctx, count
    return (status == ACTIVE) & (state.protected == 0)

  def begin_event(self, ctx: Context, state: State,
                  status: jax.Array) -> tuple[jax.Array, State]:
    del ctx
    return jnp.full_like(status, ACTIVE), state  # every event selects afresh

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    del ctx, params  # zeroed (and saved) where the step lands
    return jnp.where(new, jnp.int8(SOFT), status), state

  def busy(self, ctx: Context, state: State, status: jax.Array) -> jax.Array:
    del ctx, state
    return jnp.any(status == SOFT)

  def land(self, ctx: Context, state: State, status: jax.Array, step: Step, stepped: Any,
           marked: jax.Array) -> tuple[Any, jax.Array, State, jax.Array]:
    soft = status == SOFT
    # Zeroed now: this event's selection, and replacements selected after the last step.
    zero = soft & (marked | ~state.saved)
    save = zero & ~state.saved
    backup = jax.lax.cond(jnp.any(save),  # params-sized work only when needed
                          lambda: channels.where(ctx.index, save, step.params, state.backup),
                          lambda: state.backup)
    ema = self.ema_decay * state.grad_norm_ema + (1 - self.ema_decay) * _norms(ctx, step.grads)
    ema = jnp.where(zero, 0.0, ema)
    watched = soft & ~zero
    if self.reference == "zeroed":  # the mean of the group's other zeroed channels
      seg = jnp.asarray(ctx.segment_ids)
      total = channels.segment_sum(ctx.index, jnp.where(watched, ema, 0.0))[seg] - ema
      count = channels.segment_sum(ctx.index, watched.astype(jnp.float32))[seg] - 1
      watched = watched & (count > 0)
      mean = total / jnp.maximum(count, 1.0)
    else:
      mean = channels.segment_mean(ctx.index, ema, status == ACTIVE)
    pulse = watched & (ema > self.gamma * mean)
    status = jnp.where(pulse, jnp.int8(ACTIVE), status)
    # Restored: pulses, and zeroed channels that the event's selection left active.
    restore = state.saved & (status == ACTIVE)
    landed = channels.scale(ctx.index, stepped, (~zero).astype(jnp.float32),
                            min_ndim=2 if self.zero == "weights" else 0)
    landed = jax.lax.cond(jnp.any(restore),
                          lambda: channels.where(ctx.index, restore, backup, landed),
                          lambda: landed)
    # An event's selection has passed: one event less of protection.
    protected = jnp.where(step.event, jnp.maximum(state.protected - 1, 0), state.protected)
    state = ProtectState(
        backup=backup,
        saved=(state.saved | save) & (status == SOFT),
        grad_norm_ema=ema,
        protected=jnp.where(pulse, self.protect_events, protected),
        released=state.released + pulse.astype(jnp.int32),
        released_at=jnp.where(pulse, step.count, state.released_at))
    return landed, status, state, pulse


# ----------------------------------------------------------------------------------------
# The half-space projection (OTOv2).


@dataclasses.dataclass(frozen=True)
class HalfSpace(Removal):
  """OTOv2's half-space projection (Chen et al. 2023, DHSPG): selected (redundant) channels
  are ``PUSHED`` towards zero (``regularizers.HalfSpacePush`` adds ``lmbda * x / ||x||`` to
  their gradients); each step, a pushed channel whose trial point ``x~`` (after the inner
  optimizer's step) leaves the half-space, ``<x~, x> < eps * ||x||^2``, is removed by
  ``then``: zeroed at once and held there (``Hard``: OTOv2), or from there decayed over
  ``decay_steps`` (``SmoothPruning``: DPM's +SP replaces the projection's jump) and maybe
  released (``SelfRectifying``: +SR). A pushed channel the projection has not removed by
  the end is cut by ``finalize``. The projection, not the schedule, starts the decays, so
  self-rectifying here may release until the end (our reading): ``finalize`` cuts what has
  not settled, as it cuts what the projection has not removed.

  Attributes:
    eps: the half-space threshold (the reference: 0.9).
    then: what removes a channel once projected.
  """

  eps: float = 0.9
  then: Removal = Hard()

  def __post_init__(self):
    check_float("HalfSpace", "eps", self.eps, 0.0, 1.0, high_open=True)
    if not isinstance(self.then, (Hard, SmoothPruning)) or getattr(self.then, "soft", False):
      raise ValueError(f"HalfSpace: then={self.then!r} must be Hard, SmoothPruning or "
                       "SelfRectifying (held, not soft).")

  @property
  def settle_steps(self) -> int:
    return self.then.settle_steps

  def init(self, ctx: Context, params: Any) -> State:
    return self.then.init(ctx, params)

  def candidates(self, ctx: Context, state: State, status: jax.Array,
                 count: jax.Array) -> jax.Array:
    return self.then.candidates(ctx, state, status, count)

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    del ctx, params
    return jnp.where(new, jnp.int8(PUSHED), status), state

  def land(self, ctx: Context, state: State, status: jax.Array, step: Step, stepped: Any,
           marked: jax.Array) -> tuple[Any, jax.Array, State, jax.Array]:
    del marked
    x_sq = channels.sq_norms(ctx.index, step.params)
    trial = channels.inner(ctx.index, stepped, step.params)
    projected = (status == PUSHED) & (trial < self.eps * x_sq)
    status, state = self.then.mark(ctx, state, jnp.where(projected, jnp.int8(ACTIVE), status),
                                   projected, step.params)
    # Decays start at projections, which go on after the last event: no release deadline.
    return self.then.land(dataclasses.replace(ctx, last_event=None), state, status, step,
                          stepped, projected)
