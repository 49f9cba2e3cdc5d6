"""Coupled channel groups, found by tracing a model's forward pass.

A *channel group* is a set of parameter slices that share one channel index space and must be
pruned together: a conv kernel's output slice, its bias, the BatchNorm scale, bias and running
statistics that follow it, every consumer's input slice, and everything tied to them by
elementwise ops (a residual add ties several producers into one group), concatenation (a group
is an offset range of the concatenated axis), depthwise convs (input and output channel tied)
and flattening into a dense layer (a channel is a strided set of rows). A reshape that splits
a channel axis into ``(heads, head_dim)`` makes each head one channel (its ``head_dim``
entries of every q, k and v projection and of the output projection), and attention's
contractions keep heads apart (they are batch axes of ``q.k`` and ``p.v``); under
grouped-query attention a key/value head and the query heads that share it are one channel.

The tracer reads ``jax.make_jaxpr`` of the forward pass in eval mode. Every index of every
parameter axis gets a label; the rules below say which labels are the same channel (an edge)
and which can never be pruned (an edge to the *fixed* label). The connected components of that
graph are the channels; groups are the maximal runs of channels that every parameter axis
holds contiguously and in the same order.

When in doubt the tracer fixes channels: a pruned model must compute what the masked one
does, or the channel is not offered. Fixed are channels that come from the model's inputs or
reach its outputs; that are mixed by a reduction over the channel axis; that meet an array
built inside the model (``iota``, a closed-over constant), the output of an op frozen by
``on_unknown='freeze'``, or a static slice or split; and channels contracted between two
activations, or free in such a contraction (attention's ``q.k`` and ``p.v``: the model may
read the width back as ``1/sqrt(d)``, and q, k and v need one head size; only the
contraction's batch axes, the heads, are pruned); and channels that a
layer reads though they are not zero when their producers are (after a sigmoid, or a
BatchNorm without scale and bias: zero flags follow every value). ``GroupSpec.fixed``
and the spec's listing say, for every parameter axis, which of these kept it whole.

Example:

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import dpm_jax
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
  ...     self.fc = nnx.Linear(8, 10, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.fc(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))
  >>> spec = dpm_jax.trace_groups(Net(nnx.Rngs(0)), jnp.zeros((1, 8, 8, 1)))
  >>> [g.size for g in spec.groups]
  [8]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "Term",
    "Dim",
    "Op",
    "Layer",
    "Fixed",
    "PRODUCER",
    "CONSUMER",
    "STATISTIC",
    "Member",
    "Group",
    "GroupSpec",
    "UnsupportedPrimitiveError",
    "trace_groups",
    "trace_groups_fn",
    "path_str",
]

PRODUCER = "producer"
CONSUMER = "consumer"
STATISTIC = "statistic"

Path = tuple[str, ...]


class UnsupportedPrimitiveError(NotImplementedError):
  """The tracer met an operation whose channel semantics it does not know."""


class Member(NamedTuple):
  """One parameter slice of a group.

  Channel ``c`` of the group owns the indices
  ``offset + c * channel_stride + r * repeat_stride`` for ``r in range(repeat)`` along
  ``axis`` of the variable at ``path``. Plain members have ``channel_stride=1, repeat=1``;
  a dense layer after an NHWC flatten has ``repeat = H * W`` and ``repeat_stride = C``.
  """

  path: Path
  axis: int
  offset: int
  length: int
  role: str
  channel_stride: int = 1
  repeat: int = 1
  repeat_stride: int = 0

  def indices(self) -> np.ndarray:
    """The ``[length, repeat]`` indices along ``axis`` that the group's channels own."""
    c = np.arange(self.length)[:, None] * self.channel_stride
    r = np.arange(self.repeat)[None, :] * self.repeat_stride
    return self.offset + c + r


class Group(NamedTuple):
  """A set of parameter slices pruned together; ``size`` channels."""

  size: int
  members: tuple[Member, ...]

  @property
  def name(self) -> str:
    """A readable name: the first producer's path."""
    first = next((m for m in self.members if m.role == PRODUCER), self.members[0])
    return "/".join(first.path)

  def producers(self) -> tuple[Member, ...]:
    return tuple(m for m in self.members if m.role == PRODUCER)

  def consumers(self) -> tuple[Member, ...]:
    return tuple(m for m in self.members if m.role == CONSUMER)


class Term(NamedTuple):
  """``multiplicity`` entries of a layer dimension per kept channel of group ``group``.

  ``channels`` is ``None`` when the dimension holds every channel of the group, else the
  channel indices it holds.
  """

  group: int
  channels: tuple[int, ...] | None
  multiplicity: int


class Dim(NamedTuple):
  """A channel dimension of a layer: ``fixed`` unprunable entries plus the group ``terms``."""

  fixed: int
  terms: tuple[Term, ...]


class Fixed(NamedTuple):
  """``count`` of the ``size`` channels along ``axis`` of ``path`` cannot be pruned, for
  ``reasons`` (see ``GroupSpec.fixed``)."""

  path: Path
  axis: int
  count: int
  size: int
  reasons: tuple[str, ...]


