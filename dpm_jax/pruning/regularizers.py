"""Regularizers: a gradient term added before the inner optimizer.

- ``GroupLasso``: DepGraph's sparse learning, a per-channel penalty over the channel's
  whole group, stronger for less important channels.
- ``GateL1``: Gate Decorator's L1 on the gates (normalisation scales) during its tocks.
- ``HalfSpacePush``: OTOv2's push of redundant channels towards zero.

Example:

  >>> import jax.numpy as jnp
  >>> from dpm_jax import groups
  >>> from dpm_jax.pruning import Context, regularizers
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.array([[3., 1.], [4., 1.]]), 'w2': jnp.zeros((2, 1))}
  >>> ctx = Context.build(groups.trace_groups_fn(mlp, v, jnp.zeros((1, 2))), 0.5)
  >>> # Group norms 5 and 1.41: the weaker channel gets alpha times the strength.
  >>> regularizers.group_lasso_strength(ctx.index, v, reg=1e-3, alpha=16.0).tolist()
  [0.001, 0.016]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dpm_jax import channels
from dpm_jax.groups import CONSUMER, PRODUCER
from dpm_jax.pruning.base import (PUSHED, Context, Regularizer, Schedule, State, check_float,
                                  check_names)

__all__ = ["GroupLasso", "GateL1", "HalfSpacePush", "group_lasso_strength", "gate_index"]


def group_lasso_strength(index: channels.ChannelIndex, params: Any, reg: float,
                         alpha: float) -> jax.Array:
  """``[K]`` DepGraph's per-channel strength ``reg * alpha ** ((max - imp) / (max - min))``,
  with ``imp`` the channel's L2 norm over its whole group (every member) and max, min over
  its group's channels (all equal: ``reg``)."""
  imp = jnp.sqrt(channels.sq_norms(index, params, roles=(PRODUCER, CONSUMER)))
  parts = channels.split(index, imp)
  hi = jnp.concatenate([jnp.full(p.shape, jnp.max(p)) for p in parts]) if parts else imp
  lo = jnp.concatenate([jnp.full(p.shape, jnp.min(p)) for p in parts]) if parts else imp
  span = hi - lo
  exponent = jnp.where(span > 0, (hi - imp) / jnp.where(span > 0, span, 1.0), 0.0)
  return reg * alpha ** exponent


@dataclasses.dataclass(frozen=True)
class GroupLasso(Regularizer):
  """DepGraph's sparse learning (Fang et al. 2023): every parameter slice of a channel, in
  all the layers its group touches, gets ``strength * w`` added to its gradient, the
  strength from ``group_lasso_strength`` (less important channels, by their group norm,
  are pushed harder). As DepGraph's reference code (Torch-Pruning's group-norm pruner), the
  term is the gradient of a per-channel weighted squared L2.

  Attributes:
    reg: the base strength (reference: 5e-4).
    alpha: the ratio of the weakest channel's strength to the strongest's (reference: 16).
  """

  reg: float = 5e-4
  alpha: float = 16.0

  def __post_init__(self):
    check_float("GroupLasso", "reg", self.reg, 0.0, float("inf"))
    check_float("GroupLasso", "alpha", self.alpha, 1.0, float("inf"))

  def update(self, ctx: Context, state: State, grads: Any, params: Any, status: jax.Array,
             count: jax.Array) -> tuple[Any, State]:
    del status, count
    strength = group_lasso_strength(ctx.index, params, self.reg, self.alpha)
    weight = channels.spread(ctx.index, params, strength, roles=(PRODUCER, CONSUMER))
    return jax.tree.map(lambda g, w, p: g + (w * p).astype(g.dtype), grads, weight, params), state


def gate_index(ctx: Context, gate_names: tuple[str, ...]) -> channels.ChannelIndex:
  """The channel index of the gates: producer slices of the variables named in
  ``gate_names`` (flax's normalisation scale is ``scale``)."""
  return ctx.index.only(lambda path: bool(path) and path[-1] in gate_names)


@dataclasses.dataclass(frozen=True)
class GateL1(Regularizer):
  """Gate Decorator's tock (You et al. 2019): while ``schedule`` is in a tock, an L1
  penalty on the gates, ``strength * sign(gate)`` added to the gates' gradients. The gate of
  a channel is its normalisation scale (the reference code moves the BN scale into a
  separate gate, which is the same function).

  Attributes:
    strength: the L1 coefficient (reference: 1e-3).
    schedule: the ``TickTock`` schedule whose tocks turn the penalty on.
    gate_names: names of the gate variables.
  """

  strength: float = 1e-3
  schedule: Schedule | None = None
  gate_names: tuple[str, ...] = ("scale",)

  def __post_init__(self):
    check_float("GateL1", "strength", self.strength, 0.0, float("inf"))
    object.__setattr__(self, "gate_names", check_names("GateL1", "gate_names", self.gate_names))
    if self.schedule is None or not callable(getattr(self.schedule, "in_tock", None)):
      raise ValueError("GateL1: schedule must be the recipe's TickTock schedule (it says when "
                       "a tock trains with the penalty).")

  def update(self, ctx: Context, state: State, grads: Any, params: Any, status: jax.Array,
             count: jax.Array) -> tuple[Any, State]:
    del status
    on = self.schedule.in_tock(count).astype(jnp.float32) * self.strength
    mask = channels.spread(gate_index(ctx, self.gate_names), params,
                           jnp.ones(ctx.num_channels))
    return jax.tree.map(lambda g, m, p: g + (on * m * jnp.sign(p)).astype(g.dtype),
                        grads, mask, params), state


@dataclasses.dataclass(frozen=True)
class HalfSpacePush(Regularizer):
  """OTOv2's push of redundant channels (Chen et al. 2023, DHSPG): for every channel the
  removal marks as redundant (``PUSHED``), ``lmbda * x / ||x||`` is added to the gradient of
  its producer slices ``x``, which the half-space projection (``removals.HalfSpace``) then
  zeroes. Our reading: ``lmbda`` is fixed (DHSPG adapts it).

  Attributes:
    lmbda: the push strength.
  """

  lmbda: float = 1e-3

  def __post_init__(self):
    check_float("HalfSpacePush", "lmbda", self.lmbda, 0.0, float("inf"))

  def update(self, ctx: Context, state: State, grads: Any, params: Any, status: jax.Array,
             count: jax.Array) -> tuple[Any, State]:
    del count
    norms = jnp.sqrt(channels.sq_norms(ctx.index, params))
    push = jnp.where(status == PUSHED, self.lmbda / jnp.maximum(norms, 1e-12), 0.0)
    weight = channels.spread(ctx.index, params, push)
    return jax.tree.map(lambda g, w, p: g + (w * p).astype(g.dtype), grads, weight, params), state
