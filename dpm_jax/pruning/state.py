"""The pruning state: step count, channel status, and the state of each part of the recipe.

``PruneState`` is a NamedTuple pytree of fixed shapes (one jit compile for a whole run). It
stores only what cannot be derived: the keep masks and each group's pruned fraction follow
from the status (a channel is kept exactly when it is ``ACTIVE``).

Example:

  >>> import optax
  >>> from dpm_jax.pruning import state
  >>> s = state.init((3, 2), *(optax.EmptyState(),) * 5)
  >>> [k.tolist() for k in s.keep]
  [[True, True, True], [True, True]]
  >>> s = s._replace(status=state.split_status(s, state.channel_status(s).at[1].set(2)))
  >>> [k.tolist() for k in s.keep], [round(float(r), 3) for r in state.ratios(s)]
  ([[True, False, True], [True, True]], [0.333, 0.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax.pruning.base import ACTIVE

__all__ = ["PruneState", "init", "channel_status", "split_status", "ratios", "given_back"]


class PruneState(NamedTuple):
  """Everything the pruning transform remembers between steps.

  Attributes:
    count: optimizer steps taken (steps with non-finite gradients do not count).
    status: one int8 array per group: ``ACTIVE`` (0), ``DECAYING`` (1), ``PRUNED`` (2),
      ``SOFT`` (3) or ``PUSHED`` (4) per channel (see ``dpm_jax.pruning.base``).
    criterion: the criterion's state.
    allocation: the allocation's state.
    schedule: the schedule's state.
    removal: the removal's state (e.g. decay steps, gradient history, releases).
    regularizer: the regularizer's state.
  """

  count: jax.Array
  status: tuple[jax.Array, ...]
  criterion: Any
  allocation: Any
  schedule: Any
  removal: Any
  regularizer: Any

  @property
  def keep(self) -> tuple[jax.Array, ...]:
    """One bool mask per group: ``False`` for channels selected for removal (the masks
    ``dpm_jax.remove_channels`` takes)."""
    return tuple(s == ACTIVE for s in self.status)


def init(sizes: Sequence[int], criterion: Any, allocation: Any, schedule: Any, removal: Any,
         regularizer: Any) -> PruneState:
  """A fresh state for groups of the given sizes, every channel active."""
  return PruneState(
      count=jnp.zeros((), jnp.int32),
      status=tuple(jnp.zeros(n, jnp.int8) for n in sizes),
      criterion=criterion,
      allocation=allocation,
      schedule=schedule,
      removal=removal,
      regularizer=regularizer,
  )


def channel_status(state: PruneState) -> jax.Array:
  """The status of every channel as one flat ``[K]`` vector."""
  return jnp.concatenate(state.status) if state.status else jnp.zeros(0, jnp.int8)


def split_status(state: PruneState, flat: jax.Array) -> tuple[jax.Array, ...]:
  """A flat ``[K]`` status back in ``state``'s per-group form."""
  splits = np.cumsum([s.shape[0] for s in state.status])[:-1].tolist()
  return tuple(jnp.split(flat.astype(jnp.int8), splits)) if state.status else ()


def ratios(state: PruneState) -> jax.Array:
  """``[G]`` the fraction of each group's channels selected for removal."""
  if not state.status:
    return jnp.zeros(0, jnp.float32)
  return jnp.stack([1.0 - jnp.mean(k.astype(jnp.float32)) for k in state.keep])


def given_back(state: PruneState) -> tuple[np.ndarray, np.ndarray]:
  """``[K]`` how many times each channel was given back after its selection (released by
  self-rectifying, restored by protection) and the step of the last time.

  Removals that give channels back keep ``released`` and ``released_at`` in their state; for
  the others every count is 0.
  """
  k = int(sum(s.shape[0] for s in state.status))
  released = getattr(state.removal, "released", None)
  if released is None:
    return np.zeros(k, np.int32), np.full(k, np.iinfo(np.int32).min // 2, np.int32)
  return np.asarray(released), np.asarray(state.removal.released_at)
