"""Measured latency as the cost a recipe's target is a fraction of (as HALP does for GPUs).

``measure_latency`` times every distinct convolution and contraction of a traced network
alone, on the default device, at a grid of widths of its prunable dimensions (one channel,
the multiples of ``step`` and the full width), each with the pass over its output that
follows it in a network: a per-channel scale and shift (BatchNorm in eval mode), a relu,
and, where the layer's output channels join other layers' (``Op.joined``: a residual add),
one more operand of the output's shape. The ``LatencyTable`` it returns gives a
``LatencyModel``: the sum over layers of each layer's timings interpolated (multilinearly)
at its widths, a ``dpm_jax.flops.CostModel`` that allocations read as they read MACs.
Passed as a recipe's ``cost``, it makes ``target_flops`` a fraction of the dense network's
predicted latency.

Why the pass over the output: measured on a 2-core CPU, ResNet-56 at batch 128, with widths
on the grid, the convolutions alone predicted the network 10-22% too fast, with scale,
shift and relu 16% too fast to 4% too slow, and with the residual add 8% too fast to 3% too
slow (dense and ten pruned networks). Pooling and the other small ops are not timed.

Between grid points the prediction is an interpolation, and uneven widths can run much
slower than their neighbours (on XLA:CPU, ResNet-56 at half its FLOPs with uneven widths is
slower than the dense network): a recipe with a latency cost must keep widths on the grid,
with ``round_to`` a multiple of the table's ``step`` (``prune`` says so otherwise).

Our reading of HALP (Shen et al., "Structural Pruning via Latency-Saliency Knapsack",
NeurIPS 2022), which looks latency up per layer in a table of (input, output) channel
counts measured on the target GPU: we time the layer's own operation at the batch it will
run at, include the pass over its output, and interpolate instead of requiring every width
in the table. A timing is the fastest of ``repeats`` calls after ``warmup`` calls (other work
on the machine only adds time, so the fastest call is the closest to the op's own cost, as
``timeit`` advises); grid points of one operation are timed in interleaved rounds.

Example (a hand-made table; ``measure_latency`` measures one):

  >>> import jax.numpy as jnp
  >>> import dpm_jax
  >>> from dpm_jax import latency
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.ones((4, 16)), 'w2': jnp.ones((16, 2))}
  >>> spec = dpm_jax.trace_groups_fn(mlp, v, jnp.zeros((1, 4)))
  >>> [latency.layer_grids(spec, l, step=8) for l in spec.layers]
  [((4,), (1,), (1, 8, 16)), ((1, 8, 16), (1,), (2,))]
  >>> table = latency.LatencyTable.from_seconds(spec, step=8, seconds={
  ...     'w1': [1.0, 2.0, 4.0], 'w2': [1.0, 1.5, 2.0]})
  >>> model = table(spec)                            # the recipe's cost: Recipe(cost=table)
  >>> model.dense_cost                               # 4 + 2 seconds at full width
  6.0
  >>> keep = jnp.arange(16) < 12                     # 12 channels: halfway from 8 to 16
  >>> float(model.cost(keep))                        # 3 + 1.75
  4.75
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax.flops import CostModel
from dpm_jax.groups import Dim, GroupSpec, Layer, Op

__all__ = ["DEFAULT_CACHE_DIR", "OpLatency", "LatencyTable", "LatencyModel",
           "measure_latency", "layer_grids", "op_at_batch"]

# Where ``train`` and ``bench`` keep measured tables (one JSON file per operation and grid).
DEFAULT_CACHE_DIR = "~/.cache/dpm_jax/latency"
_FORMAT = 1  # bumped when what a cached file means changes


class OpLatency(NamedTuple):
  """Seconds of one operation at every point of a grid of widths.

  Attributes:
    grids: for every dimension of the layer (``Layer.dims``), the entries it was timed at,
      ascending (one entry: the dimension is never pruned).
    seconds: the time at every point of the grids' product, row-major.
  """

  grids: tuple[tuple[int, ...], ...]
  seconds: tuple[float, ...]


def _dim_grid(dim: Dim, sizes: Sequence[int], step: int) -> tuple[int, ...]:
  if not dim.terms:
    return (dim.fixed,)
  full = dim.fixed + sum(t.multiplicity * (sizes[t.group] if t.channels is None
                                           else len(t.channels)) for t in dim.terms)
  # Channels enter with their multiplicity (a flatten's rows); a dimension over several
  # groups is gridded on its total channel count.
  mult = min(t.multiplicity for t in dim.terms)
  channels = (full - dim.fixed) // mult
  counts = {1, channels, *range(step, channels, step)}
  return tuple(sorted({dim.fixed + mult * c for c in counts} | {full}))


def layer_grids(spec: GroupSpec, layer: Layer, step: int) -> tuple[tuple[int, ...], ...]:
  """The entries every dimension of ``layer`` is timed at: one channel, the multiples of
  ``step`` and the full width (fixed entries included; one entry for an unprunable one)."""
  return tuple(_dim_grid(d, spec.sizes, step) for d in layer.dims)


def op_at_batch(op: Op, batch: int | None) -> Op:
  """``op`` with its example batch axes (``Op.batch``) resized to ``batch`` (``None``: as
  traced)."""
  if batch is None:
    return op
  shapes = [list(s) for s in op.shapes]
  for i, a in op.batch:
    shapes[i][a] = batch
  return op._replace(shapes=tuple(tuple(s) for s in shapes))


@dataclasses.dataclass(frozen=True, repr=False)
class LatencyTable:
  """Measured seconds of a network's operations; ``table(spec)`` is its ``LatencyModel``.

  Attributes:
    device: the device kind it was measured on (``jax.Device.device_kind``).
    step: widths were timed at multiples of this (and one channel, and the full width).
    batch: the batch the operations were timed at (``None``: as traced).
    entries: ``(op, latency)`` of every distinct operation (its batch resized).
  """

  device: str
  step: int
  batch: int | None
  entries: tuple[tuple[Op, OpLatency], ...]

  def __repr__(self) -> str:
    return (f"LatencyTable(device={self.device!r}, step={self.step}, batch={self.batch}, "
            f"{len(self.entries)} ops)")

  def lookup(self, layer: Layer) -> OpLatency:
    """The timings of ``layer``'s operation; raises ``ValueError`` if the table lacks it."""
    if layer.op is None:
      raise ValueError(f"Layer {layer.name} ({layer.primitive}) does not say how to rebuild "
                       "its operation, so it has no latency: trace the spec with "
                       "dpm_jax.trace_groups (hand-made layers need an Op).")
    found = dict(self.entries).get(op_at_batch(layer.op, self.batch))
    if found is None:
      raise ValueError(
          f"The latency table has no timings for layer {layer.name} (operand shapes "
          f"{op_at_batch(layer.op, self.batch).shapes}): measure the table with "
          "measure_latency on this spec (a spec of the same model at another batch needs "
          "the table's batch= set).")
    return found

  def __call__(self, spec: GroupSpec) -> LatencyModel:
    """The latency model of ``spec``'s layers (a recipe's ``cost``)."""
    return LatencyModel.build(spec, self)

  @classmethod
  def from_seconds(cls, spec: GroupSpec, step: int, seconds: Mapping[str, Sequence[float]],
                   device: str = "given", batch: int | None = None) -> LatencyTable:
    """A table given by hand: ``seconds[layer.name]`` on ``layer_grids(spec, layer, step)``
    (row-major), for every layer; layers with the same operation must agree."""
    entries: dict[Op, OpLatency] = {}
    for layer in spec.layers:
      if layer.name not in seconds:
        raise ValueError(f"from_seconds: no seconds for layer {layer.name}; give one list "
                         "per layer name.")
      if layer.op is None:
        raise ValueError(f"from_seconds: layer {layer.name} has no Op.")
      grids = layer_grids(spec, layer, step)
      values = tuple(float(s) for s in seconds[layer.name])
      if len(values) != int(np.prod([len(g) for g in grids])):
        raise ValueError(f"from_seconds: layer {layer.name} needs "
                         f"{int(np.prod([len(g) for g in grids]))} values on grids {grids}, "
                         f"got {len(values)}.")
      op = op_at_batch(layer.op, batch)
      if op in entries and entries[op] != OpLatency(grids, values):
        raise ValueError(f"from_seconds: layer {layer.name} has the operation of another "
                         "layer but different seconds.")
      entries[op] = OpLatency(grids, values)
    return cls(device, step, batch, tuple(entries.items()))


