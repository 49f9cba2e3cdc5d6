"""The parts of a pruning recipe: one small protocol per kind, and what they all read.

A recipe is five parts, each a value (a frozen dataclass of its options) whose methods are
pure functions over its own NamedTuple state, the way an optax ``GradientTransformation`` is
``init`` / ``update``:

- ``Criterion``: how important every channel is (``[K]``), possibly accumulated from the steps
  it sees;
- ``Allocation``: which channels to select at an event, given the scores, the candidates and
  the event's FLOPs target;
- ``Schedule``: when events happen and the FLOPs target in force;
- ``Removal``: what selection does to a channel and how every step lands (hard, soft, smooth
  decay, self-rectifying);
- ``Regularizer``: a gradient term added before the inner optimizer.

``dpm_jax.prune`` runs them; it never looks at their names. A part's state is in the pruning
state only when the part is used, and a part that keeps no state returns
``optax.EmptyState()`` (no arrays). Subclass a base class below to write your own part: only
the abstract method is required, the others default to "no state, nothing to do".

Channels are flat over all groups: group ``g`` owns entries
``[ctx.index.starts[g], ctx.index.starts[g] + size_g)`` of every ``[K]`` vector (see
``dpm_jax.channels``). A channel's *status* is one of ``ACTIVE``, ``DECAYING``, ``PRUNED``
(held at zero), ``SOFT`` (zeroed at its selection, training freely) and ``PUSHED`` (marked
redundant, pushed towards zero until a projection removes it: OTOv2); a channel is *kept*
exactly when it is ``ACTIVE``.

Example, a criterion of one's own (the norm of the channel's inner update: channels the
optimizer moves least go first):

  >>> import dataclasses, jax.numpy as jnp
  >>> from dpm_jax import channels, pruning
  >>> @dataclasses.dataclass(frozen=True)
  ... class Fresh(pruning.Criterion):
  ...   def init(self, ctx, params):
  ...     return jnp.zeros(ctx.num_channels)
  ...   def update(self, ctx, state, step):
  ...     return 0.9 * state + 0.1 * jnp.sqrt(channels.sq_norms(ctx.index, step.updates))
  ...   def score(self, ctx, state, params):
  ...     return state
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpm_jax.channels import ChannelIndex
from dpm_jax.flops import CostModel, FlopsModel
from dpm_jax.groups import GroupSpec, Path

__all__ = [
    "ACTIVE",
    "DECAYING",
    "PRUNED",
    "SOFT",
    "PUSHED",
    "Context",
    "Step",
    "Criterion",
    "Allocation",
    "Schedule",
    "Removal",
    "Regularizer",
    "check_int",
    "check_float",
    "check_names",
]

# Channel status.
ACTIVE, DECAYING, PRUNED, SOFT, PUSHED = 0, 1, 2, 3, 4

State = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
  """What every part may read: the model's groups and costs, built once by ``prune``.

  Attributes:
    spec: the channel groups.
    index: maps between the params tree and flat ``[K]`` channel vectors.
    cost: the jittable cost of any keep configuration: MACs (``FlopsModel``, the default)
      or predicted latency (``dpm_jax.latency``).
    target_flops: the recipe's final fraction of the dense network's cost.
    last_event: the step of the schedule's last event (None: not known), after which parts
      must let the pruning settle (``SelfRectifying`` stops releasing).
  """

  spec: GroupSpec
  index: ChannelIndex
  cost: CostModel
  target_flops: float
  last_event: int | None = None

  @classmethod
  def build(cls, spec: GroupSpec, target_flops: float, prefix: Path = (),
            cost: Callable[[GroupSpec], CostModel] = FlopsModel.build,
            last_event: int | None = None) -> Context:
    """The context of ``spec``; ``cost`` builds its cost model (a recipe's ``cost``)."""
    return cls(spec, ChannelIndex.build(spec, prefix), cost(spec), target_flops, last_event)

  @property
  def num_channels(self) -> int:
    return self.index.num_channels

  @property
  def num_groups(self) -> int:
    return self.index.num_groups

  @property
  def segment_ids(self) -> np.ndarray:
    """``[K]`` the group of every channel."""
    return self.index.segment_ids

  @property
  def dense_cost(self) -> float:
    """The cost of the whole network."""
    return self.cost.dense_cost

  def cost_of(self, keep: jax.Array) -> jax.Array:
    """The cost of the network with the ``[K]`` channels ``keep``."""
    return self.cost.cost(keep)


class Step(NamedTuple):
  """What one optimizer step shows the parts.

  Attributes:
    params: the parameters before the step.
    grads: the gradients ``prune`` received (before any regularizer).
    updates: the inner optimizer's updates: the step moves ``params`` to ``params + updates``
      before the removal lands it.
    count: steps taken before this one.
    event: whether this step is a pruning event.
  """

  params: Any
  grads: Any
  updates: Any
  count: jax.Array
  event: jax.Array


class Criterion:
  """Per-channel importance; the least important channels are selected first.

  ``update`` runs at every step (after ``score``, when the step is an event) and may
  accumulate what it sees; ``score`` runs at events and when replacements are selected.
  """

  def init(self, ctx: Context, params: Any) -> State:
    del ctx, params
    return optax.EmptyState()

  def update(self, ctx: Context, state: State, step: Step) -> State:
    del ctx, step
    return state

  def score(self, ctx: Context, state: State, params: Any) -> jax.Array:
    """``[K]`` importance of every channel (any scale; larger is more important)."""
    raise NotImplementedError


class Allocation:
  """Which channels go at an event, to bring the network to the event's cost."""

  def init(self, ctx: Context, params: Any) -> State:
    del ctx, params
    return optax.EmptyState()

  def check(self, ctx: Context) -> None:
    """Raises ``ValueError`` when ``ctx.target_flops`` cannot be met (before training)."""
    del ctx

  def minimum(self, spec: GroupSpec) -> np.ndarray:
    """``[G]`` the fewest channels the allocation leaves in each group (default: one)."""
    return np.ones(len(spec.groups), np.int32)

  def select(self, ctx: Context, state: State, scores: jax.Array, candidates: jax.Array,
             removed: jax.Array, target_cost: jax.Array,
             params: Any) -> tuple[jax.Array, State]:
    """The ``[K]`` channels removed after this selection (``removed`` plus the new ones).

    Args:
      ctx: the context.
      state: this allocation's state.
      scores: ``[K]`` the criterion's importance.
      candidates: ``[K]`` channels that may be selected now.
      removed: ``[K]`` channels already removed (they count as gone).
      target_cost: the cost to reach (``ctx.cost``'s unit: MACs, or seconds).
      params: the parameters the selection is made from.
    """
    raise NotImplementedError


class Schedule:
  """When pruning events happen, and the fraction of the dense FLOPs in force."""

  @property
  def last_event(self) -> int:
    """The step of the last event."""
    raise NotImplementedError

  def check(self, ctx: Context) -> None:
    """Raises ``ValueError`` when the schedule cannot reach ``ctx.target_flops`` (before
    training)."""
    del ctx

  def init(self, ctx: Context) -> State:
    del ctx
    return optax.EmptyState()

  def event(self, ctx: Context, state: State, count: jax.Array,
            status: jax.Array) -> tuple[jax.Array, jax.Array, State]:
    """Whether step ``count`` is an event, and the FLOPs fraction in force after it.

    ``status`` is the ``[K]`` channel status before the step. Before the first event the
    fraction is 1 (nothing is removed).
    """
    raise NotImplementedError


class Removal:
  """What selection does to a channel, and how every step lands.

  A removal decides the status a selected channel takes (``mark``), which active channels may
  be selected (``candidates``: e.g. not within a cooldown), what an event does to earlier
  selections first (``begin_event``: a soft removal selects afresh), and how the step lands
  (``land``: zero, decay, hold, release, restore). ``settle_steps`` is how many steps after
  its selection a channel needs to reach zero. A removal that gives channels back keeps
  ``released`` (``[K]`` counts) and ``released_at`` (``[K]`` step of the last) in its state,
  for reports (``dpm_jax.pruning.given_back``).
  """

  settle_steps: int = 0

  def init(self, ctx: Context, params: Any) -> State:
    del ctx, params
    return optax.EmptyState()

  def candidates(self, ctx: Context, state: State, status: jax.Array,
                 count: jax.Array) -> jax.Array:
    """``[K]`` channels that may be selected at step ``count`` (default: the active ones)."""
    del ctx, state, count
    return status == ACTIVE

  def begin_event(self, ctx: Context, state: State,
                  status: jax.Array) -> tuple[jax.Array, State]:
    """Runs at every event before selection (default: earlier selections stand)."""
    del ctx
    return status, state

  def mark(self, ctx: Context, state: State, status: jax.Array, new: jax.Array,
           params: Any) -> tuple[jax.Array, State]:
    """The status of the channels ``new`` selected now, from ``params`` before the step."""
    raise NotImplementedError

  def busy(self, ctx: Context, state: State, status: jax.Array) -> jax.Array:
    """Whether ``land`` has work on a step that is not an event (else the step is the inner
    optimizer's, at no cost)."""
    del ctx, state
    return jnp.any(status != ACTIVE)

  def land(self, ctx: Context, state: State, status: jax.Array, step: Step, stepped: Any,
           marked: jax.Array) -> tuple[Any, jax.Array, State, jax.Array]:
    """Where the step lands.

    Args:
      ctx: the context.
      state: this removal's state.
      status: ``[K]`` status after this step's selection.
      step: the step's inputs.
      stepped: ``params + updates``, where the inner optimizer would land.
      marked: ``[K]`` channels selected at this step.

    Returns:
      The landed params, the new status and state, and the ``[K]`` channels given back this
      step (released or restored: the allocation selects replacements for them).
    """
    raise NotImplementedError


class Regularizer:
  """A gradient term added before the inner optimizer (group lasso, L1 on gates, ...)."""

  def init(self, ctx: Context, params: Any) -> State:
    del ctx, params
    return optax.EmptyState()

  def update(self, ctx: Context, state: State, grads: Any, params: Any, status: jax.Array,
             count: jax.Array) -> tuple[Any, State]:
    """The gradients with the term added, and the new state."""
    raise NotImplementedError


# ----------------------------------------------------------------------------------------
# Validation of parts' options: every field is checked, and the message names it.


def check_int(owner: str, name: str, value: Any, minimum: int | None = None) -> None:
  """Raises ``ValueError`` unless ``value`` is an int (not a bool), at least ``minimum``."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{owner}: {name}={value!r} must be an int, got "
                     f"{type(value).__name__}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{owner}: {name}={value!r} must be >= {minimum}.")


def check_float(owner: str, name: str, value: Any, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a real number in the given interval."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{owner}: {name}={value!r} must be a number, got "
                     f"{type(value).__name__}.")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high or value != value:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{owner}: {name}={value!r} must be in {interval}.")


def check_names(owner: str, name: str, value: Any) -> tuple[str, ...]:
  """``value`` as a tuple of strings; raises ``ValueError`` unless it is a non-empty
  sequence of strings (a bare string would be read letter by letter)."""
  if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value or not all(
      isinstance(v, str) for v in value):
    raise ValueError(f"{owner}: {name}={value!r} must be a non-empty tuple of names, e.g. "
                     "('scale',).")
  return tuple(value)
