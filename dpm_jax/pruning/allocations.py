"""Allocations: which channels to remove at an event, to meet the event's cost target.

``Global`` ranks all channels together (DepGraph); ``Uniform`` removes the same fraction of
every group (SFP, magnitude pruning). Both never leave a group with fewer than
``min_channels`` channels (nor fewer than ``min_fraction`` of them). The pure functions below
are jittable over flat ``[K]`` channel vectors (see ``dpm_jax.channels``); the cost of any
keep configuration comes from a ``dpm_jax.flops.CostModel``: MACs (``FlopsModel``) or
predicted latency (``dpm_jax.latency.LatencyModel``).

Example:

  >>> import jax.numpy as jnp, numpy as np
  >>> from dpm_jax import groups
  >>> from dpm_jax.flops import FlopsModel
  >>> from dpm_jax.pruning import allocations
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> v = {'w1': jnp.ones((4, 8)), 'w2': jnp.ones((8, 2))}
  >>> spec = groups.trace_groups_fn(mlp, v, jnp.zeros((1, 4)))
  >>> model = FlopsModel.build(spec)
  >>> float(model.cost(jnp.ones(8)))            # 4*8 + 8*2
  48.0
  >>> scores = jnp.arange(8.0)
  >>> removed = allocations.select_global(model, scores, jnp.ones(8, bool),
  ...                                     jnp.zeros(8, bool), 0.5 * 48, jnp.ones(1, jnp.int32))
  >>> np.nonzero(np.asarray(removed))[0].tolist()   # the four least important go
  [0, 1, 2, 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpm_jax import channels
from dpm_jax.flops import CostModel
from dpm_jax.groups import GroupSpec
from dpm_jax.pruning.base import Allocation, Context, State, check_float, check_int

__all__ = ["GuardedAllocation", "Global", "Uniform", "Adaptive", "Widths", "min_keep", "check_reachable",
           "normalize", "select_global", "select_uniform", "select_by_ratios",
           "weight_sparsity", "channel_sparsity", "adaptive_ratios", "round_multiples",
           "rounded_minimum", "round_widths"]


def min_keep(spec: GroupSpec, min_channels: int, min_fraction: float) -> np.ndarray:
  """``[G]`` the fewest channels the allocation may leave in each group."""
  sizes = np.asarray(spec.sizes)
  floor = np.maximum(min_channels, np.ceil(min_fraction * sizes)).astype(np.int32)
  return np.minimum(floor, sizes).astype(np.int32)


def check_reachable(model: CostModel, spec: GroupSpec, minimum: np.ndarray,
                    target_flops: float,
                    guard: str = "the min_channels/min_fraction guard") -> None:
  """Raises if ``target_flops`` (a fraction of ``model``'s dense cost) cannot be met with
  every group at its minimum width."""
  if not spec.groups:
    if target_flops < 1.0:
      raise ValueError("The model has no prunable channel groups, so no cost target below "
                       "1.0 can be met.")
    return
  # The cheapest configuration at the minimum: keep each group's first `minimum` channels
  # (all channels of a group cost the same wherever the group is whole).
  keep = np.concatenate([np.arange(n) < m for n, m in zip(spec.sizes, minimum)])
  lowest = model.static_cost(keep) / model.dense_cost
  if lowest > target_flops + 1e-9:
    raise ValueError(
        f"target_flops={target_flops} cannot be met: with the minimum channels per group "
        f"the network keeps {lowest:.3f} of its {model.unit} (unprunable layers and {guard}). "
        "Raise target_flops or loosen the guard.")


def _group_counts(seg: jax.Array, mask: jax.Array, num_groups: int) -> jax.Array:
  return jax.ops.segment_sum(mask.astype(jnp.int32), seg, num_groups)


def select_global(model: CostModel, scores: jax.Array, candidates: jax.Array,
                  removed: jax.Array, target_cost: jax.Array,
                  minimum: jax.Array, tolerance: jax.Array | float = 0.0,
                  swap_tries: int = 32) -> jax.Array:
  """Removes the least important candidates, across groups, until cost <= ``target_cost``.

  Channels go in order of importance until the target is met; then the most important of
  the channels just taken are given back, one by one, while the target still holds, so
  the cost lands just under the target rather than up to one channel's cost below it; last,
  while the cost is more than ``tolerance`` under the target, up to ``swap_tries`` of
  the most important taken channels may each be exchanged for the least important
  candidates cheaper than it, taken in order until the target is met, when that lands
  closer to it (importance traded for precision, within the guard).

  Args:
    model: the cost model (MACs or latency).
    scores: ``[K]`` importance (already normalised for comparison across groups).
    candidates: ``[K]`` channels that may be selected now.
    removed: ``[K]`` channels already selected (they count as gone).
    target_cost: the cost to reach.
    minimum: ``[G]`` fewest channels to leave per group.
    tolerance: how far under the target is close enough (no swaps).
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
  # The cost after removing each prefix of the allowed channels, in order.
  dims0 = model.dim_sizes(~removed)                                      # [D]
  w_sorted = jnp.asarray(model.weights)[:, order] * allowed[None, :]     # [D, K]
  dims = jnp.concatenate([dims0[:, None], dims0[:, None] - jnp.cumsum(w_sorted, axis=1)], 1)
  costs = model.cost_of_dims(dims)                                   # [K + 1]
  reached = costs <= target_cost
  n = jnp.where(jnp.any(reached), jnp.argmax(reached), costs.shape[0] - 1)
  take_sorted = allowed & (jnp.arange(order.shape[0]) < n)
  take = jnp.zeros_like(candidates).at[order].set(take_sorted)
  # The prefix undershoots the target by up to one channel's cost (several percent in a
  # small network). Give back the most important channels just taken while the target
  # still holds: the result lands just under the target.
  back = jnp.argsort(jnp.where(take, -scores, jnp.inf))
  weights = jnp.asarray(model.weights)

  def give_back(i, carry):
    take, dims = carry
    c = back[i]
    more = dims + weights[:, c]
    ok = take[c] & (model.cost_of_dims(more) <= target_cost)
    return take.at[c].set(take[c] & ~ok), jnp.where(ok, more, dims)

  dims_n = dims[:, jnp.minimum(n, dims.shape[1] - 1)]
  take, dims_now = jax.lax.fori_loop(0, order.shape[0], give_back, (take, dims_n))

  # Still short of the target by more than `tolerance` but by less than any taken
  # channel's cost: exchange one of the most important taken channels for the least
  # important candidates cheaper than it, taken in order until the target is met, when that
  # lands closer to the target (the guard still holds).
  k = order.shape[0]

  def swap(i, carry):
    take, dims_now = carry
    c = back[i]
    cost_now = model.cost_of_dims(dims_now)
    returned = dims_now + weights[:, c]                               # [D]
    cost_back = model.cost_of_dims(returned)
    single = cost_back - model.cost_of_dims(returned[:, None] - weights)  # [K] each's cost
    gone = removed | take
    ok = candidates & ~gone & (jnp.arange(k) != c) & (single < cost_back - cost_now)
    order_d = jnp.argsort(jnp.where(ok, scores, jnp.inf))
    ok_sorted, seg_d = ok[order_d], seg[order_d]
    hot = (seg_d[:, None] == jnp.arange(num_groups)[None, :]) & ok_sorted[:, None]
    rank_d = jnp.take_along_axis(jnp.cumsum(hot, axis=0), seg_d[:, None], axis=1)[:, 0]
    counts = _group_counts(seg, ~gone, num_groups).at[seg[c]].add(1)
    allowed_d = ok_sorted & (counts[seg_d] - rank_d >= minimum[seg_d])
    dims_seq = returned[:, None] - jnp.cumsum(weights[:, order_d] * allowed_d[None, :], axis=1)
    cost_seq = model.cost_of_dims(dims_seq)                           # [K]
    reached = cost_seq <= target_cost
    n = jnp.argmax(reached)
    accept = (take[c] & jnp.any(reached) & (cost_seq[n] > cost_now)
              & (target_cost - cost_now > tolerance))
    chosen = jnp.zeros_like(take).at[order_d].set(allowed_d & (jnp.arange(k) <= n))
    take = jnp.where(accept, take.at[c].set(False) | chosen, take)
    return take, jnp.where(accept, dims_seq[:, n], dims_now)

  take, _ = jax.lax.fori_loop(0, min(swap_tries, order.shape[0]), swap, (take, dims_now))
  return removed | take


def select_by_ratios(model: CostModel, scores: jax.Array, candidates: jax.Array,
                     removed: jax.Array, target_cost: jax.Array, minimum: jax.Array,
                     ratios: Callable[[jax.Array], jax.Array], upper: jax.Array | float,
                     iterations: int = 30) -> jax.Array:
  """Removes ``floor(ratios(x)[g] * size_g)`` channels of every group ``g`` (its least
  important candidates; removed ones count) for the smallest ``x`` in ``[0, upper]`` that
  meets the target, found by bisection (``ratios`` must not decrease with ``x``).

  Arguments and result as for ``select_global``; when even ``x = upper`` misses the
  target, that selection is returned.
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

  def selection(x):
    want = jnp.floor(ratios(x) * sizes).astype(jnp.int32)
    want = jnp.minimum(want, sizes - minimum)
    extra = jnp.maximum(want - already, 0)
    return removed | (candidates & (rank <= extra[seg]))

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    ok = model.cost(~selection(mid)) <= target_cost
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  upper = jnp.asarray(upper, jnp.float32)
  _, hi = jax.lax.fori_loop(0, iterations, body, (jnp.float32(0.0), upper))
  return selection(hi)


def select_uniform(model: CostModel, scores: jax.Array, candidates: jax.Array,
                   removed: jax.Array, target_cost: jax.Array, minimum: jax.Array,
                   iterations: int = 30) -> jax.Array:
  """Removes the same fraction of every group (least important first) to meet the target.

  The fraction is found by bisection; arguments and result as for ``select_global``.
  """
  return select_by_ratios(model, scores, candidates, removed, target_cost, minimum,
                          lambda x: jnp.full(minimum.shape, x), 1.0, iterations)


def weight_sparsity(index: channels.ChannelIndex, params: Any,
                    threshold: float) -> jax.Array:
  """``[G]`` each group's share of near-zero weights: of the entries of its kernel producer
  slices, those whose magnitude is below ``threshold`` times the mean magnitude of their
  layer (kernel). Our reading of PSAP's "weight sparsity ratio"."""
  below = channels.per_channel(
      index, params, lambda w: (jnp.abs(w) < threshold * jnp.mean(jnp.abs(w))).astype(w.dtype),
      min_ndim=2)
  total = channels.per_channel(index, params, jnp.ones_like, min_ndim=2)
  return channels.segment_sum(index, below) / jnp.maximum(channels.segment_sum(index, total), 1)


def channel_sparsity(index: channels.ChannelIndex, params: Any,
                     fraction: float) -> jax.Array:
  """``[G]`` each group's share of weak channels: those whose producer norm is below
  ``fraction`` times the median norm of the group's channels."""
  norms = jnp.sqrt(channels.sq_norms(index, params))
  weak = [jnp.mean((g < fraction * jnp.median(g)).astype(jnp.float32))
          for g in channels.split(index, norms)]
  return jnp.stack(weak) if weak else jnp.zeros(0, jnp.float32)


def normalize(index: channels.ChannelIndex, scores: jax.Array,
              where: jax.Array | None = None) -> jax.Array:
  """Scores divided by their group's mean, so groups of different scale compare (DepGraph).

  The mean is over the channels in ``where`` (default: all): pass the kept channels, as
  DepGraph's removed channels are gone from the layer it normalises over.
  """
  where = jnp.ones_like(scores, bool) if where is None else where
  mean = channels.segment_mean(index, scores, where)
  return scores / jnp.maximum(mean, 1e-12)


@dataclasses.dataclass(frozen=True)
class GuardedAllocation(Allocation):
  """An allocation that never leaves a group with fewer than ``min_channels`` channels, nor
  with fewer than ``min_fraction`` of them (rounded up); its ``check`` fails early when the
  cost target cannot be met within that guard."""

  min_channels: int = 1
  min_fraction: float = 0.0

  def __post_init__(self):
    name = type(self).__name__
    check_int(name, "min_channels", self.min_channels, 1)  # a group may not be emptied
    check_float(name, "min_fraction", self.min_fraction, 0.0, 1.0, high_open=True)

  def minimum(self, spec: GroupSpec) -> np.ndarray:
    """``[G]`` the fewest channels the allocation may leave in each group."""
    return min_keep(spec, self.min_channels, self.min_fraction)

  def check(self, ctx: Context) -> None:
    check_reachable(ctx.cost, ctx.spec, self.minimum(ctx.spec), ctx.target_flops)


@dataclasses.dataclass(frozen=True)
class Global(GuardedAllocation):
  """Ranks every channel of every group together and removes the least important until the
  event's cost is met (DepGraph's global pruning; see ``select_global``).

  Attributes:
    min_channels: never leave a group with fewer channels than this...
    min_fraction: ... nor with fewer than this fraction of its channels (rounded up).
    flops_tolerance: land at most this fraction of the dense cost under an event's target
      when a swap can (our choice; DepGraph stops at the first channel that meets it).
    normalize: divide scores by their group's mean over its kept channels first, so that
      groups of different scale compare (DepGraph); ``False`` ranks raw scores.
  """

  flops_tolerance: float = 0.005
  normalize: bool = True

  def __post_init__(self):
    super().__post_init__()
    check_float("Global", "flops_tolerance", self.flops_tolerance, 0.0, 1.0, high_open=True)
    if not isinstance(self.normalize, bool):
      raise ValueError(f"Global: normalize={self.normalize!r} must be a bool.")

  def select(self, ctx: Context, state: State, scores: jax.Array, candidates: jax.Array,
             removed: jax.Array, target_cost: jax.Array,
             params: Any) -> tuple[jax.Array, State]:
    del params
    if self.normalize:
      scores = normalize(ctx.index, scores, where=~removed)
    selected = select_global(ctx.cost, scores, candidates, removed, target_cost,
                             jnp.asarray(self.minimum(ctx.spec)),
                             tolerance=self.flops_tolerance * ctx.dense_cost)
    return selected, state


@dataclasses.dataclass(frozen=True)
class Uniform(GuardedAllocation):
  """Removes the same fraction of every group, the least important channels of each, to meet
  the event's cost (see ``select_uniform``).

  Attributes:
    min_channels: never leave a group with fewer channels than this...
    min_fraction: ... nor with fewer than this fraction of its channels (rounded up).
  """

  def select(self, ctx: Context, state: State, scores: jax.Array, candidates: jax.Array,
             removed: jax.Array, target_cost: jax.Array,
             params: Any) -> tuple[jax.Array, State]:
    del params
    selected = select_uniform(ctx.cost, scores, candidates, removed, target_cost,
                              jnp.asarray(self.minimum(ctx.spec)))
    return selected, state


def adaptive_ratios(sparsity: jax.Array, alpha: jax.Array, p_min: float,
                    p_max: float) -> jax.Array:
  """PSAP's per-group pruning ratios from the groups' sparsity (our reading):
  ``p_g = clip(alpha * s_g / mean(s), p_min, p_max)``; equal when no group is sparse."""
  mean = jnp.mean(sparsity)
  relative = jnp.where(mean > 0, sparsity / jnp.maximum(mean, 1e-12), 1.0)
  return jnp.clip(alpha * relative, p_min, p_max)


SPARSITIES = ("weights", "channels")


@dataclasses.dataclass(frozen=True)
class Adaptive(GuardedAllocation):
  """PSAP's self-adaptive allocation: each group's pruning ratio follows its own sparsity.

  Our reading of "Protective Self-Adaptive Pruning" (Li and Zhao 2023), whose formulas are
  not public: before each selection every group's sparsity ``s_g`` is measured
  (``weight_sparsity`` or ``channel_sparsity``), its ratio is
  ``p_g = clip(alpha * s_g / mean(s), p_min, p_max)`` (``adaptive_ratios``), with ``alpha``
  found by bisection so that the event's cost target is met, and within each group the
  least important candidates go (``select_by_ratios``).

  Attributes:
    min_channels: never leave a group with fewer channels than this...
    min_fraction: ... nor with fewer than this fraction of its channels (rounded up).
    sparsity: ``weights``: the share of a group's kernel entries below
      ``sparsity_threshold`` times their layer's mean magnitude; ``channels``: the share of
      its channels whose norm is below ``channel_fraction`` times the group's median.
    sparsity_threshold: see ``sparsity``.
    channel_fraction: see ``sparsity``.
    p_min: the smallest ratio of a group.
    p_max: the largest ratio of a group (below 1: a group is never emptied).
    iterations: bisection steps for ``alpha``.
  """

  sparsity: str = "weights"
  sparsity_threshold: float = 0.5
  channel_fraction: float = 0.5
  p_min: float = 0.0
  p_max: float = 0.9
  iterations: int = 30

  def __post_init__(self):
    super().__post_init__()
    if self.sparsity not in SPARSITIES:
      raise ValueError(f"Adaptive: sparsity={self.sparsity!r}; choose one of "
                       f"{', '.join(SPARSITIES)}.")
    check_float("Adaptive", "sparsity_threshold", self.sparsity_threshold, 0.0, float("inf"),
                low_open=True)
    check_float("Adaptive", "channel_fraction", self.channel_fraction, 0.0, float("inf"),
                low_open=True)
    check_float("Adaptive", "p_min", self.p_min, 0.0, 1.0, high_open=True)
    check_float("Adaptive", "p_max", self.p_max, 0.0, 1.0, low_open=True, high_open=True)
    if self.p_min > self.p_max:
      raise ValueError(f"Adaptive: p_min={self.p_min} must not exceed p_max={self.p_max}.")
    check_int("Adaptive", "iterations", self.iterations, 1)

  def check(self, ctx: Context) -> None:
    # At best every group gives up p_max of its channels.
    sizes = np.asarray(ctx.spec.sizes)
    floor = np.maximum(self.minimum(ctx.spec), sizes - np.floor(self.p_max * sizes))
    check_reachable(ctx.cost, ctx.spec, np.minimum(floor, sizes).astype(np.int32),
                    ctx.target_flops, guard=f"p_max={self.p_max} with the min_channels/"
                    "min_fraction guard")

  def group_sparsity(self, ctx: Context, params: Any) -> jax.Array:
    """``[G]`` the sparsity of every group (see ``sparsity``)."""
    if self.sparsity == "weights":
      return weight_sparsity(ctx.index, params, self.sparsity_threshold)
    return channel_sparsity(ctx.index, params, self.channel_fraction)

  def select(self, ctx: Context, state: State, scores: jax.Array, candidates: jax.Array,
             removed: jax.Array, target_cost: jax.Array,
             params: Any) -> tuple[jax.Array, State]:
    sparsity = self.group_sparsity(ctx, params)
    relative = adaptive_ratios(sparsity, jnp.float32(1.0), 0.0, jnp.inf)
    # alpha = upper brings every group with any sparsity to p_max.
    smallest = jnp.min(jnp.where(relative > 0, relative, jnp.inf))
    upper = jnp.where(jnp.isfinite(smallest), self.p_max / smallest, self.p_max)
    ratios = lambda alpha: adaptive_ratios(sparsity, alpha, self.p_min, self.p_max)
    selected = select_by_ratios(ctx.cost, scores, candidates, removed, target_cost,
                                jnp.asarray(self.minimum(ctx.spec)), ratios, upper,
                                self.iterations)
    return selected, state


@dataclasses.dataclass(frozen=True)
class Widths(Allocation):
  """Brings every group to a given width: the widths of another run, without its ranking.

  At an event every group gives up the same share ``x`` of the channels it must lose in
  all (``size - width``; its least important candidates), ``x`` the smallest that meets the
  event's cost (bisection); at the events whose target is the recipe's final one, every
  group is brought to its width exactly. What it is for: separating what a method's
  allocation does from what its removal does, e.g. DepGraph's hard removal with the widths
  that DPM's self-rectifying ended at (``result.json``'s ``widths`` of that run).

  Attributes:
    widths: the channels every group keeps, in the spec's group order (``print(spec)``).
    iterations: bisection steps for ``x``.

  Example:

    >>> import jax.numpy as jnp, numpy as np
    >>> from dpm_jax import groups
    >>> from dpm_jax.flops import FlopsModel
    >>> from dpm_jax.pruning import allocations, base
    >>> def mlp(v, x):
    ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
    >>> v = {'w1': jnp.ones((4, 8)), 'w2': jnp.ones((8, 2))}
    >>> ctx = base.Context.build(groups.trace_groups_fn(mlp, v, jnp.zeros((1, 4))), 0.25)
    >>> alloc = allocations.Widths(widths=(2,))
    >>> alloc.check(ctx)   # 2 of 8 channels cost 0.25 of the dense MACs
    >>> removed, _ = alloc.select(ctx, alloc.init(ctx, v), jnp.arange(8.0), jnp.ones(8, bool),
    ...                           jnp.zeros(8, bool), 0.25 * ctx.dense_cost, v)
    >>> np.nonzero(~np.asarray(removed))[0].tolist()   # the two most important stay
    [6, 7]
  """

  widths: tuple[int, ...] = ()
  iterations: int = 30

  def __post_init__(self):
    if (not isinstance(self.widths, (tuple, list))
        or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1
               for w in self.widths)):
      raise ValueError(f"Widths: widths={self.widths!r} must be a tuple of ints >= 1, one per "
                       "channel group in the spec's order.")
    object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
    check_int("Widths", "iterations", self.iterations, 1)

  def minimum(self, spec: GroupSpec) -> np.ndarray:
    return np.asarray(self.widths, np.int32)

  def check(self, ctx: Context) -> None:
    sizes = np.asarray(ctx.spec.sizes)
    if not self.widths:
      raise ValueError("Widths: no widths given; give the channels every group keeps, one per "
                       "group in the spec's order (print(spec) lists the groups; a run's "
                       "result.json holds its final widths).")
    if len(self.widths) != len(sizes):
      raise ValueError(f"Widths: {len(self.widths)} widths given but the model has "
                       f"{len(sizes)} channel groups; give one per group in the spec's order "
                       "(print(spec) lists them).")
    over = [(g.name, w, n) for g, w, n in zip(ctx.spec.groups, self.widths, sizes) if w > n]
    if over:
      raise ValueError("Widths: wider than the group: " + ", ".join(
          f"{name} keeps {w} of {n}" for name, w, n in over) + ".")
    keep = np.concatenate([np.arange(n) < w for n, w in zip(sizes, self.widths)])
    cost = ctx.cost.static_cost(keep) / ctx.cost.dense_cost
    if cost > ctx.target_flops + 1e-9:
      raise ValueError(f"Widths: the widths keep {cost:.4f} of the dense {ctx.cost.unit}, above "
                       f"target_flops={ctx.target_flops}; set target_flops to at least "
                       f"{cost:.4f} or give narrower widths.")

  def select(self, ctx: Context, state: State, scores: jax.Array, candidates: jax.Array,
             removed: jax.Array, target_cost: jax.Array,
             params: Any) -> tuple[jax.Array, State]:
    del params
    sizes = np.asarray(ctx.spec.sizes, np.float32)
    full = (sizes - np.asarray(self.widths, np.float32) + 1e-3) / sizes  # + 1e-3: floor safe
    final = target_cost <= ctx.target_flops * ctx.dense_cost * (1 + 1e-6)
    ratios = lambda x: jnp.where(final, full, x * full)
    selected = select_by_ratios(ctx.cost, scores, candidates, removed, target_cost,
                                jnp.asarray(self.minimum(ctx.spec)), ratios, 1.0,
                                self.iterations)
    return selected, state