class Op(NamedTuple):
  """How to rebuild a layer's operation at other widths, to time it (``dpm_jax.latency``).

  Attributes:
    primitive: ``'conv_general_dilated'`` or ``'dot_general'``.
    params: the primitive's static parameters as ``(name, value)`` pairs of plain tuples,
      ints and strings (``jax.lax``'s keyword arguments; precision is left at its default).
    shapes: the operands' shapes as traced.
    dtypes: the operands' dtype names.
    axes: for every dimension of the layer (``Layer.dims``), the ``(operand, axis,
      divisor)`` triples it sizes: the axis holds ``entries // divisor`` (a depthwise conv's
      input channels are its output channels over the channel multiplier).
    batch: the ``(operand, axis)`` pairs that hold the example batch: a conv's input batch
      axis; axis 0 of a contraction's operands that are not parameters, when not contracted.
    depthwise: the conv's ``feature_group_count`` is its input channel count.
    joined: the layer's output is combined elementwise with other layers' outputs (a
      residual add: their channels are one), so the pass over its output reads one more
      operand of its shape.
  """

  primitive: str
  params: tuple[tuple[str, Any], ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  axes: tuple[tuple[tuple[int, int, int], ...], ...]
  batch: tuple[tuple[int, int], ...] = ()
  depthwise: bool = False
  joined: bool = False


class Layer(NamedTuple):
  """A conv or contraction: ``macs = const * prod(kept entries of each dim)``; ``op`` says
  how to rebuild it at other widths (``None`` when unknown: it cannot be timed)."""

  name: str
  primitive: str
  const: int
  dims: tuple[Dim, ...]
  op: Op | None = None


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """Static, hashable description of all channel groups of a model.

  Attributes:
    groups: the prunable groups, in the order the forward pass first produces them.
    shapes: ``(path, shape)`` of every variable the trace saw, so that a spec can be checked
      against the variables it is applied to.
    params: the paths of the trainable parameters among them (statistics excluded).
    layers: the convolutions and contractions of the forward pass with their channel
      dimensions, for counting MACs of any pruned configuration (``dpm_jax.flops``).
    fixed: the parameter axes whose channels the tracer keeps whole, with the reasons
      (they come from the input or reach the output, are mixed by a reduction, meet a
      frozen op or an attention-like contraction, ...), so a user can see why a layer is
      not offered for pruning.
  """

  groups: tuple[Group, ...]
  shapes: tuple[tuple[Path, tuple[int, ...]], ...] = ()
  params: tuple[Path, ...] = ()
  layers: tuple[Layer, ...] = ()
  fixed: tuple[Fixed, ...] = ()

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(g.size for g in self.groups)

  @property
  def num_channels(self) -> int:
    return sum(self.sizes)

  @functools.cached_property
  def _shape_table(self) -> dict[Path, tuple[int, ...]]:
    return dict(self.shapes)

  def shape_of(self, path: Path) -> tuple[int, ...]:
    return self._shape_table[path]

  def without(self, *paths: Path) -> GroupSpec:
    """A spec without the groups that touch any of ``paths`` (declares them unprunable).

    Their channels become fixed entries of the layers' dimensions, so FLOP counts stay right.
    """
    drop = {tuple(p) for p in paths}
    kept = [i for i, g in enumerate(self.groups)
            if not any(m.path in drop for m in g.members)]
    renumber = {old: new for new, old in enumerate(kept)}

    def dim(d: Dim) -> Dim:
      fixed, terms = d.fixed, []
      for t in d.terms:
        if t.group in renumber:
          terms.append(t._replace(group=renumber[t.group]))
        else:
          count = self.groups[t.group].size if t.channels is None else len(t.channels)
          fixed += t.multiplicity * count
      return Dim(fixed, tuple(terms))

    layers = tuple(l._replace(dims=tuple(dim(d) for d in l.dims)) for l in self.layers)
    return dataclasses.replace(self, groups=tuple(self.groups[i] for i in kept), layers=layers)

  def with_groups(self, *groups: Group) -> GroupSpec:
    """A spec with hand-declared ``groups`` added (for ops the tracer cannot read).

    The traced layer costs do not know hand-declared groups: FLOP counts treat their
    channels as unprunable.
    """
    known = dict(self.shapes)
    for g in groups:
      for m in g.members:
        if m.path not in known:
          raise ValueError(f"Declared group member {'/'.join(m.path)} is not a traced variable.")
        size = known[m.path][m.axis]
        if m.indices().max() >= size:
          raise ValueError(
              f"Declared member {'/'.join(m.path)} axis {m.axis} reaches index "
              f"{m.indices().max()} but the axis has {size} entries.")
    return dataclasses.replace(self, groups=self.groups + tuple(groups))

  def __str__(self) -> str:
    lines = [f"GroupSpec: {len(self.groups)} groups, {self.num_channels} channels"]
    lines.append(f"{'#':>4}  {'size':>5}  {'producers':>9}  {'consumers':>9}  name")
    for i, g in enumerate(self.groups):
      lines.append(f"{i:>4}  {g.size:>5}  {len(g.producers()):>9}  "
                   f"{len(g.consumers()):>9}  {g.name}")
    if self.fixed:
      lines.append("not prunable:")
      for f in self.fixed:
        part = "" if f.count == f.size else f"{f.count} of "
        lines.append(f"  {'/'.join(f.path)} axis {f.axis} ({part}{f.size} channels): "
                     + "; ".join(f.reasons))
    return "\n".join(lines)

  def describe(self) -> str:
    """Every member of every group, one per line."""
    lines = [str(self)]
    for i, g in enumerate(self.groups):
      lines.append(f"group {i} ({g.size} channels):")
      for m in g.members:
        extra = f" x{m.repeat} stride {m.repeat_stride}" if m.repeat > 1 else ""
        lines.append(f"  {m.role:<9} {'/'.join(m.path)} axis {m.axis} "
                     f"[{m.offset}:{m.offset + m.length * m.channel_stride}]{extra}")
    return "\n".join(lines)


def path_str(key_path: Sequence[Any]) -> Path:
  """A pytree key path as a tuple of strings, e.g. ``('blocks', '0', 'conv1', 'kernel')``."""
  out = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(str(k.name))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(str(k.key))
    else:
      out.append(str(k))
  return tuple(out)


# ----------------------------------------------------------------------------------------
# The label graph.

_FIXED = 0  # the label of everything that can never be pruned

# Why channels are fixed, as ``GroupSpec.fixed`` lists them.
FROM_INPUT = "comes from the model's input"
TO_OUTPUT = "reaches the model's output"
CONSTANT = "meets an array built inside the model, which surgery cannot slice"
REDUCED = "mixed by a reduction over the channel axis (e.g. normalisation statistics)"
CUMULATIVE = "mixed by a cumulative op along the channel axis"
GROUPED = "a grouped convolution ties channels across its groups"
RESHAPED = "merged with another axis by a reshape"
WITHIN_HEAD = ("a position within a head (split off a channel axis by a reshape): whole heads "
               "are pruned, each keeps its size")
ATTENTION = ("contracted between two activations (attention's q.k and p.v): the model may "
             "read the width back (1/sqrt(d)) and q, k and v need one head size; only whole "
             "heads are pruned (projections split into (..., heads, head_dim))")
REPEATED = ("one channel sits at several places of this axis beyond one repeating pattern "
            "(e.g. the heads of a fused qkv projection): it cannot be sliced as one member")
GATHERED = "indexed by a gather (e.g. an embedding's vocabulary)"
NONZERO = ("not zero when its producers are (e.g. after a sigmoid, or a normalisation "
           "without scale and bias): removing it would change what the next layer reads")
WINDOWED = "pooled or padded along the channel axis"
SLICED = "sliced along the channel axis"
Labels = tuple  # per axis: an int array of labels, or None when the axis carries no channels
Zeros = tuple  # per axis: whether a value is zero at the indices of a pruned channel


class _Graph:
  """Labels (ints) and the edges between them; components are computed once at the end."""

  def __init__(self):
    self.count = 1  # label 0 is _FIXED
    self._a: list[np.ndarray] = []
    self._b: list[np.ndarray] = []
    self.reasons: list[tuple[np.ndarray, str]] = []  # why labels were fixed, for the listing
    self._opaque: list[tuple[int, int]] = []  # label ranges born fixed by ``opaque``

  def fresh(self, n: int) -> np.ndarray:
    out = np.arange(self.count, self.count + n)
    self.count += n
    return out

  def tie(self, a: np.ndarray, b: np.ndarray) -> None:
    if a is b:
      return
    self._a.append(np.asarray(a).ravel())
    self._b.append(np.broadcast_to(b, np.shape(a)).ravel())

  def fix(self, a: np.ndarray | None, reason: str | None = None) -> None:
    """Ties labels ``a`` to the fixed label; ``reason`` says why, for ``GroupSpec.fixed``."""
    if a is not None:
      self.tie(a, np.zeros((), int))
      if reason is not None:
        self.reasons.append((np.asarray(a).ravel(), reason))

  def opaque(self, shape: Sequence[int], reason: str) -> Labels:
    """Labels for a value whose entries no parameter channel can follow (fixed, with a
    reason): a model input, a constant, the output of a frozen op."""
    out = tuple(self.fresh(n) for n in shape)
    for l in out:
      self.fix(l, reason)
      if len(l):
        self._opaque.append((int(l[0]), int(l[-1]) + 1))
    return out

  def is_opaque(self, a: np.ndarray) -> bool:
    """Whether every label of ``a`` was born fixed (carries no parameter's channel)."""
    a = np.asarray(a)
    if not self._opaque:
      return bool(np.all(a == _FIXED))
    starts, ends = map(np.asarray, zip(*self._opaque))
    i = np.searchsorted(starts, a, side="right") - 1
    inside = (i >= 0) & (a < ends[np.maximum(i, 0)])
    return bool(np.all(inside | (a == _FIXED)))

  def _edges(self) -> tuple[np.ndarray, np.ndarray]:
    a = np.concatenate(self._a) if self._a else np.zeros(0, int)
    b = np.concatenate(self._b) if self._b else np.zeros(0, int)
    return a, b

  def components(self, through_fixed: bool = True) -> np.ndarray:
    """``comp[label]``: the channel (component) of every label; ``comp[0]`` is fixed.

    With ``through_fixed=False`` the edges to the fixed label are left out, so that labels
    fixed for different reasons stay apart (to say why a channel is fixed).
    """
    a, b = self._edges()
    if not through_fixed:
      keep = (a != _FIXED) & (b != _FIXED)
      a, b = a[keep], b[keep]
    m = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(self.count, self.count))
    _, comp = connected_components(m, directed=False)
    return comp


class _Cost(NamedTuple):
  """One multiply-accumulate op: ``macs = const * prod(kept entries of each labelled dim)``."""

  name: str
  primitive: str
  const: int
  dims: tuple[np.ndarray, ...]
  op: Op | None = None
  outputs: tuple[int, ...] = ()  # which of ``dims`` are the output channels


def _plain(x: Any) -> Any:
  """``x`` as nested tuples of ints and strings (hashable, and JSON-able as lists)."""
  if isinstance(x, (tuple, list)):
    return tuple(_plain(v) for v in x)
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  return x if x is None or isinstance(x, str) else str(np.dtype(x))