# ----------------------------------------------------------------------------------------
# Measuring.


def _probe(op: Op, grids: tuple[tuple[int, ...], ...], point: Sequence[int]):
  """The jitted operation at ``point`` (an entry count per dimension), with the scale,
  shift and relu of its output, and its arguments."""
  shapes = [list(s) for s in op.shapes]
  for grid, n, axes in zip(grids, point, op.axes):
    if len(grid) > 1:  # unpruned dimensions keep the traced (batch-resized) shapes
      for i, a, divisor in axes:
        shapes[i][a] = n // divisor
  params = dict(op.params)
  preferred = params.get("preferred_element_type")
  preferred = None if preferred is None else jnp.dtype(preferred)
  if op.primitive == "conv_general_dilated":
    dn = jax.lax.ConvDimensionNumbers(*params["dimension_numbers"])
    groups = shapes[0][dn.lhs_spec[1]] if op.depthwise else params["feature_group_count"]
    channel_axis = dn.out_spec[1]

    def apply(x, w):
      return jax.lax.conv_general_dilated(
          x, w, params["window_strides"], params["padding"], params["lhs_dilation"],
          params["rhs_dilation"], dn, groups, preferred_element_type=preferred)
  elif op.primitive == "dot_general":
    channel_axis = -1

    def apply(x, w):
      return jax.lax.dot_general(x, w, params["dimension_numbers"],
                                 preferred_element_type=preferred)
  else:
    raise ValueError(f"Cannot time primitive {op.primitive!r}: only convolutions and "
                     "dot_general have latency probes.")
  out = jax.eval_shape(apply, *(jax.ShapeDtypeStruct(s, d)
                                for s, d in zip(shapes, op.dtypes)))
  vec = [1] * len(out.shape)
  vec[channel_axis] = out.shape[channel_axis]

  def layer(x, w, scale, shift, *joined):  # BatchNorm (eval), a residual add, a relu
    return jax.nn.relu(sum(joined, apply(x, w) * scale + shift))

  # Drawn on the host: jax.random would compile a kernel for every shape.
  rng = np.random.default_rng(0)
  operands = list(zip(shapes, op.dtypes)) + [(vec, out.dtype)] * 2
  if op.joined:
    operands.append((out.shape, out.dtype))
  args = [jax.device_put(rng.standard_normal(s).astype(d)) for s, d in operands]
  return jax.jit(layer).lower(*args).compile(), args


