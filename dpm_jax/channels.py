"""Per-channel reductions and rescaling over a parameter pytree, from a ``GroupSpec``.

The pruning state keeps one entry per channel of every group, flattened: group ``g`` owns the
entries ``[starts[g], starts[g] + sizes[g])``. ``ChannelIndex`` holds the static index maps
(numpy, built once); the functions here are pure and jittable.

Example:

  >>> import jax.numpy as jnp
  >>> from dpm_jax import groups, channels
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.ones((4, 3)), 'w2': jnp.ones((3, 2))}
  >>> index = channels.ChannelIndex.build(groups.trace_groups_fn(mlp, v, jnp.zeros((1, 4))))
  >>> channels.sq_norms(index, v).tolist()   # producer slices only: 4 ones per channel
  [4.0, 4.0, 4.0]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax.groups import PRODUCER, GroupSpec, Path, path_str

__all__ = ["ChannelIndex", "per_channel", "sq_norms", "inner", "abs_sums", "scale", "spread",
           "where",
           "segment_mean", "segment_sum", "split"]


@dataclasses.dataclass(frozen=True)
class _MemberIndex:
  axis: int
  indices: np.ndarray  # [size, repeat]
  start: int           # first flat channel of the group
  role: str
  whole_axis: bool     # the member is the whole axis, in order: no gather or scatter needed


@dataclasses.dataclass(frozen=True)
class ChannelIndex:
  """Static maps between a parameter tree and the flat per-channel vectors."""

  sizes: tuple[int, ...]
  starts: tuple[int, ...]
  segment_ids: np.ndarray                       # [K] group of every flat channel
  members: dict[Path, tuple[_MemberIndex, ...]]  # by variable path (prefix removed)

  @property
  def num_channels(self) -> int:
    return int(sum(self.sizes))

  @property
  def num_groups(self) -> int:
    return len(self.sizes)

  def has_role(self, key_path, role: str = PRODUCER) -> bool:
    """Whether the leaf at ``key_path`` holds a member with ``role``."""
    return any(m.role == role for m in self.members.get(path_str(key_path), ()))

  def only(self, keep: Callable[[Path], bool]) -> ChannelIndex:
    """The same index with the members of the variables whose path ``keep`` accepts (e.g.
    the normalisation scales: ``lambda path: path[-1] == 'scale'``)."""
    members = {p: ms for p, ms in self.members.items() if keep(p)}
    return dataclasses.replace(self, members=members)

  @classmethod
  def build(cls, spec: GroupSpec, prefix: Path = ()) -> ChannelIndex:
    """Indexes ``spec``'s members; ``prefix`` is stripped from paths (e.g. ``('params',)``)."""
    sizes = spec.sizes
    starts = tuple(int(s) for s in np.concatenate([[0], np.cumsum(sizes)[:-1]])) if sizes else ()
    members: dict[Path, list[_MemberIndex]] = {}
    n = len(prefix)
    for g, start in zip(spec.groups, starts):
      for m in g.members:
        if tuple(m.path[:n]) != tuple(prefix):
          continue
        idx = m.indices()
        whole = (idx.shape[1] == 1
                 and np.array_equal(idx[:, 0], np.arange(spec.shape_of(m.path)[m.axis])))
        members.setdefault(m.path[n:], []).append(
            _MemberIndex(m.axis, idx, start, m.role, bool(whole)))
    seg = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    return cls(tuple(sizes), starts, seg, {p: tuple(v) for p, v in members.items()})


def _leaves(index: ChannelIndex, tree: Any, roles: Sequence[str]):
  for key_path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for m in index.members.get(path_str(key_path), ()):
      if m.role in roles:
        yield x, m


def per_channel(index: ChannelIndex, tree: Any, fn: Callable[[jax.Array], jax.Array],
                roles: Sequence[str] = (PRODUCER,), min_ndim: int = 0) -> jax.Array:
  """``[K]``: for every channel, the sum of ``fn(leaf)`` over its member slices.

  ``fn`` maps a whole leaf (float32) to an array of its shape, so it may use statistics of
  the layer (e.g. ``lambda w: abs(w) < mean(abs(w))``). Only members with one of ``roles``,
  in leaves of at least ``min_ndim`` dimensions.
  """
  out = jnp.zeros(index.num_channels, jnp.float32)
  for x, m in _leaves(index, tree, roles):
    if x.ndim < min_ndim:
      continue
    axes = tuple(a for a in range(x.ndim) if a != m.axis)
    along = jnp.sum(fn(x.astype(jnp.float32)), axis=axes)           # [axis length]
    per_channel = along if m.whole_axis else along[m.indices].sum(axis=1)  # [size]
    out = out.at[m.start:m.start + len(m.indices)].add(per_channel)
  return out