def _op(eqn, params: Mapping[str, Any], axes, batch, depthwise: bool = False) -> Op:
  return Op(eqn.primitive.name, tuple((k, _plain(v)) for k, v in params.items()),
            tuple(tuple(int(n) for n in v.aval.shape) for v in eqn.invars[:2]),
            tuple(str(v.aval.dtype) for v in eqn.invars[:2]),
            tuple(tuple(a) for a in axes), tuple(batch), depthwise)


@dataclasses.dataclass
class _Trace:
  graph: _Graph
  param_labels: dict[Path, Labels]
  roles: dict[tuple[Path, int], str]
  costs: list[_Cost]
  statistic: Callable[[Path], bool]
  is_param: Callable[[Path], bool]
  on_unknown: str = "error"
  use_order: dict[Path, int] = dataclasses.field(default_factory=dict)
  splits: list[list[np.ndarray]] = dataclasses.field(default_factory=list)


# Primitives whose output is an elementwise function of operands of the output's shape
# (scalars broadcast): channel i of every operand is channel i of the output.
_ELEMENTWISE = frozenset("""
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
    real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan
    tanh xor bitcast_convert_type sharding_constraint mesh_cast reshard
    """.split())

# Call-like primitives whose body is a jaxpr taking the same operands.
_CALLS = frozenset(
    "jit pjit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr "
    "remat remat2 checkpoint custom_lin".split())

_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax "
    "argmin".split())

_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


def _is_labelled(labels: Labels) -> bool:
  return any(l is not None for l in labels)


def _none(aval) -> Labels:
  return (None,) * len(getattr(aval, "shape", ()))


def _elementwise(tr: _Trace, in_labels: list[Labels], out_ndim: int) -> Labels:
  out: list[np.ndarray | None] = [None] * out_ndim
  for labels in in_labels:
    if len(labels) != out_ndim:
      continue  # a scalar operand
    for ax, l in enumerate(labels):
      if l is None:
        continue
      if out[ax] is None:
        out[ax] = l
      else:
        tr.graph.tie(out[ax], l)
  return tuple(out)


def _record_role(tr: _Trace, origin, axis: int, role: str) -> None:
  if origin is None:
    return
  path, axis_map = origin
  param_axis = axis_map[axis]
  if param_axis is not None and tr.roles.get((path, param_axis)) != CONSUMER:
    tr.roles[(path, param_axis)] = role


