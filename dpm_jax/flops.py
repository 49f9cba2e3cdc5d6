"""Counting multiply-accumulates (MACs), FLOPs and parameters of a (pruned) network.

The counts come from the same trace as the channel groups (``GroupSpec.layers``), so any keep
configuration can be costed without building it. Only convolutions and dense/``dot_general``
contractions are counted, as is usual (thop, fvcore, Torch-Pruning): BatchNorm, activations,
adds and pooling are not. Contractions between two activations count too: attention's
``q.k`` and ``p.v`` cost ``H * T * S * d`` MACs each (masked positions included: they are
computed), and shrink with the heads kept. ``flops`` is ``2 * macs``, always: beware papers that call MACs
FLOPs. Counts are for the example inputs given (use a batch of one for per-image numbers).

Example:

  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import dpm_jax
  >>> # Shapes are enough: an abstract model and input cost nothing to build.
  >>> model = nnx.eval_shape(
  ...     lambda: dpm_jax.models.create_model('resnet56', num_classes=10, rngs=nnx.Rngs(0)))
  >>> report = dpm_jax.count_flops(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  >>> round(report.macs / 1e6), round(report.params / 1e3)
  (126, 856)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax import groups as groups_lib
from dpm_jax.groups import GroupSpec
from dpm_jax.surgery import check_keep, kept_indices

__all__ = ["LayerCount", "FlopsReport", "CostModel", "FlopsModel", "spec_cost", "count_flops",
           "count_flops_fn"]


class LayerCount(NamedTuple):
  """MACs of one convolution or contraction; ``name`` is its weight's path."""

  name: str
  primitive: str
  macs: int


@dataclasses.dataclass(frozen=True)
class FlopsReport:
  """Cost of a network: ``macs``, ``flops`` (= 2 x MACs), ``params`` and a per-layer list."""

  macs: int
  params: int
  layers: tuple[LayerCount, ...]

  @property
  def flops(self) -> int:
    """Floating-point operations: 2 x MACs (one multiply and one add each)."""
    return 2 * self.macs

  def __str__(self) -> str:
    lines = [f"{'layer':<48} {'op':<12} {'MACs':>14}"]
    lines += [f"{l.name:<48} {l.primitive:<12} {l.macs:>14,}" for l in self.layers]
    lines.append(f"total: {self.macs:,} MACs = {self.flops:,} FLOPs (2 x MACs), "
                 f"{self.params:,} params")
    return "\n".join(lines)


def _dim_size(dim: groups_lib.Dim, keep: Sequence[np.ndarray]) -> int:
  n = dim.fixed
  for t in dim.terms:
    k = keep[t.group]
    n += t.multiplicity * int(k.sum() if t.channels is None else k[list(t.channels)].sum())
  return n


def spec_cost(spec: GroupSpec, keep: Sequence[Any] | None = None) -> FlopsReport:
  """MACs and parameters of the network ``spec`` describes, pruned to ``keep`` if given."""
  keep = ([np.ones(g.size, bool) for g in spec.groups] if keep is None
          else check_keep(spec, keep))
  layers = []
  for layer in spec.layers:
    macs = layer.const
    for dim in layer.dims:
      macs *= _dim_size(dim, keep)
    layers.append(LayerCount(layer.name, layer.primitive, int(macs)))
  sliced = kept_indices(spec, keep)
  shapes = dict(spec.shapes)
  params = 0
  for path in spec.params:
    params += int(np.prod([len(sliced[(path, a)]) if (path, a) in sliced else n
                           for a, n in enumerate(shapes[path])]))
  return FlopsReport(sum(l.macs for l in layers), params, tuple(layers))


def count_flops_fn(apply_fn: Callable[..., Any], variables: Any, *example_inputs: Any,
                   keep: Sequence[Any] | None = None, **trace_kwargs) -> FlopsReport:
  """MACs, FLOPs and parameters of ``apply_fn(variables, *example_inputs)``.

  ``keep`` (one mask per group of ``trace_groups_fn`` with the same arguments) gives the
  counts of the pruned network without building it; other keywords go to
  ``trace_groups_fn``. Statistics are not counted as parameters.
  """
  spec = groups_lib.trace_groups_fn(apply_fn, variables, *example_inputs, **trace_kwargs)
  return spec_cost(spec, keep)


def count_flops(model, *example_inputs: Any, keep: Sequence[Any] | None = None,
                **trace_kwargs) -> FlopsReport:
  """MACs, FLOPs and ``nnx.Param`` count of an NNX module (with ``keep``: as if pruned)."""
  return spec_cost(groups_lib.trace_groups(model, *example_inputs, **trace_kwargs), keep)


# ----------------------------------------------------------------------------------------
# The same costs as a dense, jittable model over the flat channel vector (for allocation).


