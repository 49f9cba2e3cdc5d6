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
from dpm_jax.pruning.base import Context, Criterion, State, Step, check_float, check_names

__all__ = ["L1", "L2", "GroupL2", "Taylor", "Saliency"]


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


def _abs_products(params: Any, grads: Any) -> Any:
  return jax.tree.map(lambda x, g: jnp.abs(x.astype(jnp.float32) * g), params, grads)


@dataclasses.dataclass(frozen=True)
class Taylor(Criterion):
  """Gate Decorator's Taylor score (You et al. 2019): ``|gate * dL/dgate|`` summed over the
  channel's gates, in every layer of its group, accumulated over the steps since the last
  event (a tick). The gate of a channel is its normalisation scale (the variables named in
  ``gate_names``; the reference code moves the BN scale into a separate gate, which is the
  same function). A channel without a gate scores ``|sum(w * dL/dw)|`` over its producer
  slices, the first-order Taylor estimate of removing it (our fallback).

  Attributes:
    gate_names: names of the gate variables (flax's normalisation scale is ``scale``).
  """

  gate_names: tuple[str, ...] = ("scale",)

  def __post_init__(self):
    object.__setattr__(self, "gate_names", check_names("Taylor", "gate_names", self.gate_names))

  def init(self, ctx: Context, params: Any) -> jax.Array:
    del params
    return jnp.zeros(ctx.num_channels, jnp.float32)

  def step_scores(self, ctx: Context, params: Any, grads: Any) -> jax.Array:
    """``[K]`` one step's Taylor scores."""
    gates = ctx.index.only(lambda path: bool(path) and path[-1] in self.gate_names)
    has_gate = channels.per_channel(gates, params, jnp.ones_like) > 0
    gated = channels.per_channel(gates, _abs_products(params, grads), lambda x: x)
    return jnp.where(has_gate, gated, jnp.abs(channels.inner(ctx.index, params, grads)))

  def update(self, ctx: Context, state: jax.Array, step: Step) -> jax.Array:
    # A tick's scores start afresh after its event.
    return (jnp.where(step.event, 0.0, state)
            + self.step_scores(ctx, step.params, step.grads))

  def score(self, ctx: Context, state: jax.Array, params: Any) -> jax.Array:
    del ctx, params
    return state


@dataclasses.dataclass(frozen=True)
class Saliency(Criterion):
  """OTOv2's saliency (Chen et al. 2023), our reading of its partition into important and
  redundant groups: a channel is redundant when the descent direction points to zero (the
  cosine of ``-x`` and ``-grad`` near 1) and when its norm is small. Importance is
  ``-(cos + norm_weight * mean_norm / norm)``, ``mean_norm`` over the channel's group; the
  cosine uses EMAs (``grad_decay``) of ``<x, grad>`` and ``||grad||^2`` over the steps seen,
  so one noisy batch does not decide.

  Attributes:
    norm_weight: weight of the inverse norm against the cosine.
    grad_decay: decay of the gradient EMAs.
  """

  norm_weight: float = 1.0
  grad_decay: float = 0.9

  def __post_init__(self):
    check_float("Saliency", "norm_weight", self.norm_weight, 0.0, float("inf"))
    check_float("Saliency", "grad_decay", self.grad_decay, 0.0, 1.0, high_open=True)

  def init(self, ctx: Context, params: Any) -> tuple[jax.Array, jax.Array]:
    del params
    return (jnp.zeros(ctx.num_channels, jnp.float32), jnp.zeros(ctx.num_channels, jnp.float32))

  def update(self, ctx: Context, state: tuple[jax.Array, jax.Array],
             step: Step) -> tuple[jax.Array, jax.Array]:
    dot, grad_sq = state
    d = self.grad_decay
    return (d * dot + (1 - d) * channels.inner(ctx.index, step.params, step.grads),
            d * grad_sq + (1 - d) * channels.sq_norms(ctx.index, step.grads))

  def score(self, ctx: Context, state: tuple[jax.Array, jax.Array], params: Any) -> jax.Array:
    dot, grad_sq = state
    norms = jnp.sqrt(channels.sq_norms(ctx.index, params))
    cos = dot / jnp.maximum(norms * jnp.sqrt(grad_sq), 1e-12)
    mean = channels.segment_mean(ctx.index, norms, jnp.ones_like(norms, bool))
    return -(cos + self.norm_weight * mean / jnp.maximum(norms, 1e-12))