def _conv(tr: _Trace, eqn, ins: list[Labels], origins) -> Labels:
  lhs, rhs = ins
  lhs_aval, rhs_aval = (v.aval for v in eqn.invars)
  out_aval = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups = eqn.params["feature_group_count"]
  if eqn.params["batch_group_count"] != 1:
    raise UnsupportedPrimitiveError("conv_general_dilated with batch_group_count > 1")
  cin = lhs_aval.shape[lhs_spec[1]]
  cout = rhs_aval.shape[rhs_spec[0]]
  x_ch, k_in, k_out = lhs[lhs_spec[1]], rhs[rhs_spec[1]], rhs[rhs_spec[0]]
  for ax in rhs_spec[2:]:
    tr.graph.fix(rhs[ax])  # kernel spatial axes are not channels
  for ax in lhs_spec[2:]:
    tr.graph.fix(lhs[ax])
  if k_out is None:
    k_out = tr.graph.fresh(cout)
  if groups == 1:
    if x_ch is not None and k_in is not None:
      tr.graph.tie(x_ch, k_in)
    elif x_ch is not None:
      tr.graph.fix(x_ch)
  elif groups == cin:
    # Depthwise: output channel j reads input channel j // multiplier.
    tr.graph.fix(k_in, GROUPED)
    if x_ch is not None:
      tr.graph.tie(np.repeat(x_ch, cout // cin), k_out)
  else:
    # Grouped convs tie channels across groups; our reading keeps them whole (unprunable).
    for l in (x_ch, k_in, k_out):
      tr.graph.fix(l, GROUPED)
  _record_role(tr, origins[1], rhs_spec[1], CONSUMER)
  _record_role(tr, origins[1], rhs_spec[0], PRODUCER)
  out: list[Any] = [None] * len(out_aval.shape)
  out[out_spec[0]] = lhs[lhs_spec[0]]
  out[out_spec[1]] = k_out
  const = lhs_aval.shape[lhs_spec[0]] * int(np.prod([out_aval.shape[a] for a in out_spec[2:]]))
  const *= int(np.prod([rhs_aval.shape[a] for a in rhs_spec[2:]]))
  dims = tuple(l if l is not None else np.full(n, _FIXED)
               for l, n in ((k_in, rhs_aval.shape[rhs_spec[1]]), (k_out, cout)))
  p = eqn.params
  static = {k: p[k] for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
                              "feature_group_count", "preferred_element_type")}
  static["dimension_numbers"] = (lhs_spec, rhs_spec, out_spec)
  depthwise = groups == cin and groups > 1
  in_axes = () if groups > 1 else ((0, lhs_spec[1], 1), (1, rhs_spec[1], 1))
  out_axes = ((1, rhs_spec[0], 1),) + (((0, lhs_spec[1], cout // cin),) if depthwise else ())
  op = _op(eqn, static, (in_axes, out_axes), ((0, lhs_spec[0]),), depthwise)
  tr.costs.append(_Cost(_origin_name(origins[1], eqn), "conv", const, dims, op, (1,)))
  return tuple(out)


def _dot_general(tr: _Trace, eqn, ins: list[Labels], origins) -> Labels:
  lhs, rhs = ins
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lshape, rshape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  for a, b in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb)):
    if lhs[a] is not None and rhs[b] is not None:
      tr.graph.tie(lhs[a], rhs[b])
  lfree = [a for a in range(len(lshape)) if a not in lc and a not in lb]
  rfree = [b for b in range(len(rshape)) if b not in rc and b not in rb]
  for origin, contract, free in ((origins[0], lc, lfree), (origins[1], rc, rfree)):
    for a in contract:
      _record_role(tr, origin, a, CONSUMER)
    for a in free:
      _record_role(tr, origin, a, PRODUCER)

  def pick(a, b=None):
    return lhs[a] if lhs[a] is not None else (rhs[b] if b is not None else None)

  out = [pick(a, b) for a, b in zip(lb, rb)] + [lhs[a] for a in lfree] + [rhs[b] for b in rfree]
  const, dims, axes, outputs = 1, [], [], []
  # The output channels are a parameter's free axes (a dense layer's kernel).
  lout, rout = origins[0] is not None, origins[1] is not None
  sized = ([(pick(a, b), lshape[a], ((0, a, 1), (1, b, 1)), False) for a, b in zip(lb, rb)]
           + [(pick(a, b), lshape[a], ((0, a, 1), (1, b, 1)), False) for a, b in zip(lc, rc)]
           + [(lhs[a], lshape[a], ((0, a, 1),), lout) for a in lfree]
           + [(rhs[b], rshape[b], ((1, b, 1),), rout) for b in rfree])
  for labels, n, where, output in sized:
    if labels is None:
      const *= n
    else:
      if output:
        outputs.append(len(dims))
      dims.append(labels)
      axes.append(where)
  batch = [(i, 0) for i, (o, contract) in enumerate(((origins[0], lc), (origins[1], rc)))
           if o is None and 0 not in contract and len(eqn.invars[i].aval.shape)]
  static = {k: eqn.params[k] for k in ("dimension_numbers", "preferred_element_type")}
  op = _op(eqn, static, axes, batch)
  name = _origin_name(origins[1] or origins[0], eqn)
  tr.costs.append(_Cost(name, "dot_general", const, tuple(dims), op, tuple(outputs)))
  return tuple(out)


def _fix_attention(tr: _Trace, eqn, ins: list[Labels]) -> None:
  """Keeps whole the channels of a contraction between two activations (q.k or p.v), but
  for its batch axes: every head is contracted on its own, so a head is a channel.

  Contracted axes are fixed (the model may scale by their width, and q, k and v must keep
  one head size); so are the free axes (v's head size must stay q's).
  """
  if eqn.primitive.name != "dot_general":
    for labels in ins[:2]:
      for l in labels:
        tr.graph.fix(l, ATTENTION)
    return
  _, (lb, rb) = eqn.params["dimension_numbers"]
  for labels, batch in zip(ins[:2], (lb, rb)):
    for a, l in enumerate(labels):
      if a not in batch:
        tr.graph.fix(l, ATTENTION)


def _origin_name(origin, eqn) -> str:
  if origin is not None:
    return "/".join(origin[0])
  return eqn.primitive.name


def _broadcast_in_dim(tr, eqn, ins, origins) -> Labels:
  (x,) = ins[:1]
  in_shape = eqn.invars[0].aval.shape
  out_shape = eqn.params["shape"]
  out: list[Any] = [None] * len(out_shape)
  for i, d in enumerate(eqn.params["broadcast_dimensions"]):
    if in_shape[i] == out_shape[d]:
      out[d] = x[i]
  return tuple(out)


def _reshape_blocks(in_shape, out_shape):
  """Pairs (in_axes, out_axes) of contiguous axis blocks with equal sizes; size-1 axes aside."""
  ins = [a for a, n in enumerate(in_shape) if n != 1]
  outs = [a for a, n in enumerate(out_shape) if n != 1]
  blocks, i, j = [], 0, 0
  while i < len(ins) and j < len(outs):
    bi, bo = [ins[i]], [outs[j]]
    pi, po = in_shape[ins[i]], out_shape[outs[j]]
    i, j = i + 1, j + 1
    while pi != po:
      if pi < po:
        bi.append(ins[i])
        pi *= in_shape[ins[i]]
        i += 1
      else:
        bo.append(outs[j])
        po *= out_shape[outs[j]]
        j += 1
    blocks.append((bi, bo))
  return blocks


def _reshape(tr, eqn, ins, origins) -> Labels:
  (x,) = ins[:1]
  if eqn.params.get("dimensions") is not None:
    raise UnsupportedPrimitiveError("reshape with dimensions")
  in_shape = eqn.invars[0].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  out: dict[int, Any] = {}
  for bi, bo in _reshape_blocks(in_shape, out_shape):
    if all(x[a] is None for a in bi):
      continue  # uniform stays uniform
    labelled = [a for a in bi if x[a] is not None and not tr.graph.is_opaque(x[a])]
    if len(bi) == 1 and len(bo) == 1:
      out[bo[0]] = x[bi[0]]
    elif not labelled:  # positions only (spatial, batch): no channel to follow
      for a in bo:
        out[a] = tr.graph.opaque((out_shape[a],), RESHAPED)[0]
    elif len(bo) == 1 and len(labelled) == 1:
      # A flatten: every index of the merged axis carries its one labelled axis' label.
      grid = np.zeros([in_shape[a] for a in bi], int)
      k = bi.index(labelled[0])
      shape = [1] * len(bi)
      shape[k] = in_shape[labelled[0]]
      out[bo[0]] = (grid + x[labelled[0]].reshape(shape)).ravel()
    elif len(bi) == 1 and len(bo) > 1:
      out.update(_split_axis(tr, x[bi[0]], bo, out_shape))
    else:
      # Merging two labelled axes (or a split across axes): keep these channels whole,
      # and the new axes opaque (fixed), so that nothing they meet can be pruned alone.
      for a in labelled:
        tr.graph.fix(x[a], RESHAPED)
      for a in bo:
        out[a] = tr.graph.opaque((out_shape[a],), RESHAPED)[0]
  return tuple(out.get(a) for a in range(len(out_shape)))


def _split_axis(tr: _Trace, labels: np.ndarray, axes: list[int],
                out_shape: Sequence[int]) -> dict[int, np.ndarray]:
  """Labels of the new ``axes`` a reshape splits one channel axis into.

  When the labels vary along one new axis only (an earlier flatten undone, e.g. heads
  merged with the batch and split again), that axis takes them. Otherwise it is a split
  into heads, ``(..., H * d) -> (..., H, d)``: one channel per index of the outermost new
  axis (a head), tied to all its entries; the inner axes are positions within a head,
  never pruned, so every head keeps its size.
  """
  grid = np.asarray(labels).reshape([out_shape[a] for a in axes])
  for k, axis in enumerate(axes):
    along = np.moveaxis(grid, k, 0).reshape(out_shape[axis], -1)
    if np.all(along == along[:, :1]):
      out = {a: tr.graph.opaque((out_shape[a],), RESHAPED)[0] for a in axes}
      out[axis] = along[:, 0]
      return out
  outer, inner = axes[0], axes[1:]
  heads = tr.graph.fresh(out_shape[outer])
  tr.graph.tie(np.repeat(heads, grid[0].size), labels)
  out = {a: tr.graph.opaque((out_shape[a],), WITHIN_HEAD)[0] for a in inner}
  out[outer] = heads
  return out


def _transpose(tr, eqn, ins, origins) -> Labels:
  return tuple(ins[0][p] for p in eqn.params["permutation"])


def _squeeze(tr, eqn, ins, origins) -> Labels:
  dims = {d % len(ins[0]) for d in eqn.params["dimensions"]}
  return tuple(l for a, l in enumerate(ins[0]) if a not in dims)


def _rev(tr, eqn, ins, origins) -> Labels:
  return tuple(l[::-1] if (l is not None and a in eqn.params["dimensions"]) else l
               for a, l in enumerate(ins[0]))


def _reduction(tr, eqn, ins, origins) -> Labels:
  axes = set(eqn.params["axes"])
  for a in axes:
    tr.graph.fix(ins[0][a], REDUCED)  # a reduction over channels mixes them: keep them whole
  return tuple(l for a, l in enumerate(ins[0]) if a not in axes)


def _cumulative(tr, eqn, ins, origins) -> Labels:
  tr.graph.fix(ins[0][eqn.params["axis"]], CUMULATIVE)
  return ins[0]


def _reduce_window(tr, eqn, ins, origins) -> Labels:
  p = eqn.params
  n = len(p["window_dimensions"])
  out: list[Any] = []
  for a in range(n):
    identity = (p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1
                and tuple(p["padding"][a]) == (0, 0) and p["base_dilation"][a] == 1)
    labels = ins[0][a]
    if identity:
      out.append(labels)
    else:
      tr.graph.fix(labels, WINDOWED)
      out.append(tr.graph.opaque((eqn.outvars[0].aval.shape[a],), WINDOWED)[0])
  return tuple(out)


def _concatenate(tr, eqn, ins, origins) -> Labels:
  d = eqn.params["dimension"]
  out = list(_elementwise(tr, [tuple(None if a == d else l for a, l in enumerate(x))
                               for x in ins], len(ins[0])))
  parts = []
  for x, v in zip(ins, eqn.invars):
    parts.append(x[d] if x[d] is not None else np.full(v.aval.shape[d], _FIXED))
  out[d] = np.concatenate(parts)
  return tuple(out)


def _pad(tr, eqn, ins, origins) -> Labels:
  out = []
  for labels, (lo, hi, interior) in zip(ins[0], eqn.params["padding_config"]):
    if (lo, hi, interior) == (0, 0, 0):
      out.append(labels)
    elif labels is not None and interior == 0 and lo >= 0 and hi >= 0:
      out.append(np.concatenate([np.full(lo, _FIXED), labels, np.full(hi, _FIXED)]))
    else:
      tr.graph.fix(labels, WINDOWED)
      out.append(tr.graph.opaque((eqn.outvars[0].aval.shape[len(out)],), WINDOWED)[0])
  return tuple(out)


def _slice(tr, eqn, ins, origins) -> Labels:
  # Static bounds select channels by position: after pruning they would select others.
  p = eqn.params
  strides = p["strides"] or (1,) * len(ins[0])
  out = []
  for l, s, e, st in zip(ins[0], p["start_indices"], p["limit_indices"], strides):
    if l is not None and (s, e, st) != (0, len(l), 1):
      tr.graph.fix(l, SLICED)
      l = tr.graph.opaque((len(range(s, e, st)),), SLICED)[0]
    out.append(l)
  return tuple(out)


def _split(tr, eqn, ins, origins) -> list[Labels]:
  """Equal sections (``jnp.split(x, k)``, as in a GLU) follow their channels; whether pruning
  keeps them equal is checked once the channels are known (``_check_splits``). Unequal
  sections have static sizes that pruning would break: their channels are fixed."""
  axis, sizes = eqn.params["axis"], [int(n) for n in eqn.params["sizes"]]
  l = ins[0][axis]
  if l is not None and len(set(sizes)) == 1:
    starts = np.cumsum([0] + sizes[:-1])
    sections = [l[s:s + n] for s, n in zip(starts, sizes)]
    tr.splits.append(sections)
    return [tuple(sec if a == axis else m for a, m in enumerate(ins[0])) for sec in sections]
  tr.graph.fix(l, SLICED)
  outs = []
  for n in sizes:
    outs.append(tuple(l if (a != axis or l is None) else tr.graph.opaque((int(n),), SLICED)[0]
                      for a, l in enumerate(ins[0])))
  return outs


def _dynamic_slice(tr, eqn, ins, origins) -> Labels:
  shape = eqn.invars[0].aval.shape
  out = []
  for a, (l, n) in enumerate(zip(ins[0], eqn.params["slice_sizes"])):
    if l is not None and n != shape[a]:
      tr.graph.fix(l, SLICED)
      l = tr.graph.opaque((n,), SLICED)[0]
    out.append(l)
  return tuple(out)


def _gather_axes(eqn) -> list[int | None]:
  """For every axis of a gather's output, the operand axis it slices whole (``None`` for an
  axis of the indices, or a partial slice)."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  shape = eqn.invars[0].aval.shape
  offset = [a for a in range(len(shape))
            if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims]
  out: list[int | None] = [None] * len(eqn.outvars[0].aval.shape)
  for a, d in zip(offset, dn.offset_dims):
    if a not in dn.start_index_map and sizes[a] == shape[a]:
      out[d] = a
  return out


def _gather(tr, eqn, ins, origins) -> Labels:
  """A lookup (an embedding, ``take_along_axis``): the operand's axes that are sliced whole
  keep their channels; the indexed axes are fixed (which entries are read depends on the
  data); the other output axes are the indices' (or the operand's batching axes, tied)."""
  operand, indices = ins[:2]
  dn = eqn.params["dimension_numbers"]
  out_shape = eqn.outvars[0].aval.shape
  whole = _gather_axes(eqn)
  out: list[Any] = [None] * len(out_shape)
  for a, l in enumerate(operand):
    if a not in whole and a not in dn.operand_batching_dims:
      tr.graph.fix(l, GATHERED)
  batch_axes = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
  for i, d in zip(range(len(indices) - 1), batch_axes):  # the last axis holds the indices
    out[d] = indices[i]
    if i in dn.start_indices_batching_dims:
      a = dn.operand_batching_dims[list(dn.start_indices_batching_dims).index(i)]
      if out[d] is None:
        out[d] = operand[a]
      elif operand[a] is not None:
        tr.graph.tie(out[d], operand[a])
  for d in dn.offset_dims:
    a = whole[d]
    if a is not None:
      out[d] = operand[a]
    elif any(l is not None for l in operand):
      out[d] = tr.graph.opaque((out_shape[d],), GATHERED)[0]
  return tuple(out)


_RULES: dict[str, Callable[..., Any]] = {
    "gather": _gather,
    "conv_general_dilated": _conv,
    "dot_general": _dot_general,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "rev": _rev,
    "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
    "reduce_window_min": _reduce_window,
    "reduce_window": _reduce_window,
    "concatenate": _concatenate,
    "pad": _pad,
    "slice": _slice,
    "split": _split,
    "dynamic_slice": _dynamic_slice,
    "optimization_barrier": lambda tr, eqn, ins, origins: list(ins),
}
_RULES.update({name: _reduction for name in _REDUCTIONS})
_RULES.update({name: _cumulative for name in _CUMULATIVE})

# Ops that keep a value uniform along an axis (``None`` labels: the same at every index) when
# every operand is; any other op on such operands may build a varying array (``iota``).
_UNIFORM_KEEPING = _ELEMENTWISE | _REDUCTIONS | frozenset(
    "broadcast_in_dim reshape transpose squeeze expand_dims rev slice".split())

# Contractions: when both operands come from the model's inputs, their channels are fixed.
_CONTRACTIONS = frozenset(("dot_general", "conv_general_dilated"))

# Zero at a pruned channel stays zero through these (f(0) = 0, elementwise on one operand).
_ZERO_KEEPING = frozenset("""
    abs asin asinh atan atanh cbrt ceil convert_element_type copy copy_p erf erf_inv expm1
    floor imag log1p neg real reduce_precision round sign sin sinh sqrt square stop_gradient
    tan tanh bitcast_convert_type sharding_constraint mesh_cast reshard transpose squeeze rev
    slice dynamic_slice reduce_sum reduce_max reduce_min reduce_window_sum reduce_window_max
    reduce_window_min cumsum cummax cummin optimization_barrier
    """.split())

# Ops through which a parameter keeps its identity, so a conv or dense layer downstream still
# knows which parameter axis it contracts (for member roles).
_ORIGIN_KEEPING = frozenset("convert_element_type copy copy_p reduce_precision".split())


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr
    if isinstance(sub, jcore.Jaxpr):
      return sub
  return None


def _literal(v) -> float | None:
  """The value of a scalar literal operand, else None."""
  if isinstance(v, jcore.Literal) and np.ndim(v.val) == 0:
    return float(v.val)
  return None


def _zeros_out(tr: _Trace, eqn, ins: list[Labels], zin: list[Zeros],
               known_zero: list[bool]) -> list[Zeros]:
  """Per output and axis: whether the output is zero at the indices of that axis whose
  channel is pruned (its producer slices zero), given the same of the operands (``zin``)
  and which operands are zero everywhere (``known_zero``).

  Unknown ops give ``False``, so that the channels they pass are fixed where a layer reads
  them (``_check_zero``).
  """
  name = eqn.primitive.name
  ndims = [len(getattr(v.aval, "shape", ())) for v in eqn.outvars]
  unknown = [(False,) * n for n in ndims]
  nd = ndims[0] if ndims else 0
  lits = [_literal(v) for v in eqn.invars]

  def at(i: int, ax: int) -> bool:  # operand i is zero at a pruned channel of axis ax
    l = ins[i][ax]
    # An opaque axis holds no prunable channel (whatever meets it is fixed): vacuously so.
    return known_zero[i] or (l is not None and (zin[i][ax] or tr.graph.is_opaque(l)))

  same = [i for i, l in enumerate(ins) if len(l) == nd]
  scalars = [i for i in range(len(ins)) if i not in same]
  if name in _ZERO_KEEPING or (name == "integer_pow" and eqn.params["y"] > 0):
    if name == "transpose":
      return [tuple(zin[0][p] for p in eqn.params["permutation"])]
    if name in _REDUCTIONS:
      axes = set(eqn.params["axes"])
      return [tuple(z for a, z in enumerate(zin[0]) if a not in axes)]
    if name == "squeeze":
      dims = {d % len(zin[0]) for d in eqn.params["dimensions"]}
      return [tuple(z for a, z in enumerate(zin[0]) if a not in dims)]
    if len(ndims) == 1 and nd == len(zin[0]):
      return [zin[0]]
    return unknown
  if name == "mul":  # zero where any factor is
    if any(known_zero[i] or lits[i] == 0.0 for i in scalars):
      return [(True,) * nd]
    return [tuple(any(at(i, ax) for i in same) for ax in range(nd))]
  if name == "div" and 0 in same:
    return [tuple(at(0, ax) for ax in range(nd))]
  if name in ("add", "add_any", "sub", "max", "min", "select_n", "clamp"):
    if name == "clamp":  # clamp(lo, x, hi) with lo <= 0 <= hi keeps a zero
      lo, hi = lits[0], lits[2]
      if len(ins[1]) != nd or lo is None or hi is None or not lo <= 0.0 <= hi:
        return unknown
      operands = [1]
    else:
      operands = [i for i in same if not (name == "select_n" and i == 0)]
      for i in scalars:  # a scalar operand must keep zero at zero
        lit = lits[i]
        keeps = (known_zero[i] or lit == 0.0
                 or (name == "max" and lit is not None and lit <= 0.0)
                 or (name == "min" and lit is not None and lit >= 0.0))
        if not keeps and not (name == "select_n" and i == 0):
          return unknown
    return [tuple(all(at(i, ax) for i in operands) for ax in range(nd))]
  if name == "dot_general":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lfree = [a for a in range(len(ins[0])) if a not in lc and a not in lb]
    rfree = [b for b in range(len(ins[1])) if b not in rc and b not in rb]
    return [tuple([at(0, a) or at(1, b) for a, b in zip(lb, rb)] + [at(0, a) for a in lfree]
                  + [at(1, b) for b in rfree])]
  if name == "conv_general_dilated":
    dn = eqn.params["dimension_numbers"]
    out = [False] * nd
    out[dn.out_spec[0]] = at(0, dn.lhs_spec[0])
    out[dn.out_spec[1]] = at(1, dn.rhs_spec[0])
    return [tuple(out)]
  if name == "broadcast_in_dim":
    out = [known_zero[0]] * nd
    shape_in = eqn.invars[0].aval.shape
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
      if shape_in[i] == eqn.outvars[0].aval.shape[d]:
        out[d] = at(0, i)
    return [tuple(out)]
  if name == "reshape":
    out = [known_zero[0]] * nd
    shape_in, shape_out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    for bi, bo in _reshape_blocks(shape_in, shape_out):
      channels = [a for a in bi if ins[0][a] is not None and not tr.graph.is_opaque(ins[0][a])]
      for a in bo:
        out[a] = all(at(0, c) for c in channels) if channels else known_zero[0]
    return [tuple(out)]
  if name == "concatenate":
    return [tuple(all(at(i, ax) for i in same) for ax in range(nd))]
  if name == "pad":
    if not (known_zero[1] or lits[1] == 0.0):
      return unknown
    return [zin[0]]
  if name == "split":
    return [zin[0]] * len(ndims)
  if name == "gather":  # zero along the axes sliced whole where the operand is
    return [tuple(a is not None and at(0, a) for a in _gather_axes(eqn))]
  return unknown


def _check_zero(tr: _Trace, eqn, ins: list[Labels], zin: list[Zeros], origins) -> None:
  """Fixes the channels a layer contracts that are not zero when pruned: removing them
  would change what the layer computes (surgery is exact only for channels that are)."""
  name = eqn.primitive.name
  if name == "dot_general":
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contracted = [(0, a) for a in lc] + [(1, b) for b in rc]
  elif name == "conv_general_dilated":
    contracted = [(0, eqn.params["dimension_numbers"].lhs_spec[1])]
  else:
    return
  for i, ax in contracted:
    l = ins[i][ax]
    if origins[i] is None and l is not None and not zin[i][ax] and not tr.graph.is_opaque(l):
      tr.graph.fix(l, NONZERO)


def _propagate(tr: _Trace, jaxpr, in_labels: list[Labels], in_origins: list,
               rules: Mapping[str, Callable[..., Any]], in_data: Sequence[bool],
               in_zeros: Sequence[Zeros]):
  """Labels every value of ``jaxpr``; returns the outputs' labels, origins, data flags and
  zero flags.

  ``in_data`` says which inputs depend on the model's inputs (not only on parameters);
  ``in_zeros``, per input and axis, whether the input is zero at the indices of a pruned
  channel (parameters: yes; statistics and inputs: no). Zero flags follow the values
  (``_zeros_out``) so that a layer reading a pruned channel that is not zero (after a
  sigmoid, say) fixes it (``_check_zero``).
  """
  env: dict[Any, Labels] = {}
  origin: dict[Any, Any] = {}
  data: set[Any] = set()
  zeros: dict[Any, Zeros] = {}
  known_zero: set[Any] = set()
  for v, labels, o, d, z in zip(jaxpr.invars, in_labels, in_origins, in_data, in_zeros):
    env[v] = labels
    zeros[v] = tuple(z)
    if o is not None:
      origin[v] = o
    if d:
      data.add(v)
  for v in jaxpr.constvars:
    env[v] = tr.graph.opaque(getattr(v.aval, "shape", ()), CONSTANT)
    zeros[v] = (False,) * len(env[v])

  def read(v) -> Labels:
    if isinstance(v, jcore.Literal):
      return _none(v.aval)
    return env[v]

  def read_zeros(v) -> Zeros:
    if isinstance(v, jcore.Literal):
      return (False,) * len(getattr(v.aval, "shape", ()))
    return zeros[v]

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    origins = [None if isinstance(v, jcore.Literal) else origin.get(v) for v in eqn.invars]
    on_data = [not isinstance(v, jcore.Literal) and v in data for v in eqn.invars]
    if any(on_data):
      data.update(eqn.outvars)
    name = eqn.primitive.name
    for o in origins:
      if o is not None:
        tr.use_order.setdefault(o[0], len(tr.use_order))
    zin = [read_zeros(v) for v in eqn.invars]
    kz = [not isinstance(v, jcore.Literal) and v in known_zero for v in eqn.invars]
    given_zeros = None  # zero flags a call's body or a user's rule gives its outputs
    if name in _CONTRACTIONS and all(on_data[:2]):
      _fix_attention(tr, eqn, ins)
    _check_zero(tr, eqn, ins, zin, origins)
    if not any(_is_labelled(l) for l in ins) and name in _UNIFORM_KEEPING:
      outs = [_none(v.aval) for v in eqn.outvars]
    elif not any(_is_labelled(l) for l in ins) and name not in _CALLS:
      outs = [tr.graph.opaque(getattr(v.aval, "shape", ()), CONSTANT) for v in eqn.outvars]
    elif name in rules:
      res = rules[name](tr, eqn, ins, origins)
      outs = res if isinstance(res, list) else [res]
      if name not in _RULES:  # a user's rule is trusted to keep zero where its operands do
        z = all(all(zs) for zs, l in zip(zin, ins) if _is_labelled(l))
        given_zeros = [(z,) * len(labels) for labels in outs]
    elif name in _ELEMENTWISE:
      res = _elementwise(tr, ins, len(eqn.outvars[0].aval.shape))
      outs = [res] * len(eqn.outvars)
      if name in _ORIGIN_KEEPING and origins[0] is not None:
        origin[eqn.outvars[0]] = origins[0]
    elif name in _CALLS and (sub := _sub_jaxpr(eqn)) is not None:
      outs, sub_origins, sub_data, given_zeros = _propagate(tr, sub, ins, origins, rules,
                                                            on_data, zin)
      for v, o, d in zip(eqn.outvars, sub_origins, sub_data):
        if o is not None:
          origin[v] = o
        if not d:
          data.discard(v)
    elif tr.on_unknown == "freeze":
      outs = _freeze_rule(tr, eqn, ins, origins)
      outs = outs if isinstance(outs, list) else [outs]
    else:
      involved = sorted({"/".join(o[0]) for o in origins if o is not None}
                        | _params_reaching(tr, ins))
      raise UnsupportedPrimitiveError(
          f"Cannot trace channel groups through primitive '{name}' "
          f"(operand shapes {[tuple(getattr(v.aval, 'shape', ())) for v in eqn.invars]}"
          + (f", parameters {involved}" if involved else "") + "). "
          "Pass rules={'" + name + "': rule} to trace_groups to teach the tracer, "
          "on_unknown='freeze' to keep every channel that reaches it unprunable, "
          "or declare groups by hand with GroupSpec.with_groups.")
    for v, labels in zip(eqn.outvars, outs):
      env[v] = tuple(labels)
    out_zeros = given_zeros or _zeros_out(tr, eqn, ins, zin, kz)
    for v, z in zip(eqn.outvars, out_zeros):
      zeros[v] = tuple(z)
    if name in ("broadcast_in_dim", "convert_element_type", "reshape") and (
        kz[0] or _literal(eqn.invars[0]) == 0.0):
      known_zero.add(eqn.outvars[0])  # zeros_like and friends
    if name in ("transpose",) and origins[0] is not None:
      path, amap = origins[0]
      origin[eqn.outvars[0]] = (path, tuple(amap[p] for p in eqn.params["permutation"]))
  return ([read(v) for v in jaxpr.outvars],
          [None if isinstance(v, jcore.Literal) else origin.get(v) for v in jaxpr.outvars],
          [not isinstance(v, jcore.Literal) and v in data for v in jaxpr.outvars],
          [read_zeros(v) for v in jaxpr.outvars])


def _params_reaching(tr: _Trace, ins: list[Labels]) -> set[str]:
  """The parameters whose channels an op's operands carry (for error messages)."""
  carried = [l for labels in ins for l in labels if l is not None]
  if not carried:
    return set()
  carried = np.setdiff1d(np.concatenate(carried), [_FIXED])
  return {"/".join(path) for path, labels in tr.param_labels.items()
          if any(l is not None and np.isin(l, carried).any() for l in labels)}


def _freeze_rule(tr, eqn, ins, origins):
  """Fixes every channel that reaches the op, and every channel that comes out of it."""
  reason = f"passes through '{eqn.primitive.name}', frozen by on_unknown='freeze'"
  for labels in ins:
    for l in labels:
      tr.graph.fix(l, reason)
  outs = [tr.graph.opaque(getattr(v.aval, "shape", ()), reason) for v in eqn.outvars]
  return outs if len(outs) > 1 else outs[0]


# ----------------------------------------------------------------------------------------
# From labels to groups.


def _compress(seq: np.ndarray) -> tuple[np.ndarray, int, int, int]:
  """Finds the tiled (NHWC flatten) or repeated (NCHW / depthwise multiplier) pattern.

  Returns ``(base, channel_stride, repeat, repeat_stride)`` with ``seq[idx] == base`` for
  ``idx = arange(len(base)) * channel_stride + r * repeat_stride``.
  """
  n = len(seq)
  for p in range(1, n):
    if n % p == 0 and np.array_equal(seq, np.tile(seq[:p], n // p)):
      return seq[:p], 1, n // p, p
  for k in range(n, 1, -1):
    if n % k == 0 and np.all(seq.reshape(-1, k) == seq[::k, None]):
      return seq[::k], k, k, 1
  return seq, 1, 1, 0


def _build_spec(tr: _Trace, comp: np.ndarray, shapes: dict[Path, tuple[int, ...]]):
  fixed = comp[_FIXED]
  # Every parameter axis that holds prunable channels is a sequence of components.
  seqs = []  # (path, axis, base, channel_stride, repeat, repeat_stride)
  for path, labels in tr.param_labels.items():
    for axis, l in enumerate(labels):
      if l is None:
        continue
      roots = comp[l]
      if np.all(roots == fixed):
        continue
      base, cs, rep, rs = _compress(roots)
      seqs.append((path, axis, base, cs, rep, rs))
  # A channel that sits twice in one sequence cannot be sliced consistently: keep it whole.
  bad = set()
  for _, _, base, *_ in seqs:
    vals, counts = np.unique(base[base != fixed], return_counts=True)
    bad.update(vals[counts > 1].tolist())
  end, start = -1, -2
  nxt: dict[int, set[int]] = {}
  prv: dict[int, set[int]] = {}
  for si, (_, _, base, *_) in enumerate(seqs):
    for pos, c in enumerate(base.tolist()):
      if c == fixed or c in bad:
        continue
      after = base[pos + 1] if pos + 1 < len(base) else end
      before = base[pos - 1] if pos > 0 else start
      nxt.setdefault(c, set()).add(int(after))
      prv.setdefault(c, set()).add(int(before))
  link = {}
  for c, after in nxt.items():
    if len(after) == 1:
      (b,) = after
      if b >= 0 and b != fixed and b not in bad and prv.get(b) == {c}:
        link[c] = b
  linked = set(link.values())
  heads = [c for c in nxt if c not in linked]
  chains = []
  for h in heads:
    chain, c = [h], h
    while c in link and len(chain) <= len(nxt):
      c = link[c]
      chain.append(c)
    chains.append(chain)
  groups = []
  for gi, chain in enumerate(chains):
    members = []
    for path, axis, base, cs, rep, rs in seqs:
      hits = np.nonzero(base == chain[0])[0]
      if len(hits) == 0:
        continue
      pos = int(hits[0])
      role = STATISTIC if tr.statistic(path) else tr.roles.get((path, axis), PRODUCER)
      members.append(Member(path, axis, pos * cs, len(chain), role, cs, rep, rs))
    members.sort(key=lambda m: (tr.use_order.get(m.path, len(tr.use_order)), m.path, m.axis))
    if any(m.role == PRODUCER for m in members):
      groups.append(Group(len(chain), tuple(members)))
  # Forward order: a group comes where its first producer is first used.
  order = lambda g: min(tr.use_order.get(m.path, len(tr.use_order)) for m in g.producers())
  groups.sort(key=order)
  layers = _layers(tr, comp, groups)
  params = tuple(sorted(p for p in shapes if tr.is_param(p)))
  return GroupSpec(tuple(groups), tuple(sorted(shapes.items())), params, layers)


def _layers(tr: _Trace, comp: np.ndarray, groups: list[Group]) -> tuple[Layer, ...]:
  """The traced MAC costs, each channel dimension expressed in groups' channels."""
  group_of = np.full(comp.max() + 1, -1)
  channel_of = np.zeros(comp.max() + 1, int)
  for gi, g in enumerate(groups):
    m = g.members[0]
    comps = comp[tr.param_labels[m.path][m.axis][m.indices()[:, 0]]]
    group_of[comps] = gi
    channel_of[comps] = np.arange(g.size)
  # Channels that several layers' outputs share were joined by an elementwise op (a
  # depthwise conv's output channels are its input's: it joins nothing).
  out_comps = [set(comp[np.concatenate([cost.dims[i] for i in cost.outputs])].tolist())
               - {comp[_FIXED]} if cost.outputs else set() for cost in tr.costs]
  producers = collections.Counter(
      c for cost, comps in zip(tr.costs, out_comps)
      if not (cost.op is not None and cost.op.depthwise) for c in comps)
  layers = []
  for cost, comps in zip(tr.costs, out_comps):
    op = cost.op
    if op is not None and any(producers[c] > 1 for c in comps):
      op = op._replace(joined=True)
    dims = []
    for labels in cost.dims:
      c = comp[labels]
      gs = group_of[c]
      terms = []
      for gi in np.unique(gs[gs >= 0]).tolist():
        chans, counts = np.unique(channel_of[c[gs == gi]], return_counts=True)
        if len(chans) == groups[gi].size and np.all(counts == counts[0]):
          terms.append(Term(gi, None, int(counts[0])))
        else:
          for ch, n in zip(chans.tolist(), counts.tolist()):
            terms.append(Term(gi, (ch,), n))
      dims.append(Dim(int(np.sum(gs < 0)), tuple(terms)))
    layers.append(Layer(cost.name, cost.primitive, int(cost.const), tuple(dims), op))
  return tuple(layers)


def _check_splits(tr: _Trace, comp: np.ndarray) -> bool:
  """Fixes the channels of every equal split whose sections pruning could make unequal.

  The model splits by a count (``jnp.split(x, 2)``) or by static sizes; both stay right
  only when every channel has as many entries in each section. Returns whether any split
  was fixed (the components must then be recomputed).
  """
  changed = False
  for sections in tr.splits:
    counts = [dict(zip(*np.unique(comp[sec], return_counts=True))) for sec in sections]
    for c in counts:
      c.pop(comp[_FIXED], None)
    if any(c != counts[0] for c in counts[1:]):
      for sec in sections:
        tr.graph.fix(sec, SLICED)
      changed = True
  return changed


def _check_repeats(tr: _Trace, comp: np.ndarray) -> bool:
  """Fixes the channels that sit at several places of one parameter axis beyond a tiled or
  repeated pattern (``_compress``): no slice removes them consistently. Returns whether any
  was fixed (the components must then be recomputed)."""
  changed = False
  fixed = comp[_FIXED]
  for path, labels in tr.param_labels.items():
    for l in labels:
      if l is None:
        continue
      base = _compress(comp[l])[0]
      vals, counts = np.unique(base[base != fixed], return_counts=True)
      twice = vals[counts > 1]
      if len(twice):
        tr.graph.fix(l[np.isin(comp[l], twice)], REPEATED)
        changed = True
  return changed


def _fixed_reasons(tr: _Trace, comp: np.ndarray) -> tuple[Fixed, ...]:
  """Every parameter axis with channels that cannot be pruned, and why.

  A channel is fixed when its component reaches the fixed label; the reasons are those of
  the fixes it reaches without passing through the fixed label. Axes fixed without a
  recorded reason (a kernel's spatial axes) are not listed.
  """
  if not tr.graph.reasons:
    return ()
  local = tr.graph.components(through_fixed=False)
  why: dict[int, list[str]] = {}
  for labels, reason in tr.graph.reasons:
    for c in np.unique(local[labels]).tolist():
      if reason not in why.setdefault(c, []):
        why[c].append(reason)
  out = []
  for path, labels in tr.param_labels.items():
    if tr.statistic(path):
      continue
    for axis, l in enumerate(labels):
      if l is None:
        continue
      fixed = comp[l] == comp[_FIXED]
      reasons: list[str] = []
      for c in np.unique(local[l[fixed]]).tolist():
        reasons += [r for r in why.get(c, ()) if r not in reasons]
      if reasons:
        out.append(Fixed(path, axis, int(fixed.sum()), int(len(l)), tuple(reasons)))
  return tuple(out)


def _trace(apply_fn, variables, inputs, *, is_statistic, is_param=None, rules=None,
           on_unknown="error"):
  if on_unknown not in ("error", "freeze"):
    raise ValueError(f"on_unknown must be 'error' or 'freeze', got {on_unknown!r}.")
  flat, _ = jax.tree_util.tree_flatten_with_path(variables)
  paths = [path_str(k) for k, _ in flat]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables)
  abstract_inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), inputs)
  closed = jax.make_jaxpr(apply_fn)(abstract, *abstract_inputs)
  jaxpr = closed.jaxpr
  graph = _Graph()
  all_rules = {**_RULES, **(rules or {})}
  if is_param is None:
    is_param = lambda p: not is_statistic(p)
  tr = _Trace(graph, {}, {}, [], is_statistic, is_param, on_unknown)
  n_vars = len(paths)
  in_labels, in_origins = [], []
  used = _used_vars(jaxpr)
  for i, v in enumerate(jaxpr.invars):
    shape = v.aval.shape
    if i < n_vars:
      labels = tuple(graph.fresh(n) for n in shape)
      if v in used:
        tr.param_labels[paths[i]] = labels
      in_origins.append((paths[i], tuple(range(len(shape)))))
    else:
      labels = graph.opaque(shape, FROM_INPUT)
      in_origins.append(None)
    in_labels.append(labels)
  in_data = [i >= n_vars for i in range(len(jaxpr.invars))]
  # Parameters are zero at a pruned channel (zero_channels zeroes the producer slices, and
  # consumer slices are contracted away); statistics and the inputs are not.
  in_zeros = [(i < n_vars and not is_statistic(paths[i]),) * len(v.aval.shape)
              for i, v in enumerate(jaxpr.invars)]
  outs, _, _, _ = _propagate(tr, jaxpr, in_labels, in_origins, all_rules, in_data, in_zeros)
  for labels in outs:
    for l in labels:
      graph.fix(l, TO_OUTPUT)  # channels that reach the outputs are not prunable
  shapes = {p: tuple(np.shape(x)) for p, (_, x) in zip(paths, flat)}
  comp = graph.components()
  if _check_splits(tr, comp):
    comp = graph.components()
  if _check_repeats(tr, comp):
    comp = graph.components()
  spec = _build_spec(tr, comp, shapes)
  return dataclasses.replace(spec, fixed=_fixed_reasons(tr, comp))