def round_multiples(spec: GroupSpec, round_to: int | tuple[int, ...]) -> np.ndarray:
  """``[G]`` the width multiple of every group from a recipe's ``round_to`` (one for all,
  or one per group); raises ``ValueError`` for a tuple of the wrong length."""
  if isinstance(round_to, int):
    return np.full(len(spec.groups), round_to, np.int32)
  if len(round_to) != len(spec.groups):
    raise ValueError(f"round_to has {len(round_to)} entries but the model has "
                     f"{len(spec.groups)} channel groups: give one multiple for all, or one "
                     "per group in the spec's order (print(spec) lists them).")
  return np.asarray(round_to, np.int32)


def rounded_minimum(sizes: np.ndarray, minimum: np.ndarray, multiples: np.ndarray) -> np.ndarray:
  """``[G]`` the fewest channels a group may keep when its width is a multiple of
  ``multiples`` (or its full width): the smallest such width at or above ``minimum``."""
  up = -(-minimum // multiples) * multiples
  return np.where(up >= sizes, sizes, up).astype(np.int32)


def round_widths(model: CostModel, index: channels.ChannelIndex, scores: jax.Array,
                 candidates: jax.Array, removed: jax.Array, selected: jax.Array,
                 target_cost: jax.Array, minimum: np.ndarray,
                 multiples: np.ndarray) -> jax.Array:
  """Moves an allocation's ``selected`` channels so that every group keeps a multiple of
  its ``multiples`` entry (or its full width), with the cost still at or under the target.

  Each group starts at the allowed width at or above what the allocation left it (fewer
  channels removed; never more than it had before the event), then, while the cost is
  over the target, one group steps down one multiple: the step that lands closest under
  the target if one does, else the one losing the least important channels (mean score,
  normalised by the group's mean); last, groups step back up while the target holds. Within a group the
  least important channels go, candidates before others. Our reading of Torch-Pruning's
  ``round_to`` for a FLOPs target: widths that accelerators run faster (multiples of 8 on
  GPUs, 128 on TPU lanes).

  Args:
    model: the cost model (MACs or latency).
    index: the channel index (for normalising scores per group).
    scores: ``[K]`` importance.
    candidates: ``[K]`` channels the removal prefers to select.
    removed: ``[K]`` channels already gone before the event.
    selected: ``[K]`` the allocation's selection (``removed`` included).
    target_cost: the cost to reach.
    minimum: ``[G]`` fewest channels per group (the allocation's guard).
    multiples: ``[G]`` the width multiple of every group.

  Returns:
    ``[K]`` the rounded selection (``removed`` included).
  """
  seg = jnp.asarray(model.segment_ids)
  num_groups = len(multiples)
  sizes = np.bincount(np.asarray(model.segment_ids), minlength=num_groups).astype(np.int32)
  m = jnp.asarray(multiples)
  lowest = jnp.asarray(rounded_minimum(sizes, np.asarray(minimum), np.asarray(multiples)))
  sizes_j = jnp.asarray(sizes)
  available = ~removed
  avail = _group_counts(seg, available, num_groups)          # widths before the event
  kept = _group_counts(seg, ~selected, num_groups)           # the allocation's widths

  def allowed_up(w):
    r = -(-w // m) * m
    return jnp.where(r >= sizes_j, sizes_j, r)

  def allowed_down(w):
    return jnp.where(w >= sizes_j, sizes_j, (w // m) * m)

  # Up may not pass the width before the event (a channel given back leaves a group one
  # over a multiple: it goes back down to one).
  up = allowed_up(jnp.maximum(kept, lowest))
  up = jnp.where(up <= avail, up, jnp.maximum(allowed_down(avail), jnp.minimum(lowest, avail)))
  # Rank the available channels of each group, least important first, candidates first.
  tier = jnp.where(candidates, 0, 1)
  order = jnp.lexsort((jnp.where(available, scores, jnp.inf), tier, ~available, seg))
  seg_sorted = seg[order]
  first = jnp.searchsorted(seg_sorted, jnp.arange(num_groups))
  rank = jnp.zeros_like(seg).at[order].set(jnp.arange(seg.shape[0]) - first[seg_sorted])
  norm = normalize(index, scores, where=available)

  def selection(widths):
    return removed | (available & (rank < (avail - widths)[seg]))

  def cost_of(widths):
    return model.cost(~selection(widths))

  def step_down(widths):
    return jnp.maximum(allowed_down(widths - 1), jnp.minimum(lowest, widths))

  eye = jnp.eye(num_groups, dtype=bool)

  def go_down(_, widths):
    # While over the target, one group steps down one multiple: the step that lands
    # closest under the target if one does, else the one losing the least important
    # channels (mean score over the group's mean).
    lower = step_down(widths)
    trials = jnp.where(eye, lower[None, :], widths[None, :])             # [G, G]
    costs = jax.vmap(cost_of)(trials)                                    # [G]
    open_ = lower < widths
    lands = open_ & (costs <= target_cost)
    losing = (available & (rank >= (avail - widths)[seg])
              & (rank < (avail - lower)[seg]))
    lost = jax.ops.segment_sum(jnp.where(losing, norm, 0.0), seg, num_groups)
    count = jax.ops.segment_sum(losing.astype(jnp.float32), seg, num_groups)
    cost = jnp.where(open_, lost / jnp.maximum(count, 1.0), jnp.inf)
    g = jnp.where(jnp.any(lands), jnp.argmax(jnp.where(lands, costs, -jnp.inf)),
                  jnp.argmin(cost))
    over = cost_of(widths) > target_cost
    return jnp.where(over & jnp.any(open_), trials[g], widths)

  # At most every multiple of every group, one at a time.
  steps = int(np.sum(-(-sizes // np.asarray(multiples)))) + num_groups
  widths = jax.lax.fori_loop(0, steps, go_down, up)

  def come_back(i, widths):
    # Steps back up, one multiple at a time, while the target holds (up to the width the
    # group had before the event).
    g = i % num_groups
    higher = jnp.minimum(allowed_up(widths + 1), jnp.maximum(allowed_down(avail), widths))
    trial = widths.at[g].set(higher[g])
    return jnp.where(cost_of(trial) <= target_cost, trial, widths)

  widths = jax.lax.fori_loop(0, steps, come_back, widths)
  return selection(widths)

