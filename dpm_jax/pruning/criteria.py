"""Criteria: how important every channel is, ``[K]`` over all groups (larger: more important).

Example:

  >>> import jax.numpy as jnp
  >>> from dpm_jax import groups
  >>> from dpm_jax.pruning import Context, criteria
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.array([[1., 2.], [1., 2.]]), 'w2': jnp.ones((2, 1))}
  >>> ctx = Context.build(groups.trace_groups_fn(mlp, v, jnp.zeros((1, 2))), 0.5)
  >>> criteria.L1().score(ctx, None, v).tolist()
  [2.0, 4.0]
  >>> [round(s, 4) for s in criteria.GroupL2().score(ctx, None, v).tolist()]  # + consumers
  [1.7321, 3.0]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dpm_jax import channels
from dpm_jax.groups import CONSUMER, PRODUCER
from dpm_jax.pruning.base import Context, Criterion, State

__all__ = ["L1", "L2", "GroupL2"]


def _check_weights_only(owner: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{owner}: weights_only={value!r} must be a bool.")


@dataclasses.dataclass(frozen=True)
class L1(Criterion):
  """The L1 norm of the channel's producer slices (kernel output slice, bias, normalisation
  scale and bias): Li et al. 2017, "Pruning filters for efficient convnets".

  Attributes:
    weights_only: the kernel slices only (the filter's weights), as Li et al. and SFP rank.
  """

  weights_only: bool = False

  def __post_init__(self):
    _check_weights_only("L1", self.weights_only)

  def score(self, ctx: Context, state: State, params: Any) -> jax.Array:
    del state
    return channels.abs_sums(ctx.index, params, min_ndim=2 if self.weights_only else 0)


@dataclasses.dataclass(frozen=True)
class L2(Criterion):
  """The L2 norm of the channel's producer slices.

  Attributes:
    weights_only: the kernel slices only (the filter's weights: SFP's filter norm).
  """

  weights_only: bool = False

  def __post_init__(self):
    _check_weights_only("L2", self.weights_only)

  def score(self, ctx: Context, state: State, params: Any) -> jax.Array:
    del state
    return jnp.sqrt(channels.sq_norms(ctx.index, params, min_ndim=2 if self.weights_only else 0))


@dataclasses.dataclass(frozen=True)
class GroupL2(Criterion):
  """L2 over every parameter slice of the channel, consumers' input slices included:
  DepGraph's group importance (Fang et al. 2023)."""

  def score(self, ctx: Context, state: State, params: Any) -> jax.Array:
    del state
    return jnp.sqrt(channels.sq_norms(ctx.index, params, roles=(PRODUCER, CONSUMER)))
