"""The pruning state and the pure functions that advance it.

``PruneState`` is a NamedTuple pytree of fixed shapes (one jit compile for a whole run). Per
channel arrays are flat over all groups (``[K]``, see ``dpm_jax.channels``); the keep masks are
one array per group, exactly what ``dpm_jax.remove_channels`` takes.

Example:

  >>> import numpy as np
  >>> from dpm_jax import state
  >>> s = state.init((3, 2))
  >>> s.status.tolist(), [k.tolist() for k in s.keep]
  ([0, 0, 0, 0, 0], [[True, True, True], [True, True]])
  >>> s = state.mark_selected(s, np.array([0, 1, 0, 0, 1], bool), np.ones(5), hard=False)
  >>> s.status.tolist()
  [0, 1, 0, 0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ACTIVE",
    "DECAYING",
    "PRUNED",
    "PruneState",
    "init",
    "flat_keep",
    "mark_selected",
    "decay_factors",
    "update_gradient_history",
    "release",
]

ACTIVE, DECAYING, PRUNED = 0, 1, 2
_NEVER = np.iinfo(np.int32).min // 2


class PruneState(NamedTuple):
  """Everything the pruning transform remembers between steps.

  Attributes:
    count: optimizer steps taken.
    status: ``[K]`` int8, ``ACTIVE`` (0), ``DECAYING`` (1) or ``PRUNED`` (2).
    keep: one bool array per group: ``False`` for channels selected for removal (decaying or
      pruned). The masks ``remove_channels`` takes.
    decay_step: ``[K]`` decay steps taken since selection (n).
    init_norm: ``[K]`` the channel's norm at selection (L_init).
    grad_norm_ema: ``[K]`` EMA of the channel's gradient norm (the gradient history).
    rate_ema: ``[K]`` EMA of the self-rectifying rate of a decaying channel.
    importance: ``[K]`` the importance score of the last selection.
    released: ``[K]`` how many times the channel was released.
    released_at: ``[K]`` the step of its last release.
    ratio: ``[G]`` the fraction of each group selected for removal.
  """

  count: jax.Array
  status: jax.Array
  keep: tuple[jax.Array, ...]
  decay_step: jax.Array
  init_norm: jax.Array
  grad_norm_ema: jax.Array
  rate_ema: jax.Array
  importance: jax.Array
  released: jax.Array
  released_at: jax.Array
  ratio: jax.Array


def init(sizes: Sequence[int]) -> PruneState:
  """A fresh state for groups of the given sizes: every channel active."""
  k = int(sum(sizes))
  zeros = lambda: jnp.zeros(k, jnp.float32)  # distinct buffers, so the state can be donated
  return PruneState(
      count=jnp.zeros((), jnp.int32),
      status=jnp.zeros(k, jnp.int8),
      keep=tuple(jnp.ones(n, bool) for n in sizes),
      decay_step=jnp.zeros(k, jnp.int32),
      init_norm=zeros(),
      grad_norm_ema=zeros(),
      rate_ema=zeros(),
      importance=zeros(),
      released=jnp.zeros(k, jnp.int32),
      released_at=jnp.full(k, _NEVER, jnp.int32),
      ratio=jnp.zeros(len(sizes), jnp.float32),
  )


def flat_keep(state: PruneState) -> jax.Array:
  """The keep masks as one ``[K]`` vector."""
  return jnp.concatenate(state.keep) if state.keep else jnp.zeros(0, bool)


def _with_keep(state: PruneState, keep: jax.Array) -> PruneState:
  sizes = [k.shape[0] for k in state.keep]
  splits = np.cumsum(sizes)[:-1].tolist()
  parts = tuple(jnp.split(keep, splits)) if sizes else ()
  seg = np.repeat(np.arange(len(sizes)), sizes)
  removed = jax.ops.segment_sum((~keep).astype(jnp.float32), seg, len(sizes))
  return state._replace(keep=parts, ratio=removed / jnp.asarray(sizes, jnp.float32))


def mark_selected(state: PruneState, selected: jax.Array, norms: jax.Array, *,
                  hard: bool, scores: jax.Array | None = None) -> PruneState:
  """Channels in ``selected`` that are active start decaying (or are pruned if ``hard``).

  ``norms`` is the current channel norm, remembered as ``L_init``.
  """
  new = selected & (state.status == ACTIVE)
  status = jnp.where(new, jnp.int8(PRUNED if hard else DECAYING), state.status)
  state = state._replace(
      status=status,
      decay_step=jnp.where(new, 0, state.decay_step),
      init_norm=jnp.where(new, norms, state.init_norm),
      rate_ema=jnp.where(new, 0.0, state.rate_ema),
      importance=state.importance if scores is None else scores,
  )
  return _with_keep(state, flat_keep(state) & ~new)


def decay_factors(state: PruneState, norms_after: jax.Array,
                  decay_steps: int) -> tuple[PruneState, jax.Array]:
  """One smooth-pruning step: the factor that puts each channel on its decayed norm.

  Our reading of DPM's smooth pruning: after the optimizer's step gives ``x~``, a decaying
  channel takes its ``n += 1``-th step and is rescaled, keeping its direction, to
  ``||x|| = L_init * (N - n) / N``; at ``n = N`` it is zero and becomes ``PRUNED``. Pruned
  channels get factor 0 (held at zero), active ones 1.

  Args:
    state: the pruning state.
    norms_after: ``[K]`` channel norms after the optimizer step (``||x~||``).
    decay_steps: N.

  Returns:
    The advanced state and the ``[K]`` factors to multiply ``x~`` by.
  """
  decaying = state.status == DECAYING
  n = state.decay_step + decaying.astype(jnp.int32)
  target = state.init_norm * (decay_steps - n).astype(jnp.float32) / decay_steps
  safe = jnp.where(norms_after > 0, norms_after, 1.0)
  factor = jnp.where(decaying, jnp.where(norms_after > 0, target / safe, 0.0), 1.0)
  factor = jnp.where(state.status == PRUNED, 0.0, factor)
  status = jnp.where(decaying & (n >= decay_steps), jnp.int8(PRUNED), state.status)
  return state._replace(status=status, decay_step=n), factor


def update_gradient_history(state: PruneState, grad_norms: jax.Array, rate: jax.Array,
                            ema_decay: float) -> PruneState:
  """EMAs of every channel's gradient norm and of decaying channels' rate."""
  decaying = state.status == DECAYING
  first = decaying & (state.decay_step == 0)
  rate_ema = jnp.where(first, rate, ema_decay * state.rate_ema + (1 - ema_decay) * rate)
  return state._replace(
      grad_norm_ema=ema_decay * state.grad_norm_ema + (1 - ema_decay) * grad_norms,
      rate_ema=jnp.where(decaying, rate_ema, state.rate_ema))


def release(state: PruneState, relative_grad: jax.Array, *, rate_threshold: float,
            len_threshold: float, logic: str, min_decay_steps: int) -> PruneState:
  """Self-rectifying: decaying channels whose pruning looks like a mistake become active.

  Our reading of DPM's self-rectifying test: release when ``rate_ema > T_rate`` and (or, with
  ``logic='or'``) ``relative_grad > T_len``, after at least ``min_decay_steps`` decay steps.
  ``relative_grad`` is the channel's gradient-norm EMA over the mean of its group's active
  channels (C_len). A released channel keeps its partly decayed weights.
  """
  by_rate = state.rate_ema > rate_threshold
  by_len = relative_grad > len_threshold
  test = (by_rate & by_len) if logic == "and" else (by_rate | by_len)
  go = (state.status == DECAYING) & (state.decay_step >= min_decay_steps) & test
  state = state._replace(
      status=jnp.where(go, jnp.int8(ACTIVE), state.status),
      released=state.released + go.astype(jnp.int32),
      released_at=jnp.where(go, state.count, state.released_at),
      decay_step=jnp.where(go, 0, state.decay_step),
  )
  return _with_keep(state, flat_keep(state) | go)
