"""The pruning optax transform: a recipe run inside the optimizer, one compile for a run.

``prune(inner, spec, recipe)`` wraps an inner optax optimizer. Its state holds the inner state
and the ``PruneState``. Each step it

1. selects channels at the recipe's events, from the parameters before the step;
2. runs the inner optimizer, giving ``x~ = x + u``;
3. for ``removal='dpm'``, updates the gradient history and releases decaying channels that
   pass the self-rectifying test;
4. rescales decaying channels onto their decayed norm and holds pruned channels at zero;
5. selects replacements for channels released this step, from the parameters after it, so
   that the keep masks leaving every step meet the FLOPs target;

and returns updates such that ``optax.apply_updates`` lands every parameter on its pruned or
decayed value: there is no second call to remember. Every decision is taken on array values
inside ``jax.lax.cond``, so the step compiles once. Put ``prune`` outermost: a transform
chained after it would move parameters off their decayed values.

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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpm_jax import allocation
from dpm_jax import channels
from dpm_jax import criteria
from dpm_jax import state as state_lib
from dpm_jax.groups import STATISTIC, GroupSpec, Path, path_str
from dpm_jax.recipes import Recipe
from dpm_jax.state import PruneState
from dpm_jax.surgery import zero_channels

__all__ = ["PruneOptState", "prune", "prune_state", "keep_masks", "finalize", "inner_state"]


class PruneOptState(NamedTuple):
  """State of ``prune``: the inner optimizer's state and the pruning state."""

  inner_state: optax.OptState
  prune_state: PruneState