def _used_vars(jaxpr) -> set:
  used = set()
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  used.update(v for v in jaxpr.outvars if not isinstance(v, jcore.Literal))
  return used


def _default_is_statistic(path: Path) -> bool:
  return any(p in ("batch_stats", "mean", "var") for p in path)


def trace_groups_fn(apply_fn: Callable[..., Any], variables: Any, *example_inputs: Any,
                    is_statistic: Callable[[Path], bool] = _default_is_statistic,
                    rules: Mapping[str, Callable[..., Any]] | None = None,
                    on_unknown: str = "error") -> GroupSpec:
  """Finds the coupled channel groups of ``apply_fn(variables, *example_inputs)``.

  Works for any pure function: a Linen module's ``apply``, a plain function, or an NNX module
  through ``nnx.merge``. The function should run in eval mode (BatchNorm from running
  statistics) so that the statistics are coupled to their channels.

  Args:
    apply_fn: ``apply_fn(variables, *inputs) -> outputs``.
    variables: the variables pytree (arrays or ``jax.ShapeDtypeStruct``); member paths are its
      key paths as strings.
    *example_inputs: example inputs; only shapes and dtypes are used.
    is_statistic: which variable paths hold statistics (BatchNorm mean/var): they are sliced
      with their channel but are neither producers nor consumers.
    rules: extra or overriding rules, ``{primitive_name: rule(trace, eqn, in_labels, origins)}``;
      a rule's op is trusted to give zero where its operands are zero at a pruned channel.
    on_unknown: ``'error'`` (default) raises on a primitive the tracer does not know;
      ``'freeze'`` keeps every channel that reaches it unprunable.

  Returns:
    The model's ``GroupSpec``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> def mlp(v, x):
    ...   h = jax.nn.relu(x @ v['w1'] + v['b1'])
    ...   return h @ v['w2']
    >>> v = {'w1': jnp.zeros((4, 16)), 'b1': jnp.zeros(16), 'w2': jnp.zeros((16, 3))}
    >>> spec = trace_groups_fn(mlp, v, jnp.zeros((2, 4)))
    >>> [(m.path, m.axis, m.role) for m in spec.groups[0].members]
    [(('w1',), 1, 'producer'), (('b1',), 0, 'producer'), (('w2',), 0, 'consumer')]
  """
  return _trace(apply_fn, variables, example_inputs, is_statistic=is_statistic,
                rules=rules, on_unknown=on_unknown)