def _time_grid(op: Op, grids: tuple[tuple[int, ...], ...], repeats: int,
               warmup: int) -> tuple[float, ...]:
  """The fastest call's seconds at every grid point, timed in interleaved rounds."""
  probes = [_probe(op, grids, p) for p in itertools.product(*grids)]
  for fn, args in probes:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: list[list[float]] = [[] for _ in probes]
  for _ in range(repeats):
    for t, (fn, args) in zip(times, probes):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      t.append(time.perf_counter() - start)
  return tuple(min(t) for t in times)


def _cache_key(device: jax.Device, op: Op, grids, repeats: int, warmup: int) -> dict:
  key = {"format": _FORMAT, "platform": device.platform, "device": device.device_kind,
         "jax": jax.__version__, "op": op._asdict(), "grids": grids, "repeats": repeats,
         "warmup": warmup}
  return json.loads(json.dumps(key))  # tuples as lists, as read back


def _read_cache(path: str, key: dict) -> tuple[float, ...] | None:
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return None
  if stored.get("key") != key:
    return None
  return tuple(float(s) for s in stored["seconds"])


def _write_cache(path: str, key: dict, seconds: tuple[float, ...]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump({"key": key, "seconds": list(seconds)}, f)
  os.replace(tmp, path)  # readers never see half a file


def measure_latency(spec: GroupSpec, *, step: int = 8, batch: int | None = None,
                    repeats: int = 5, warmup: int = 2,
                    cache_dir: str | None = None) -> LatencyTable:
  """Times every distinct operation of ``spec``'s layers on the default device.

  Args:
    spec: the traced network (``trace_groups``).
    step: widths are timed at multiples of this many channels, one channel and the full
      width; a recipe with this table needs ``round_to`` a multiple of it.
    batch: the batch to time at (``None``: the batch the spec was traced with): a spec
      traced with one example can be timed at the batch it will serve.
    repeats: timed calls per grid point (the fastest is kept).
    warmup: untimed calls per grid point first.
    cache_dir: read timings from, and write new ones to, one JSON file per operation and
      grid in this directory (e.g. ``DEFAULT_CACHE_DIR``), keyed by the device kind, the
      jax version, the operation, its grid and the repeats; ``None``: measure, write nothing.

  Returns:
    The ``LatencyTable``; ``table(spec)`` is the ``LatencyModel`` a recipe's ``cost`` takes.

  Raises:
    ValueError: bad arguments, or a layer whose operation cannot be rebuilt.
  """
  for name, value, low in (("step", step, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"measure_latency: {name}={value!r} must be an int >= {low}.")
  if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
    raise ValueError(f"measure_latency: batch={batch!r} must be None or an int >= 1.")
  wanted: dict[Op, list[set[int]]] = {}
  for layer in spec.layers:
    if layer.op is None:
      raise ValueError(f"measure_latency: layer {layer.name} ({layer.primitive}) does not "
                       "say how to rebuild its operation (Layer.op is None): trace the spec "
                       "with dpm_jax.trace_groups, or give a hand-made layer an Op.")
    if layer.op.primitive not in ("conv_general_dilated", "dot_general"):
      raise ValueError(f"measure_latency: layer {layer.name} is a {layer.op.primitive!r}, "
                       "which has no latency probe (convolutions and dot_general have).")
    op = op_at_batch(layer.op, batch)
    grids = wanted.setdefault(op, [set() for _ in layer.dims])
    for have, grid in zip(grids, layer_grids(spec, layer, step)):
      have.update(grid)
  device = jax.devices()[0]
  entries = []
  for op, grid_sets in wanted.items():
    grids = tuple(tuple(sorted(g)) for g in grid_sets)
    key = _cache_key(device, op, grids, repeats, warmup)
    path = None
    seconds = None
    if cache_dir is not None:
      digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
      path = os.path.join(os.path.expanduser(cache_dir), f"{digest}.json")
      seconds = _read_cache(path, key)
    if seconds is None:
      seconds = _time_grid(op, grids, repeats, warmup)
      if path is not None:
        _write_cache(path, key, seconds)
    entries.append((op, OpLatency(grids, seconds)))
  return LatencyTable(device.device_kind, step, batch, tuple(entries))


# ----------------------------------------------------------------------------------------
# The jittable model.


@dataclasses.dataclass(frozen=True)
class LatencyModel(CostModel):
  """Predicted seconds of any keep configuration: every layer's timings interpolated
  (multilinearly, clipped to the grid) at its widths, summed over layers.

  Attributes (besides ``CostModel``'s):
    grids: ``[L, M, P]`` the entries every layer dimension was timed at, padded with
      ``inf``.
    counts: ``[L, M]`` grid points of every layer dimension.
    strides: ``[L, M]`` row-major strides of every layer's timings in ``seconds``.
    offsets: ``[L]`` where every layer's timings start in ``seconds``.
    seconds: ``[T]`` every layer's timings, flat.
    step: the table's width step: widths off its multiples are not measured.
  """

  grids: np.ndarray
  counts: np.ndarray
  strides: np.ndarray
  offsets: np.ndarray
  seconds: np.ndarray
  step: int

  @classmethod
  def build(cls, spec: GroupSpec, table: LatencyTable) -> LatencyModel:
    weights, fixed, layer_dims, seg = cls.dimensions(spec)
    num_layers, width = layer_dims.shape
    found = [table.lookup(layer) for layer in spec.layers]
    points = max((len(g) for f in found for g in f.grids), default=1)
    grids = np.full((num_layers, width, points), np.inf, np.float32)
    grids[:, :, 0] = 1.0  # the padding dimension: one entry
    counts = np.ones((num_layers, width), np.int32)
    strides = np.zeros((num_layers, width), np.int32)
    offsets, flat = [], []
    for l, (layer, f) in enumerate(zip(spec.layers, found)):
      if len(f.grids) != len(layer.dims):
        raise ValueError(f"The latency table's entry for layer {layer.name} has "
                         f"{len(f.grids)} dimensions, the layer {len(layer.dims)}.")
      for m, g in enumerate(f.grids):
        grids[l, m, :len(g)] = g
        counts[l, m] = len(g)
        strides[l, m] = int(np.prod([len(h) for h in f.grids[m + 1:]]))
      offsets.append(sum(len(s) for s in flat))
      flat.append(f.seconds)
    seconds = np.concatenate([np.asarray(s, np.float32) for s in flat]) if flat else (
        np.zeros(0, np.float32))
    return cls(weights, fixed, layer_dims, seg, grids, counts, strides,
               np.asarray(offsets, np.int32), seconds, table.step)

  @property
  def unit(self) -> str:
    return "predicted latency"

  @property
  def width_step(self) -> int:
    return self.step

  def cost_of_dims(self, dims: jax.Array) -> jax.Array:
    """Predicted seconds from the entries of every dimension (``[D, ...]``)."""
    batch = dims.shape[1:]
    x = self.layer_sizes(dims).reshape(self.layer_dims.shape + (-1,))   # [L, M, N]
    grids = jnp.asarray(self.grids)
    counts = jnp.asarray(self.counts)[..., None]
    below = jnp.sum(grids[..., None] <= x[:, :, None, :], axis=2) - 1   # [L, M, N]
    lo_i = jnp.clip(below, 0, jnp.maximum(counts - 2, 0))
    hi_i = jnp.minimum(lo_i + 1, counts - 1)
    lo = jnp.take_along_axis(grids, lo_i, axis=2)
    hi = jnp.take_along_axis(grids, hi_i, axis=2)
    t = jnp.where(hi > lo, jnp.clip((x - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0, 1.0),
                  0.0)
    strides = jnp.asarray(self.strides)[..., None]
    seconds = jnp.asarray(self.seconds)
    total = jnp.zeros(x.shape[2:], jnp.float32)
    for corner in itertools.product((False, True), repeat=x.shape[1]):
      up = jnp.asarray(corner)[None, :, None]
      idx = jnp.asarray(self.offsets)[:, None] + jnp.sum(
          jnp.where(up, hi_i, lo_i) * strides, axis=1)                     # [L, N]
      weight = jnp.prod(jnp.where(up, t, 1.0 - t), axis=1)                 # [L, N]
      total = total + jnp.sum(weight * seconds[idx], axis=0)
    return total.reshape(batch)
