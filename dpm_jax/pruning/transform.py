"""The pruning optax transform: a recipe's parts run inside the optimizer, one compile a run.

``prune(inner, spec, recipe)`` wraps an inner optax optimizer. Its state holds the inner state
and the ``PruneState``. Each step it

1. asks the schedule whether the step is an event, and the target in force (a fraction of
   the dense network's FLOPs, or of its predicted latency: the recipe's ``cost``);
2. adds the regularizer's term to the gradients and runs the inner optimizer (``x~ = x + u``);
3. at an event, lets the removal reopen earlier selections (soft pruning) and selects
   channels: the criterion scores them, the removal names the candidates, the allocation
   picks, the removal marks them (all from the parameters before the step);
4. lets the removal land the step (zero, hold, decay, release, ...);
5. selects replacements for channels given back this step, from the parameters the step
   lands on, so that the keep masks leaving every step meet the target in force;
6. lets the criterion see the step (accumulated scores).

and returns updates such that ``optax.apply_updates`` lands every parameter where the removal
put it: there is no second call to remember. Every decision is taken on array values inside
``jax.lax.cond``, so the step compiles once; a step with nothing to do (before the first
event, or while a soft selection trains) costs one branch. A step whose gradients are not
finite leaves the pruning state as it was. Put ``prune`` outermost (``optax.apply_if_finite``
may wrap it): a transform chained after it would move parameters off their landed values.

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> import dpm_jax
  >>> def mlp(v, x):
  ...   return jnp.maximum(x @ v['w1'], 0) @ v['w2']
  >>> params = {'w1': jax.random.normal(jax.random.key(0), (4, 8)), 'w2': jnp.ones((8, 2))}
  >>> spec = dpm_jax.trace_groups_fn(mlp, params, jnp.zeros((1, 4)))
  >>> recipe = dpm_jax.recipes.magnitude(target_flops=0.5, removal='dpm_sp', decay_steps=4)
  >>> tx = dpm_jax.prune(optax.sgd(0.0), spec, recipe)
  >>> opt_state = tx.init(params)
  >>> for _ in range(5):
  ...   updates, opt_state = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
  ...   params = optax.apply_updates(params, updates)
  >>> [int(k.sum()) for k in dpm_jax.keep_masks(opt_state)]
  [4]
  >>> float(jnp.abs(params['w1'][:, ~dpm_jax.keep_masks(opt_state)[0]]).max())
  0.0
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpm_jax.groups import STATISTIC, GroupSpec, Path, path_str
from dpm_jax.pruning import allocations
from dpm_jax.pruning import state as state_lib
from dpm_jax.pruning.base import ACTIVE, Context, Step
from dpm_jax.pruning.recipes import Recipe
from dpm_jax.pruning.state import PruneState
from dpm_jax.surgery import zero_channels

__all__ = ["PruneOptState", "prune", "prune_state", "keep_masks", "finalize", "inner_state"]


class PruneOptState(NamedTuple):
  """State of ``prune``: the inner optimizer's state and the pruning state."""

  inner_state: optax.OptState
  prune_state: PruneState