def nnx_apply(model) -> tuple[Callable[..., Any], Any, Callable[[Path], bool],
                            Callable[[Path], bool]]:
  """``(apply_fn, variables, is_statistic, is_param)`` for an NNX module, in eval mode.

  ``variables`` is the module's full state as a pure dict (paths are module attribute paths),
  and ``apply_fn(variables, *inputs)`` merges it into an eval-mode copy of the module. The
  input module is not changed.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  eval_model = nnx.merge(graphdef, state)
  eval_model.eval()
  eval_graphdef, eval_state = nnx.split(eval_model)
  variables = nnx.to_pure_dict(eval_state)
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  stat_paths = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(stats)[0]}
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  param_paths = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]}

  def apply_fn(pure, *inputs):
    st = jax.tree.map(lambda x: x, eval_state)  # a copy: replace_by_pure_dict writes in place
    nnx.replace_by_pure_dict(st, pure)
    return nnx.merge(eval_graphdef, st)(*inputs)

  return apply_fn, variables, stat_paths.__contains__, param_paths.__contains__


def trace_groups(model, *example_inputs: Any,
                 rules: Mapping[str, Callable[..., Any]] | None = None,
                 on_unknown: str = "error") -> GroupSpec:
  """Finds the coupled channel groups of an NNX module (traced in eval mode).

  Member paths are the module's attribute paths, e.g. ``('blocks', '0', 'conv1', 'kernel')``,
  as in ``nnx.to_pure_dict(nnx.state(model))``; ``nnx.BatchStat`` variables are statistics.
  See ``trace_groups_fn`` for the arguments.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from dpm_jax import models
    >>> m = models.create_model('resnet20', num_classes=10, rngs=nnx.Rngs(0))
    >>> spec = trace_groups(m, jnp.zeros((1, 32, 32, 3)))
    >>> len(spec.groups)  # 3 residual streams + 9 inner convs
    12
  """
  apply_fn, variables, is_statistic, is_param = nnx_apply(model)
  return _trace(apply_fn, variables, example_inputs, is_statistic=is_statistic,
                is_param=is_param, rules=rules, on_unknown=on_unknown)