@dataclasses.dataclass(frozen=True)
class CostModel:
  """A jittable cost of every keep configuration, over the flat channel vector.

  What a recipe's target is a fraction of, and what allocations read: the channel dimensions
  of every traced layer (``dim_sizes``) and a cost of them (``cost_of_dims``). Subclasses say
  what the cost is: MACs (``FlopsModel``) or predicted seconds (``dpm_jax.latency``).

  Attributes:
    weights: ``[D, K]`` entries of dimension ``d`` per kept channel ``k``.
    fixed: ``[D]`` unprunable entries of every dimension.
    layer_dims: ``[L, M]`` the dimensions of each layer, padded with ``D`` (a dimension of
      size one).
    segment_ids: ``[K]`` the group of every flat channel.
  """

  weights: np.ndarray
  fixed: np.ndarray
  layer_dims: np.ndarray
  segment_ids: np.ndarray

  @property
  def unit(self) -> str:
    """What the cost is, for messages."""
    return "cost"

  @property
  def width_step(self) -> int:
    """The cost is exact at widths in multiples of this: a recipe's ``round_to`` must be a
    multiple of it (one: every width)."""
    return 1

  @staticmethod
  def dimensions(spec: GroupSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``weights``, ``fixed``, ``layer_dims`` and ``segment_ids`` of ``spec``'s layers (for a
    subclass's ``build``)."""
    sizes = spec.sizes
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int) if sizes else []
    k = int(sum(sizes))
    rows, fixed, layer_dims = [], [], []
    for layer in spec.layers:
      dims = []
      for dim in layer.dims:
        w = np.zeros(k, np.float32)
        for t in dim.terms:
          start = starts[t.group]
          idx = (np.arange(sizes[t.group]) if t.channels is None else np.asarray(t.channels))
          w[start + idx] += t.multiplicity
        dims.append(len(rows))
        rows.append(w)
        fixed.append(dim.fixed)
      layer_dims.append(dims)
    d = len(rows)
    width = max((len(x) for x in layer_dims), default=1)
    padded = np.full((len(layer_dims), width), d, np.int32)
    for i, dims in enumerate(layer_dims):
      padded[i, :len(dims)] = dims
    weights = np.stack(rows) if rows else np.zeros((0, k), np.float32)
    seg = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    return weights, np.asarray(fixed, np.float32), padded, seg

  def dim_sizes(self, keep: jax.Array) -> jax.Array:
    """``[D]`` entries of every dimension when ``keep`` (``[K]`` bool or float) is kept."""
    return jnp.asarray(self.fixed) + jnp.asarray(self.weights) @ keep.astype(jnp.float32)

  def cost_of_dims(self, dims: jax.Array) -> jax.Array:
    """The cost from the entries of every dimension: ``dims`` is ``[D, ...]`` (batched after
    D)."""
    raise NotImplementedError

  def layer_sizes(self, dims: jax.Array) -> jax.Array:
    """``[L, M, ...]`` the entries of every layer's dimensions (padding ones)."""
    ones = jnp.ones((1,) + dims.shape[1:], dims.dtype)
    return jnp.concatenate([dims, ones], axis=0)[jnp.asarray(self.layer_dims)]

  def cost(self, keep: jax.Array) -> jax.Array:
    """The cost of the network with ``keep`` channels."""
    return self.cost_of_dims(self.dim_sizes(keep))

  def static_cost(self, keep: np.ndarray) -> float:
    """``cost(keep)`` for a concrete ``keep``, computed at once even under a trace (``prune``
    may be built inside one, e.g. ``optax.inject_hyperparams``): targets and reachability
    are decided before training."""
    with jax.ensure_compile_time_eval():
      return float(self.cost(jnp.asarray(keep)))

  @property
  def dense_cost(self) -> float:
    """The cost of the whole network."""
    return self.static_cost(np.ones(self.weights.shape[1]))


@dataclasses.dataclass(frozen=True)
class FlopsModel(CostModel):
  """Dense MAC model of a traced network over the flat channel vector: its cost is MACs.

  Attributes (besides ``CostModel``'s):
    const: ``[L]`` the MACs of a layer per unit of each of its dimensions.
  """

  const: np.ndarray

  @classmethod
  def build(cls, spec: GroupSpec) -> FlopsModel:
    weights, fixed, layer_dims, seg = cls.dimensions(spec)
    const = np.asarray([layer.const for layer in spec.layers], np.float64)
    return cls(weights, fixed, layer_dims, seg, const)

  @property
  def unit(self) -> str:
    return "FLOPs"

  def cost_of_dims(self, dims: jax.Array) -> jax.Array:
    """MACs from the entries of every dimension: ``dims`` is ``[D, ...]`` (batched after D)."""
    per_layer = jnp.prod(self.layer_sizes(dims), axis=1)   # [L, ...]
    const = jnp.asarray(self.const, jnp.float32).reshape((-1,) + (1,) * (dims.ndim - 1))
    return jnp.sum(const * per_layer, axis=0)

  def static_cost(self, keep: np.ndarray) -> float:
    """The MACs of a concrete ``keep`` on the host, in float64: exact, and no device work."""
    dims = self.fixed.astype(np.float64) + self.weights.astype(np.float64) @ np.asarray(
        keep, np.float64)
    full = np.concatenate([dims, [1.0]])
    return float(np.sum(self.const * np.prod(full[self.layer_dims], axis=1)))
