"""How many channels to remove where: FLOPs-targeted global and uniform allocation.

All functions are pure and jittable over flat ``[K]`` channel vectors (see
``dpm_jax.channels``). The FLOPs of any keep configuration come from ``FlopsModel``, a dense
form of the traced layers: every layer's MACs are ``const * prod(d in dims: fixed_d +
W[d] @ keep)``.

Example:

  >>> import jax.numpy as jnp, numpy as np
  >>> from dpm_jax import groups, allocation
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.ones((4, 8)), 'w2': jnp.ones((8, 2))}
  >>> spec = groups.trace_groups_fn(mlp, v, jnp.zeros((1, 4)))
  >>> model = allocation.FlopsModel.build(spec)
  >>> float(model.macs(jnp.ones(8)))            # 4*8 + 8*2
  48.0
  >>> scores = jnp.arange(8.0)
  >>> removed = allocation.select_global(model, scores, jnp.ones(8, bool), jnp.zeros(8, bool),
  ...                                    0.5 * 48, jnp.ones(1, jnp.int32))
  >>> np.nonzero(np.asarray(removed))[0].tolist()   # the four least important go
  [0, 1, 2, 3]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax.groups import GroupSpec

__all__ = ["FlopsModel", "min_keep", "select_global", "select_uniform", "check_reachable"]


@dataclasses.dataclass(frozen=True)
class FlopsModel:
  """Dense MAC model of a traced network over the flat channel vector.

  Attributes:
    weights: ``[D, K]`` entries of dimension ``d`` per kept channel ``k``.
    fixed: ``[D]`` unprunable entries of every dimension.
    layer_dims: ``[L, M]`` the dimensions of each layer, padded with ``D`` (a dimension of
      size one).
    const: ``[L]`` the MACs of a layer per unit of each of its dimensions.
  """

  weights: np.ndarray
  fixed: np.ndarray
  layer_dims: np.ndarray
  const: np.ndarray
  segment_ids: np.ndarray

  @classmethod
  def build(cls, spec: GroupSpec) -> FlopsModel:
    sizes = spec.sizes
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int) if sizes else []
    k = int(sum(sizes))
    rows, fixed, layer_dims, const = [], [], [], []
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
      const.append(layer.const)
    d = len(rows)
    width = max((len(x) for x in layer_dims), default=1)
    padded = np.full((len(layer_dims), width), d, np.int32)
    for i, dims in enumerate(layer_dims):
      padded[i, :len(dims)] = dims
    weights = np.stack(rows) if rows else np.zeros((0, k), np.float32)
    seg = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    return cls(weights, np.asarray(fixed, np.float32), padded, np.asarray(const, np.float64),
               seg)

  def dim_sizes(self, keep: jax.Array) -> jax.Array:
    """``[D]`` entries of every dimension when ``keep`` (``[K]`` bool or float) is kept."""
    return jnp.asarray(self.fixed) + jnp.asarray(self.weights) @ keep.astype(jnp.float32)

  def _macs_from_dims(self, dims: jax.Array) -> jax.Array:
    # dims: [D, ...]; append the unit dimension used for padding.
    ones = jnp.ones((1,) + dims.shape[1:], dims.dtype)
    full = jnp.concatenate([dims, ones], axis=0)
    per_layer = jnp.prod(full[jnp.asarray(self.layer_dims)], axis=1)   # [L, ...]
    const = jnp.asarray(self.const, jnp.float32).reshape((-1,) + (1,) * (dims.ndim - 1))
    return jnp.sum(const * per_layer, axis=0)

  def macs(self, keep: jax.Array) -> jax.Array:
    """MACs of the network with ``keep`` channels."""
    return self._macs_from_dims(self.dim_sizes(keep))

  @property
  def dense_macs(self) -> float:
    # Eager even under a trace: `prune` may be built inside one (optax.inject_hyperparams).
    with jax.ensure_compile_time_eval():
      return float(self.macs(jnp.ones(self.weights.shape[1])))


def min_keep(spec: GroupSpec, min_channels: int, min_fraction: float) -> np.ndarray:
  """``[G]`` the fewest channels the allocation may leave in each group."""
  sizes = np.asarray(spec.sizes)
  floor = np.maximum(min_channels, np.ceil(min_fraction * sizes)).astype(np.int32)
  return np.minimum(floor, sizes).astype(np.int32)


def check_reachable(model: FlopsModel, spec: GroupSpec, minimum: np.ndarray,
                    target_flops: float) -> None:
  """Raises if ``target_flops`` cannot be met with every group at its minimum width."""
  if not spec.groups:
    if target_flops < 1.0:
      raise ValueError("The model has no prunable channel groups, so no FLOPs target below "
                       "1.0 can be met.")
    return
  # The cheapest configuration at the minimum: keep each group's first `minimum` channels
  # (all channels of a group cost the same wherever the group is whole).
  keep = np.concatenate([np.arange(n) < m for n, m in zip(spec.sizes, minimum)])
  with jax.ensure_compile_time_eval():  # static, even when called under a trace
    lowest = float(model.macs(jnp.asarray(keep))) / model.dense_macs
  if lowest > target_flops + 1e-9:
    raise ValueError(
        f"target_flops={target_flops} cannot be met: with the minimum channels per group "
        f"the network keeps {lowest:.3f} of its FLOPs (unprunable layers and the "
        "min_channels/min_fraction guard). Raise target_flops or lower the guard.")


def _group_counts(seg: jax.Array, mask: jax.Array, num_groups: int) -> jax.Array:
  return jax.ops.segment_sum(mask.astype(jnp.int32), seg, num_groups)


def select_global(model: FlopsModel, scores: jax.Array, candidates: jax.Array,
                  removed: jax.Array, target_macs: jax.Array,
                  minimum: jax.Array, tolerance_macs: jax.Array | float = 0.0,
                  swap_tries: int = 8) -> jax.Array:
  """Removes the least important candidates, across groups, until MACs <= ``target_macs``.

  Channels go in order of importance until the target is met; then the most important of
  the channels just taken are given back, one by one, while the target still holds, so
  the MACs land just under the target rather than up to one channel's cost below it; last,
  while the MACs are more than ``tolerance_macs`` under the target, up to ``swap_tries`` of
  the most important taken channels may each be swapped for the least important cheaper
  candidate that lands closer to it (importance traded for precision, within the guard).

  Args:
    model: the FLOPs model.
    scores: ``[K]`` importance (already normalised for comparison across groups).
    candidates: ``[K]`` channels that may be selected now.
    removed: ``[K]`` channels already selected (they count as gone).
    target_macs: the MACs to reach.
    minimum: ``[G]`` fewest channels to leave per group.
    tolerance_macs: how far under the target is close enough (no swaps).
    swap_tries: how many taken channels may be swapped.

  Returns:
    ``[K]`` the new selection (``removed`` plus the channels chosen now). When the target
    cannot be reached from the candidates, every allowed candidate is selected.
  """
  seg = jnp.asarray(model.segment_ids)
  num_groups = minimum.shape[0]
  candidates = candidates & ~removed
  order = jnp.argsort(jnp.where(candidates, scores, jnp.inf))
  seg_sorted = seg[order]
  cand_sorted = candidates[order]
  # Rank of each candidate within its group, in order of importance (1 = least important).
  onehot = (seg_sorted[:, None] == jnp.arange(num_groups)[None, :]) & cand_sorted[:, None]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), seg_sorted[:, None], axis=1)[:, 0]
  kept_now = _group_counts(seg, ~removed, num_groups)
  allowed = cand_sorted & (kept_now[seg_sorted] - rank >= minimum[seg_sorted])
  # MACs after removing each prefix of the allowed channels, in order.
  dims0 = model.dim_sizes(~removed)                                      # [D]
  w_sorted = jnp.asarray(model.weights)[:, order] * allowed[None, :]     # [D, K]
  dims = jnp.concatenate([dims0[:, None], dims0[:, None] - jnp.cumsum(w_sorted, axis=1)], 1)
  macs = model._macs_from_dims(dims)                                    # [K + 1]
  reached = macs <= target_macs
  n = jnp.where(jnp.any(reached), jnp.argmax(reached), macs.shape[0] - 1)
  take_sorted = allowed & (jnp.arange(order.shape[0]) < n)
  take = jnp.zeros_like(candidates).at[order].set(take_sorted)
  # The prefix undershoots the target by up to one channel's MACs (several percent in a
  # small network). Give back the most important channels just taken while the target
  # still holds: the result lands just under the target.
  back = jnp.argsort(jnp.where(take, -scores, jnp.inf))
  weights = jnp.asarray(model.weights)

  def give_back(i, carry):
    take, dims = carry
    c = back[i]
    more = dims + weights[:, c]
    ok = take[c] & (model._macs_from_dims(more) <= target_macs)
    return take.at[c].set(take[c] & ~ok), jnp.where(ok, more, dims)

  dims_n = dims[:, jnp.minimum(n, dims.shape[1] - 1)]
  take, dims_now = jax.lax.fori_loop(0, order.shape[0], give_back, (take, dims_n))

  # Still short of the target by more than `tolerance_macs` but by less than any taken
  # channel's cost: swap one of the most important taken channels for the least important
  # cheaper candidate that lands closer to the target (the guard still holds).
  def swap(i, carry):
    take, dims_now = carry
    c = back[i]
    gone = removed | take
    counts = _group_counts(seg, ~gone, num_groups).at[seg[c]].add(1)
    returned = dims_now + weights[:, c]                               # [D]
    options = returned[:, None] - weights                             # [D, K]
    macs_now = model._macs_from_dims(dims_now)
    macs = model._macs_from_dims(options)                             # [K]
    fits = (candidates & ~gone & (counts[seg] - 1 >= minimum[seg])
            & (macs <= target_macs) & (macs > macs_now))
    d = jnp.argmin(jnp.where(fits, scores, jnp.inf))
    ok = take[c] & fits[d] & (target_macs - macs_now > tolerance_macs)
    take = take.at[c].set(take[c] & ~ok)
    take = take.at[d].set(take[d] | ok)
    return take, jnp.where(ok, options[:, d], dims_now)

  take, _ = jax.lax.fori_loop(0, min(swap_tries, order.shape[0]), swap, (take, dims_now))
  return removed | take


def select_uniform(model: FlopsModel, scores: jax.Array, candidates: jax.Array,
                   removed: jax.Array, target_macs: jax.Array, minimum: jax.Array,
                   iterations: int = 30) -> jax.Array:
  """Removes the same fraction of every group (least important first) to meet the target.

  The fraction is found by bisection; arguments and result as for ``select_global``.
  """
  seg = jnp.asarray(model.segment_ids)
  num_groups = minimum.shape[0]
  sizes = _group_counts(seg, jnp.ones_like(removed), num_groups)
  candidates = candidates & ~removed
  order = jnp.argsort(jnp.where(candidates, scores, jnp.inf))
  seg_sorted = seg[order]
  onehot = (seg_sorted[:, None] == jnp.arange(num_groups)[None, :]) & candidates[order][:, None]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), seg_sorted[:, None], axis=1)[:, 0]
  rank = jnp.zeros_like(rank).at[order].set(rank)        # back to channel order
  already = _group_counts(seg, removed, num_groups)

  def selection(ratio):
    want = jnp.floor(ratio * sizes).astype(jnp.int32)
    want = jnp.minimum(want, sizes - minimum)
    extra = jnp.maximum(want - already, 0)
    return removed | (candidates & (rank <= extra[seg]))

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = model.macs(~selection(mid)) <= target_macs
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  _, hi = jax.lax.fori_loop(0, iterations, body, (jnp.float32(0.0), jnp.float32(1.0)))
  return selection(hi)