def _check_params(spec: GroupSpec, index: channels.ChannelIndex, params: Any,
                  prefix: Path) -> None:
  shapes = dict(spec.shapes)
  have = {path_str(k): np.shape(x) for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  wanted = [p for p, ms in index.members.items() if any(m.role != STATISTIC for m in ms)]
  missing = [p for p in wanted if p not in have]
  if missing:
    raise ValueError(
        "The pruning spec does not match the params: no parameter at "
        f"{', '.join('/'.join(p) for p in missing[:5])}. Trace the spec from the same model "
        "(and pass prefix= if the spec's paths start with a collection name such as 'params').")
  for p in wanted:
    want = shapes[tuple(prefix) + p]
    if tuple(have[p]) != tuple(want):
      raise ValueError(f"The pruning spec does not match the params: {'/'.join(p)} has shape "
                       f"{tuple(have[p])}, the spec was traced with {tuple(want)}.")


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
    ValueError: a target the minimum-channels guard cannot reach (before training starts), or
      params that do not match the spec (at ``init``).
  """
  if not isinstance(recipe, Recipe):
    raise TypeError(f"recipe must be a dpm_jax.recipes.Recipe, got {type(recipe).__name__}.")
  index = channels.ChannelIndex.build(spec, prefix)
  flops = allocation.FlopsModel.build(spec)
  minimum = allocation.min_keep(spec, recipe.min_channels, recipe.min_fraction)
  allocation.check_reachable(flops, spec, minimum, recipe.target_flops)
  dense = flops.dense_macs
  event_steps = np.asarray(recipe.event_steps, np.int32)
  event_macs = np.asarray(recipe.event_targets, np.float32) * np.float32(dense)
  if recipe.allocation == "global":
    select_fn = functools.partial(allocation.select_global,
                                  tolerance_macs=recipe.flops_tolerance * dense)
  else:
    select_fn = allocation.select_uniform
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _check_params(spec, index, params, prefix)
    return PruneOptState(inner.init(params), state_lib.init(spec.sizes))

  def select(ps: PruneState, params: Any, target: jax.Array) -> PruneState:
    scores = criteria.score(recipe.criterion, index, params)
    cooled = ps.count - ps.released_at >= recipe.cooldown
    candidates = (ps.status == state_lib.ACTIVE) & cooled
    removed = ~state_lib.flat_keep(ps)
    normalized = criteria.normalize(index, scores, where=~removed)
    selected = select_fn(flops, normalized, candidates, removed, target, jnp.asarray(minimum))
    norms = jnp.sqrt(channels.sq_norms(index, params))
    return state_lib.mark_selected(ps, selected, norms, hard=recipe.removal == "hard",
                                   scores=scores)

  def decay(ps: PruneState, params: Any, grads: Any, stepped: Any):
    norms_after = jnp.sqrt(channels.sq_norms(index, stepped))
    if recipe.removal == "dpm":
      norms = jnp.sqrt(channels.sq_norms(index, params))
      rate = (norms_after - norms) / jnp.maximum(norms, 1e-12)
      grad_norms = jnp.sqrt(channels.sq_norms(index, grads))
      ps = state_lib.update_gradient_history(ps, grad_norms, rate, recipe.ema_decay)
      active_mean = channels.segment_mean(index, ps.grad_norm_ema,
                                          ps.status == state_lib.ACTIVE)
      relative = ps.grad_norm_ema / jnp.maximum(active_mean, 1e-12)
      ps = state_lib.release(ps, relative, rate_threshold=recipe.rate_threshold,
                             len_threshold=recipe.len_threshold, logic=recipe.logic,
                             min_decay_steps=recipe.min_decay_steps)
    return state_lib.decay_factors(ps, norms_after, recipe.decay_steps)

  def hold(ps: PruneState, params: Any, grads: Any, stepped: Any):
    # Nothing decays: pruned channels are held at zero, no norms needed.
    return ps, (ps.status != state_lib.PRUNED).astype(jnp.float32)

  def remove(ps: PruneState, params: Any, grads: Any, updates: Any):
    stepped = jax.tree.map(lambda x, u: x + u.astype(x.dtype), params, updates)
    decaying = jnp.any(ps.status == state_lib.DECAYING)
    ps, factor = jax.lax.cond(decaying, decay, hold, ps, params, grads, stepped)
    landed = channels.scale(index, stepped, factor)

    def land(key_path, n, x, u):  # leaves without producer slices keep the inner update
      return (n - x).astype(u.dtype) if index.has_role(key_path) else u

    return jax.tree_util.tree_map_with_path(land, landed, params, updates), ps

  def step(ps: PruneState, params: Any, grads: Any, updates: Any, event: jax.Array,
           target: jax.Array, refill_allowed: jax.Array):
    ps = jax.lax.cond(event, select, lambda ps, *_: ps, ps, params, target)
    new_updates, ps = remove(ps, params, grads, updates)
    refill = jnp.any(ps.released_at == ps.count) & refill_allowed
    ps = ps._replace(count=ps.count + 1)
    # Replace channels released this step now, from the params they land on (the next
    # step's), so that the keep masks leaving every step meet the target.
    ps = jax.lax.cond(refill, lambda ps, p, u, t: select(ps, optax.apply_updates(p, u), t),
                      lambda ps, *_: ps, ps, params, new_updates, target)
    return new_updates, ps

  def skip(ps: PruneState, params: Any, grads: Any, updates: Any, *_):
    return updates, ps._replace(count=ps.count + 1)

  def update_fn(updates, opt_state: PruneOptState, params=None, **extra_args):
    if params is None:
      raise ValueError("dpm_jax.prune needs params: call tx.update(grads, opt_state, params).")
    grads = updates
    inner_updates, inner_st = inner.update(grads, opt_state.inner_state, params, **extra_args)
    ps = opt_state.prune_state
    passed = ps.count >= event_steps
    event = jnp.any(ps.count == event_steps)
    target = jnp.asarray(event_macs)[jnp.maximum(jnp.sum(passed) - 1, 0)]
    # One branch point while nothing is selected (before the first event): no overhead.
    busy = event | jnp.any(ps.status != state_lib.ACTIVE)
    new_updates, ps = jax.lax.cond(busy, step, skip, ps, params, grads, inner_updates, event,
                                   target, jnp.any(passed))
    return new_updates, PruneOptState(inner_st, ps)

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

  Channels still decaying are cut to zero now. Returns the params and the keep masks, ready
  for ``remove_channels`` (which is then exact).
  """
  keep = keep_masks(opt_state)
  return zero_channels(params, spec, keep, prefix=prefix), keep