def sq_norms(index: ChannelIndex, tree: Any, roles: Sequence[str] = (PRODUCER,),
             min_ndim: int = 0) -> jax.Array:
  """``[K]`` squared L2 norm of every channel over its members with the given roles, in
  leaves of at least ``min_ndim`` dimensions (2: the kernels only)."""
  return per_channel(index, tree, jnp.square, roles, min_ndim)


def inner(index: ChannelIndex, a: Any, b: Any, roles: Sequence[str] = (PRODUCER,),
          min_ndim: int = 0) -> jax.Array:
  """``[K]`` inner product of two params-shaped trees over every channel's members."""
  return per_channel(index, jax.tree.map(lambda x, y: x.astype(jnp.float32) * y, a, b),
                     lambda x: x, roles, min_ndim)


def abs_sums(index: ChannelIndex, tree: Any, roles: Sequence[str] = (PRODUCER,),
             min_ndim: int = 0) -> jax.Array:
  """``[K]`` L1 norm of every channel over its members with the given roles, in leaves of
  at least ``min_ndim`` dimensions (2: the kernels only)."""
  return per_channel(index, tree, jnp.abs, roles, min_ndim)


def _along(m: _MemberIndex, values: jax.Array, x: jax.Array, fill) -> jax.Array:
  """``values`` (``[K]``) of member ``m``'s channels laid along its axis of leaf ``x``
  (``fill`` at the entries no channel of ``m`` holds), shaped to broadcast against ``x``."""
  v = values[m.start:m.start + len(m.indices)]
  if m.whole_axis:
    along = v
  else:
    along = jnp.full(x.shape[m.axis], fill, values.dtype)
    along = along.at[m.indices.ravel()].set(jnp.repeat(v, m.indices.shape[1]))
  shape = [1] * x.ndim
  shape[m.axis] = -1
  return along.reshape(shape)


def _members(index: ChannelIndex, key_path, x, roles: Sequence[str], min_ndim: int):
  return [m for m in index.members.get(path_str(key_path), ())
          if m.role in roles and x.ndim >= min_ndim]


def scale(index: ChannelIndex, tree: Any, factor: jax.Array,
          roles: Sequence[str] = (PRODUCER,), min_ndim: int = 0) -> Any:
  """Multiplies every channel's member slices by ``factor[channel]`` (``[K]``).

  Only members with one of ``roles``, in leaves of at least ``min_ndim`` dimensions (2: the
  kernels, not biases or normalisation parameters).
  """

  def scale_leaf(key_path, x):
    for m in _members(index, key_path, x, roles, min_ndim):
      x = x * _along(m, factor, x, 1).astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(scale_leaf, tree)


def spread(index: ChannelIndex, tree: Any, values: jax.Array,
           roles: Sequence[str] = (PRODUCER,), min_ndim: int = 0) -> Any:
  """A tree shaped like ``tree`` holding, at every entry, the sum of ``values[channel]``
  (``[K]``) over the members (of ``roles``, in leaves of at least ``min_ndim`` dimensions)
  that hold the entry; zero elsewhere. ``spread(...) * tree`` weights every slice by its
  channel's value."""

  def leaf(key_path, x):
    out = jnp.zeros(x.shape, jnp.float32)
    for m in _members(index, key_path, x, roles, min_ndim):
      out = out + _along(m, values.astype(jnp.float32), x, 0)
    return out

  return jax.tree_util.tree_map_with_path(leaf, tree)


def where(index: ChannelIndex, take: jax.Array, on_true: Any, on_false: Any,
          roles: Sequence[str] = (PRODUCER,)) -> Any:
  """``on_false`` with the member slices (of ``roles``) of the channels ``take`` (``[K]``
  bool) from ``on_true``; both trees have the params' structure. Exact: values are chosen,
  not computed."""

  def pick(key_path, a, b):
    masks = [_along(m, take, b, False) for m in _members(index, key_path, b, roles, 0)]
    return jnp.where(functools.reduce(jnp.logical_or, masks), a, b) if masks else b

  return jax.tree_util.tree_map_with_path(pick, on_true, on_false)


def segment_sum(index: ChannelIndex, values: jax.Array) -> jax.Array:
  """``[G]`` the sum of ``values`` (``[K]``) over each group."""
  return jax.ops.segment_sum(values, jnp.asarray(index.segment_ids), index.num_groups)


def segment_mean(index: ChannelIndex, values: jax.Array, where: jax.Array) -> jax.Array:
  """``[K]``: for every channel, the mean of ``values`` over ``where`` in its group."""
  seg = jnp.asarray(index.segment_ids)
  total = jax.ops.segment_sum(jnp.where(where, values, 0.0), seg, index.num_groups)
  count = jax.ops.segment_sum(where.astype(jnp.float32), seg, index.num_groups)
  return (total / jnp.maximum(count, 1.0))[seg]


def split(index: ChannelIndex, flat: jax.Array) -> tuple[jax.Array, ...]:
  """The flat ``[K]`` vector as one array per group."""
  return tuple(flat[s:s + n] for s, n in zip(index.starts, index.sizes))