def _check_params(ctx: Context, params: Any, prefix: Path) -> None:
  have = {path_str(k): np.shape(x) for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  wanted = [p for p, ms in ctx.index.members.items() if any(m.role != STATISTIC for m in ms)]
  missing = [p for p in wanted if p not in have]
  if missing:
    raise ValueError(
        "The pruning spec does not match the params: no parameter at "
        f"{', '.join('/'.join(p) for p in missing[:5])}. Trace the spec from the same model "
        "(and pass prefix= if the spec's paths start with a collection name such as 'params').")
  for p in wanted:
    want = ctx.spec.shape_of(tuple(prefix) + p)
    if tuple(have[p]) != tuple(want):
      raise ValueError(f"The pruning spec does not match the params: {'/'.join(p)} has shape "
                       f"{tuple(have[p])}, the spec was traced with {tuple(want)}.")


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def prune(inner: optax.GradientTransformation, spec: GroupSpec, recipe: Recipe, *,
          prefix: Path = ()) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that training prunes ``spec``'s channel groups as ``recipe`` says.

  Args:
    inner: the optimizer that trains the network (e.g. ``optax.sgd(lr, momentum=0.9)``).
    spec: the model's channel groups, from ``trace_groups``.
    recipe: what, how much, when and how to prune (``dpm_jax.recipes``).
    prefix: stripped from the spec's paths to find them in the params tree (e.g.
      ``('params',)`` when a Linen model was traced with all its collections).

  Returns:
    An optax transformation; ``update`` needs ``params``. Extra keyword arguments are passed
    to ``inner`` (or ignored if it takes none).

  Raises:
    ValueError: a target the allocation's guard cannot reach (before training starts), a
      ``round_to`` off the widths the recipe's cost knows, or params that do not match the
      spec (at ``init``).
  """
  if not isinstance(recipe, Recipe):
    raise TypeError(f"recipe must be a dpm_jax.recipes.Recipe, got {type(recipe).__name__}.")
  ctx = Context.build(spec, recipe.target_flops, prefix, recipe.cost,
                      recipe.schedule.last_event)
  multiples = allocations.round_multiples(spec, recipe.round_to)
  step = ctx.cost.width_step
  if np.any(multiples % step):
    raise ValueError(
        f"Invalid pruning recipe: round_to={recipe.round_to!r} with a cost ({ctx.cost.unit}) "
        f"known only at widths in multiples of {step} (a latency table measured with "
        f"step={step}): other widths are not measured, and often run slower. Set the "
        f"recipe's round_to to a multiple of {step}.")
  recipe.allocation.check(ctx)
  recipe.schedule.check(ctx)
  rounding = bool((multiples > 1).any())
  minimum = np.asarray(recipe.allocation.minimum(spec))
  if rounding:
    allocations.check_reachable(
        ctx.cost, spec, allocations.rounded_minimum(np.asarray(spec.sizes), minimum, multiples),
        recipe.target_flops, guard=f"round_to={recipe.round_to} with the allocation's guard")
  criterion, allocation, schedule, removal = (recipe.criterion, recipe.allocation,
                                               recipe.schedule, recipe.removal)
  regularizer = recipe.regularizer
  dense = ctx.dense_cost
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    # optax.tree.map_params initialises with a placeholder that has no leaves: nothing to check.
    if jax.tree.leaves(params):
      _check_params(ctx, params, prefix)
    return PruneOptState(inner.init(params), state_lib.init(
        spec.sizes, criterion.init(ctx, params), allocation.init(ctx, params),
        schedule.init(ctx), removal.init(ctx, params),
        optax.EmptyState() if regularizer is None else regularizer.init(ctx, params)))

  def select(status, parts, params, target, count):
    """Selects at ``target`` (fraction of the dense cost) from ``params``; ``parts`` are the
    criterion, allocation and removal states."""
    crit_st, alloc_st, rem_st = parts
    scores = criterion.score(ctx, crit_st, params)
    active = status == ACTIVE
    removed = ~active
    target_cost = target * dense
    allocate = lambda candidates: allocation.select(ctx, alloc_st, scores, candidates, removed,
                                                    target_cost, params)
    # The removal's candidates are a preference (cooldown, protection); the target is not:
    # when they cannot meet it, every active channel is a candidate.
    candidates = removal.candidates(ctx, rem_st, status, count) & active
    preferred = allocate(candidates)
    short = ctx.cost_of(~preferred[0]) > target_cost * (1 + 1e-6)
    selected, alloc_st = jax.lax.cond(short, lambda: allocate(active), lambda: preferred)
    if rounding:  # every group's width a multiple of its round_to
      selected = allocations.round_widths(ctx.cost, ctx.index, scores, candidates, removed,
                                          selected, target_cost, minimum, multiples)
    new = selected & ~removed
    status, rem_st = removal.mark(ctx, rem_st, status, new, params)
    return status, (crit_st, alloc_st, rem_st), new

  def at_event(status, parts, params, target, count):
    crit_st, alloc_st, rem_st = parts
    status, rem_st = removal.begin_event(ctx, rem_st, status)
    return select(status, (crit_st, alloc_st, rem_st), params, target, count)

  def no_event(status, parts, *_):
    return status, parts, jnp.zeros(status.shape, bool)

  def busy_step(status, parts, step, target):
    status, parts, marked = jax.lax.cond(step.event, at_event, no_event, status, parts,
                                         step.params, target, step.count)
    crit_st, alloc_st, rem_st = parts
    stepped = jax.tree.map(lambda x, u: x + u.astype(x.dtype), step.params, step.updates)
    landed, status, rem_st, freed = removal.land(ctx, rem_st, status, step, stepped, marked)
    # Replace channels given back this step now, from the params they land on (the next
    # step's), so that the keep masks leaving every step meet the target in force.
    status, (crit_st, alloc_st, rem_st), _ = jax.lax.cond(
        jnp.any(freed), select, no_event, status, (crit_st, alloc_st, rem_st), landed,
        target, step.count + 1)

    def land(key_path, n, x, u):  # leaves without producer slices keep the inner update
      return (n - x).astype(u.dtype) if ctx.index.has_role(key_path) else u

    updates = jax.tree_util.tree_map_with_path(land, landed, step.params, step.updates)
    return updates, status, (crit_st, alloc_st, rem_st)

  def idle_step(status, parts, step, target):
    del target
    return step.updates, status, parts

  def update_fn(updates, opt_state: PruneOptState, params=None, **extra_args):
    if params is None:
      raise ValueError("dpm_jax.prune needs params: call tx.update(grads, opt_state, params).")
    grads = updates
    ps = opt_state.prune_state
    finite = _all_finite(grads)
    status = state_lib.channel_status(ps)
    event, target, sched_st = schedule.event(ctx, ps.schedule, ps.count, status)
    reg_st = ps.regularizer
    if regularizer is not None:
      updates, reg_st = regularizer.update(ctx, reg_st, grads, params, status, ps.count)
    inner_updates, inner_st = inner.update(updates, opt_state.inner_state, params, **extra_args)
    step = Step(params, grads, inner_updates, ps.count, event)
    # A step with non-finite gradients leaves the pruning state as it was: it is not busy,
    # and what changes outside the branch keeps its old value.
    busy = finite & (event | removal.busy(ctx, ps.removal, status))
    new_updates, status, (crit_st, alloc_st, rem_st) = jax.lax.cond(
        busy, busy_step, idle_step, status, (ps.criterion, ps.allocation, ps.removal), step,
        target)
    if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_ps = PruneState(ps.count + finite.astype(ps.count.dtype),
                        state_lib.split_status(ps, status),
                        if_finite(criterion.update(ctx, crit_st, step), crit_st), alloc_st,
                        if_finite(sched_st, ps.schedule), rem_st, if_finite(reg_st, ps.regularizer))
    return new_updates, PruneOptState(inner_st, new_ps)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(opt_state: Any, cls: type) -> list[Any]:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(x, cls)]


def prune_state(opt_state: Any) -> PruneState:
  """The ``PruneState`` inside an optax state, wherever it sits (chain, MultiSteps, ...)."""
  found = _find(opt_state, PruneState)
  if len(found) != 1:
    raise ValueError(f"Expected one PruneState in the optimizer state, found {len(found)}: "
                     "is the optimizer built with dpm_jax.prune (exactly once)?")
  return found[0]


def inner_state(opt_state: Any) -> optax.OptState:
  """The wrapped optimizer's state (to slice after surgery and keep fine-tuning with)."""
  found = _find(opt_state, PruneOptState)
  if len(found) != 1:
    raise ValueError(f"Expected one dpm_jax.prune state, found {len(found)}.")
  return found[0].inner_state


def keep_masks(opt_state: Any) -> list[np.ndarray]:
  """The keep mask of every group (``False``: selected for removal), for ``remove_channels``."""
  return [np.asarray(k) for k in prune_state(opt_state).keep]


def finalize(params: Any, opt_state: Any, spec: GroupSpec, *,
             prefix: Path = ()) -> tuple[Any, list[np.ndarray]]:
  """Makes the pruning final: every channel selected for removal is exactly zero.

  Channels still decaying, and soft-pruned channels that regrew since their event, are cut to
  zero now. Returns the params and the keep masks, ready for ``remove_channels`` (which is
  then exact).
  """
  keep = keep_masks(opt_state)
  return zero_channels(params, spec, keep, prefix=prefix), keep
