"""Tests for the removals and the pruning state: their pure functions, and DPM's smooth
pruning and self-rectifying as the transform runs them.

The unit tests use small hand-made arrays with hand-computed expectations. The transform
tests feed hand-crafted gradients to ``dpm_jax.prune`` on a tiny MLP (one group of 8
channels: ``w1`` column + ``b1`` entry produce a channel, the ``w2`` row consumes it) or on a
tiny NNX conv + BatchNorm model, and check DPM's arithmetic step by step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import pruning
from dpm_jax import recipes
from dpm_jax.pruning import removals
from dpm_jax.pruning import state
from dpm_jax.pruning.base import ACTIVE, DECAYING, PRUNED, SOFT

# ----------------------------------------------------------------------------------------
# Helpers.


def _i8(values) -> jax.Array:
  return jnp.asarray(values, jnp.int8)


def _prune_state(status_per_group) -> state.PruneState:
  empty = optax.EmptyState()
  s = state.init([len(s) for s in status_per_group], empty, empty, empty, empty, empty)
  return s._replace(status=tuple(_i8(s) for s in status_per_group))


def _keep_lists(s: state.PruneState) -> list[list[bool]]:
  return [np.asarray(k).tolist() for k in s.keep]


def _mlp(v, x):
  return jnp.maximum(x @ v["w1"] + v["b1"], 0) @ v["w2"]


NUM_IN, WIDTH, NUM_OUT = 4, 8, 2


def _mlp_params(small: dict[int, float], seed: int = 0) -> dict[str, jax.Array]:
  """Random MLP params; channel ``c`` in ``small`` gets its producer slices scaled down so
  that it is selected first (by the producers' L2 norm) in ascending order of the factor."""
  rng = np.random.default_rng(seed)
  w1 = rng.standard_normal((NUM_IN, WIDTH)).astype(np.float32)
  b1 = 0.5 * rng.standard_normal(WIDTH).astype(np.float32)
  # Make every channel's norm comfortably larger than the scaled ones.
  norms = np.sqrt((w1**2).sum(0) + b1**2)
  w1, b1 = w1 / norms * 2.0, b1 / norms * 2.0
  for c, f in small.items():
    w1[:, c] *= f
    b1[c] *= f
  w2 = rng.standard_normal((WIDTH, NUM_OUT)).astype(np.float32)
  return {"w1": w1, "b1": b1, "w2": w2}


@functools.cache
def _mlp_spec() -> dpm_jax.GroupSpec:
  return dpm_jax.trace_groups_fn(_mlp, _mlp_params({}), jnp.zeros((1, NUM_IN)))


def _channel(params, c: int) -> np.ndarray:
  """The producer vector of MLP channel ``c``: its ``w1`` column and ``b1`` entry."""
  return np.concatenate([np.asarray(params["w1"][:, c]), np.asarray(params["b1"][c : c + 1])])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _make_step(tx):
  """A jitted optimizer step on given gradients: ``(params, opt_state, grads)``."""

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _random_grads(params, seed: int):
  """Standard normal numpy arrays shaped like ``params`` (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(np.shape(x)).astype(x.dtype), params)


# ----------------------------------------------------------------------------------------
# The state: keep masks and ratios follow from the status.


def test_init_is_all_active():
  empty = optax.EmptyState()
  s = state.init((3, 2), empty, empty, empty, empty, empty)
  assert all(x.dtype == jnp.int8 for x in s.status)
  np.testing.assert_array_equal(state.channel_status(s), np.zeros(5))
  assert _keep_lists(s) == [[True] * 3, [True] * 2]
  np.testing.assert_array_equal(state.ratios(s), [0.0, 0.0])
  assert int(s.count) == 0
  released, _ = state.given_back(s)
  np.testing.assert_array_equal(released, np.zeros(5))


def test_state_is_a_pytree_of_fixed_shapes():
  # A step count and one int8 status per group, whatever the statuses: a jitted step keeps
  # the same shapes and dtypes (no retrace, no promotion).
  empty = optax.EmptyState()
  fresh = state.init((3, 2), empty, empty, empty, empty, empty)
  s = _prune_state([[ACTIVE, DECAYING, PRUNED], [SOFT, ACTIVE]])
  stepped = jax.jit(lambda s: s._replace(count=s.count + 1))(s)
  assert isinstance(stepped, state.PruneState)
  for tree in (fresh, s, stepped):
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(tree)] == [
        ((), jnp.int32), ((3,), jnp.int8), ((2,), jnp.int8)]


def test_keep_is_active_and_ratios_are_the_removed_share():
  # Decaying, pruned and soft-pruned channels are all selected for removal: not kept.
  s = _prune_state([[ACTIVE, DECAYING, PRUNED], [SOFT, ACTIVE]])
  assert _keep_lists(s) == [[True, False, False], [False, True]]
  np.testing.assert_allclose(state.ratios(s), [2 / 3, 1 / 2], rtol=1e-6)
  flat = state.channel_status(s)
  np.testing.assert_array_equal(flat, [ACTIVE, DECAYING, PRUNED, SOFT, ACTIVE])
  back = state.split_status(s, flat.at[0].set(PRUNED))
  assert [x.tolist() for x in back] == [[PRUNED, DECAYING, PRUNED], [SOFT, ACTIVE]]


# ----------------------------------------------------------------------------------------
# What selection does: Hard, Soft and SmoothPruning's mark.


def _ctx(sizes=(3, 2)) -> pruning.Context:
  """A context with groups of ``sizes``: an MLP 4 -> a -> b -> 2."""
  a, b = sizes

  def mlp(v, x):
    return jnp.maximum(jnp.maximum(x @ v["w1"] + v["b1"], 0) @ v["w2"], 0) @ v["w3"]

  v = {"w1": jnp.zeros((4, a)), "b1": jnp.zeros(a), "w2": jnp.zeros((a, b)),
       "w3": jnp.zeros((b, 2))}
  return pruning.Context.build(dpm_jax.trace_groups_fn(mlp, v, jnp.zeros((1, 4))), 0.5)


def _params_with_norms(norms_a, norms_b) -> dict[str, jax.Array]:
  """MLP params whose channels' producer norms are ``norms_a`` and ``norms_b``."""
  w1 = np.zeros((4, len(norms_a)), np.float32)
  w1[0] = norms_a
  w2 = np.zeros((len(norms_a), len(norms_b)), np.float32)
  w2[0] = norms_b
  return {"w1": jnp.asarray(w1), "b1": jnp.zeros(len(norms_a)), "w2": jnp.asarray(w2),
          "w3": jnp.ones((len(norms_b), 2))}


@pytest.mark.parametrize("removal, mark", [
    (removals.Hard(), PRUNED), (removals.Soft(), SOFT),
    (removals.SmoothPruning(decay_steps=4), DECAYING)])
def test_mark(removal, mark):
  ctx = _ctx()
  params = _params_with_norms([1.0, 2.0, 3.0], [4.0, 5.0])
  status = _i8([ACTIVE] * 5)
  new = np.array([False, True, True, False, True])
  out, st = removal.mark(ctx, removal.init(ctx, params), status, new, params)
  np.testing.assert_array_equal(out, [ACTIVE, mark, mark, ACTIVE, mark])
  if isinstance(removal, removals.SmoothPruning):
    np.testing.assert_allclose(st.init_norm, [0.0, 2.0, 3.0, 0.0, 5.0])  # L_init
    np.testing.assert_array_equal(st.decay_step, np.zeros(5))
  else:
    assert st == optax.EmptyState()  # no memory: nothing in the pruning state


def test_mark_leaves_channels_not_marked_alone():
  ctx = _ctx((2, 2))
  removal = removals.SelfRectifying(decay_steps=10, min_decay_steps=1)
  st = removal.init(ctx, None)._replace(
      decay_step=jnp.asarray([3, 0, 0, 0], jnp.int32),
      init_norm=jnp.asarray([7.0, 8.0, 0.0, 0.0]),
      rate_ema=jnp.asarray([0.5, 0, 0.4, 0], jnp.float32))
  status = _i8([DECAYING, DECAYING, ACTIVE, ACTIVE])
  params = _params_with_norms([1.0, 1.0], [9.0, 1.0])
  out, st = removal.mark(ctx, st, status, np.array([False, False, True, False]), params)
  # Channel 0 keeps decaying from where it was; channel 2 is new (its rate EMA restarts).
  np.testing.assert_array_equal(out, [DECAYING, DECAYING, DECAYING, ACTIVE])
  np.testing.assert_array_equal(st.decay_step, [3, 0, 0, 0])
  np.testing.assert_array_equal(st.init_norm, [7.0, 8.0, 9.0, 0.0])
  np.testing.assert_array_equal(st.rate_ema, [0.5, 0.0, 0.0, 0.0])


def test_soft_removal_selects_afresh_at_every_event():
  ctx = _ctx()
  status = _i8([SOFT, ACTIVE, SOFT, ACTIVE, SOFT])
  for removal in (removals.Soft(), removals.SmoothPruning(decay_steps=2, soft=True)):
    out, _ = removal.begin_event(ctx, removal.init(ctx, None), status)
    np.testing.assert_array_equal(out, np.zeros(5))
  # Hard removal and held smooth pruning keep earlier selections.
  for removal in (removals.Hard(), removals.SmoothPruning(decay_steps=2)):
    out, _ = removal.begin_event(ctx, removal.init(ctx, None), status)
    np.testing.assert_array_equal(out, status)


def test_cooldown_keeps_released_channels_out_of_the_candidates():
  ctx = _ctx((2, 2))
  removal = removals.SelfRectifying(decay_steps=10, min_decay_steps=1, cooldown=5)
  st = removal.init(ctx, None)._replace(released_at=jnp.asarray([10, 12, 0, 14], jnp.int32))
  status = _i8([ACTIVE, ACTIVE, DECAYING, ACTIVE])
  np.testing.assert_array_equal(removal.candidates(ctx, st, status, jnp.asarray(16)),
                                [True, False, False, False])
  np.testing.assert_array_equal(removals.Hard().candidates(ctx, None, status, 16),
                                [True, True, False, True])


# ----------------------------------------------------------------------------------------
# decay_factors.


def test_decay_factors_hand_computed():
  # N = 4. ch0 active; ch1 decaying, n 0 -> 1, L_init 2; ch2 decaying n 3 -> 4 (= N);
  # ch3 pruned; ch4 decaying with x~ = 0 (no NaN).
  status = _i8([ACTIVE, DECAYING, DECAYING, PRUNED, DECAYING])
  out, n, factor = removals.decay_factors(
      status, jnp.asarray([0, 0, 3, 4, 1]), jnp.asarray([9.0, 2.0, 4.0, 1.0, 3.0]),
      jnp.array([1.0, 4.0, 2.0, 5.0, 0.0]), 4)
  # ch1: target 2 * (4 - 1) / 4 = 1.5 over ||x~|| = 4.
  np.testing.assert_allclose(factor, [1.0, 0.375, 0.0, 0.0, 0.0], rtol=1e-7)
  np.testing.assert_array_equal(out, [ACTIVE, DECAYING, PRUNED, PRUNED, DECAYING])
  np.testing.assert_array_equal(n, [0, 1, 4, 4, 2])
  assert np.all(np.isfinite(factor))
  # Not held: the channel that reaches zero is soft-pruned, free to regrow.
  out, _, factor = removals.decay_factors(
      status, jnp.asarray([0, 0, 3, 4, 1]), jnp.asarray([9.0, 2.0, 4.0, 1.0, 3.0]),
      jnp.array([1.0, 4.0, 2.0, 5.0, 0.0]), 4, hold=False)
  np.testing.assert_array_equal(out, [ACTIVE, DECAYING, SOFT, PRUNED, DECAYING])
  assert float(factor[2]) == 0.0


@pytest.mark.parametrize("decay_steps", [1, 3, 5])
def test_decay_factors_reach_zero_after_exactly_n_steps(decay_steps):
  status, n = _i8([DECAYING]), jnp.zeros(1, jnp.int32)
  l_init = jnp.array([2.0])
  norm = 2.0
  for step in range(1, decay_steps + 1):
    status, n, factor = removals.decay_factors(status, n, l_init, jnp.array([norm * 1.1]),
                                               decay_steps)
    norm = float(norm * 1.1 * factor[0])
    np.testing.assert_allclose(norm, 2.0 * (decay_steps - step) / decay_steps, atol=1e-6)
    assert int(status[0]) == (PRUNED if step == decay_steps else DECAYING)
  assert norm == 0.0
  # Held at zero from then on.
  status, n, factor = removals.decay_factors(status, n, l_init, jnp.array([1.0]), decay_steps)
  assert float(factor[0]) == 0.0 and int(status[0]) == PRUNED


def test_decay_factors_jit():
  fn = jax.jit(removals.decay_factors, static_argnums=(4, 5))
  status, n, factor = fn(_i8([DECAYING, ACTIVE]), jnp.zeros(2, jnp.int32), jnp.ones(2),
                         jnp.array([1.0, 1.0]), 2, True)
  np.testing.assert_allclose(factor, [0.5, 1.0])
  np.testing.assert_array_equal(n, [1, 0])


# ----------------------------------------------------------------------------------------
# update_gradient_history.


def test_update_gradient_history_hand_computed():
  # ch0 active, ch1 decaying (first step: the rate EMA starts at the rate), ch2 decaying
  # (later step), ch3 pruned.
  grad_ema, rate_ema = removals.update_gradient_history(
      _i8([ACTIVE, DECAYING, DECAYING, PRUNED]), jnp.asarray([0, 0, 2, 5]),
      jnp.asarray([1.0, 2.0, 3.0, 4.0]), jnp.asarray([0.7, 0.7, 0.5, 0.3]),
      jnp.array([3.0, 4.0, 5.0, 6.0]), jnp.array([0.1, 0.2, -0.5, 0.9]), 0.75)
  np.testing.assert_allclose(
      grad_ema,
      [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 4, 0.75 * 3 + 0.25 * 5, 0.75 * 4 + 0.25 * 6],
      rtol=1e-6,
  )
  np.testing.assert_allclose(rate_ema, [0.7, 0.2, 0.75 * 0.5 + 0.25 * -0.5, 0.3], rtol=1e-6)


def test_update_gradient_history_zero_decay_is_the_last_value():
  grad_ema, rate_ema = removals.update_gradient_history(
      _i8([DECAYING, ACTIVE]), jnp.asarray([3, 0]), jnp.asarray([5.0, 5.0]),
      jnp.asarray([0.9, 0.0]), jnp.array([1.0, 2.0]), jnp.array([-0.2, 0.4]), 0.0)
  np.testing.assert_allclose(grad_ema, [1.0, 2.0])
  np.testing.assert_allclose(rate_ema, [-0.2, 0.0])


# ----------------------------------------------------------------------------------------
# release and record_release.

# Group 0: ch0..ch3 decaying after 3 steps, with (rate, len) = (+, +), (+, -), (-, +),
# (-, -); ch4 active and ch5 pruned, both passing both tests (never released).
# Group 1: ch6 decaying after 1 step only, passing both tests.
RELEASE_STATUS = _i8([DECAYING] * 4 + [ACTIVE, PRUNED, DECAYING])
RELEASE_DECAY_STEP = jnp.asarray([3, 3, 3, 3, 0, 5, 1], jnp.int32)
RELEASE_RATE_EMA = jnp.asarray([0.2, 0.2, -0.2, -0.2, 0.2, 0.2, 0.2], jnp.float32)
RELATIVE_GRAD = jnp.array([2.0, 0.5, 2.0, 0.5, 2.0, 2.0, 2.0])


def _release(**kwargs) -> np.ndarray:
  kw = dict(rate_threshold=0.1, len_threshold=1.0, logic="and", min_decay_steps=2)
  kw.update(kwargs)
  return np.asarray(removals.release(RELEASE_STATUS, RELEASE_DECAY_STEP, RELEASE_RATE_EMA,
                                     RELATIVE_GRAD, **kw))


@pytest.mark.parametrize(
    "logic, released", [("and", [1, 0, 0, 0, 0, 0, 0]), ("or", [1, 1, 1, 0, 0, 0, 0])]
)
def test_release_logic(logic, released):
  np.testing.assert_array_equal(_release(logic=logic), np.asarray(released, bool))


def test_release_waits_for_min_decay_steps():
  # ch6 (1 decay step) passes both tests but must wait for min_decay_steps = 2.
  assert not _release(min_decay_steps=2)[6]
  assert _release(min_decay_steps=1)[6]
  # ch0 (3 steps) is not released with min_decay_steps = 4.
  assert not _release(min_decay_steps=4).any()


def test_release_thresholds_are_strict():
  assert not _release(rate_threshold=0.2, min_decay_steps=0).any()
  assert not _release(len_threshold=2.0, min_decay_steps=0).any()


def test_record_release():
  ctx = _ctx((6, 1))
  st = removals.SelfRectifying(decay_steps=10, min_decay_steps=1).init(ctx, None)._replace(
      decay_step=RELEASE_DECAY_STEP, rate_ema=RELEASE_RATE_EMA, init_norm=jnp.full(7, 2.0),
      released=jnp.asarray([2, 0, 0, 0, 0, 0, 0], jnp.int32))
  go = _release(logic="or", min_decay_steps=1)   # ch0, ch1, ch2 and ch6
  out, status = removals.record_release(st, RELEASE_STATUS, go, jnp.asarray(17))
  np.testing.assert_array_equal(status, np.where(go, ACTIVE, np.asarray(RELEASE_STATUS)))
  np.testing.assert_array_equal(out.released, [3, 1, 1, 0, 0, 0, 1])  # counts accumulate
  np.testing.assert_array_equal(out.released_at[go], 17)
  np.testing.assert_array_equal(out.released_at[~go], st.released_at[~go])
  np.testing.assert_array_equal(out.decay_step, np.where(go, 0, RELEASE_DECAY_STEP))
  # A released channel keeps what it remembered of its decay.
  np.testing.assert_array_equal(out.init_norm, st.init_norm)
  # Kept again, so the group's removed share falls.
  s = _prune_state([status[:6], status[6:]])
  assert _keep_lists(s) == [[True, True, True, False, True, False], [True]]


# ----------------------------------------------------------------------------------------
# Smooth pruning through the transform.

DECAY_STEPS = 5
LR = 0.1
# Removing one of 8 equally costly channels leaves 7/8 of the MACs.
ONE_CHANNEL = 7 / 8


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_smooth_pruning_arithmetic(momentum):
  params = _mlp_params({3: 0.1})
  spec = _mlp_spec()
  recipe = recipes.depgraph(ONE_CHANNEL, "dpm_sp", criterion="l2", decay_steps=DECAY_STEPS)
  inner = optax.sgd(LR, momentum=momentum)
  tx = dpm_jax.prune(inner, spec, recipe)
  step = _make_step(tx)
  opt_state = tx.init(params)
  # The plain inner optimizer on the same gradients, for reference. (SGD's update does not
  # depend on the params: u is also the inner update the pruned run sees.)
  ref_step = _make_step(inner)
  inner_update = jax.jit(inner.update)
  ref_params, ref_state = params, inner.init(params)
  l_init = np.linalg.norm(_channel(params, 3))
  active = np.arange(WIDTH) != 3
  for i in range(DECAY_STEPS + 4):
    grads = _random_grads(params, seed=100 + i)
    u, _ = inner_update(grads, ref_state, params)
    old = _channel(params, 3)
    params, opt_state = step(params, opt_state, grads)
    ref_params, ref_state = ref_step(ref_params, ref_state, grads)
    n = i + 1
    ps = dpm_jax.prune_state(opt_state)
    assert dpm_jax.keep_masks(opt_state)[0].tolist() == active.tolist()
    new = _channel(params, 3)
    if n < DECAY_STEPS:
      np.testing.assert_allclose(
          np.linalg.norm(new), l_init * (DECAY_STEPS - n) / DECAY_STEPS, rtol=1e-5
      )
      # Direction: the optimizer's, x + u.
      stepped = old + _channel(u, 3)
      assert _cosine(new, stepped) == pytest.approx(1.0, abs=1e-6)
      assert int(ps.status[0][3]) == DECAYING and int(ps.removal.decay_step[3]) == n
    else:
      # Exactly zero at step N and after it, although gradients keep coming.
      assert np.all(new == 0.0), (n, new)
      assert int(ps.status[0][3]) == PRUNED
    # Active channels and consumers: the plain optimizer's result.
    np.testing.assert_allclose(
        params["w1"][:, active], ref_params["w1"][:, active], rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(params["b1"][active], ref_params["b1"][active], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(params["w2"], ref_params["w2"], rtol=1e-6, atol=1e-6)
  # The consumer row of the pruned channel is not touched by pruning.
  assert np.any(np.asarray(params["w2"][3]) != 0)


class _ConvBN(nnx.Module):
  """conv (with bias) -> BatchNorm -> relu -> global mean -> dense."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), use_bias=True, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2)))


PRODUCER_PATHS = (("conv", "kernel"), ("conv", "bias"), ("bn", "scale"), ("bn", "bias"))


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def _slice(tree, path, c):
  x = _get(tree, path)
  return x[..., c]


def test_kernel_bias_and_batchnorm_decay_together():
  model = nnx.eval_shape(lambda: _ConvBN(nnx.Rngs(0)))  # shapes only
  spec = dpm_jax.trace_groups(model, jax.ShapeDtypeStruct((1, 5, 5, 1), jnp.float32))
  assert {m.path for m in spec.groups[0].producers()} == set(PRODUCER_PATHS)
  params = _random_grads(nnx.to_pure_dict(nnx.state(model, nnx.Param)), seed=7)
  # Non-trivial BN scale and bias and conv bias; channel 1 is the weakest.
  params["bn"]["scale"] = np.array([1.0, 0.2, 1.5, 0.9], np.float32)
  params["bn"]["bias"] = np.array([0.3, -0.1, 0.2, -0.4], np.float32)
  params["conv"]["bias"] *= 0.1
  params["conv"]["kernel"][..., 1] *= 0.1
  recipe = recipes.depgraph(0.75, "dpm_sp", criterion="l2", decay_steps=4)
  tx = dpm_jax.prune(optax.sgd(LR), spec, recipe)
  step = _make_step(tx)
  opt_state = tx.init(params)
  c = 1
  l_init = np.sqrt(sum(np.sum(_slice(params, p, c) ** 2) for p in PRODUCER_PATHS))
  for i in range(6):
    grads = _random_grads(params, seed=i)
    old = params
    params, opt_state = step(params, opt_state, grads)
    n = i + 1
    assert dpm_jax.keep_masks(opt_state)[0].tolist() == [True, False, True, True]
    stepped = {p: _slice(old, p, c) - LR * _slice(grads, p, c) for p in PRODUCER_PATHS}
    new = {p: _slice(params, p, c) for p in PRODUCER_PATHS}
    norm_stepped = np.sqrt(sum(np.sum(v**2) for v in stepped.values()))
    factor = max(4 - n, 0) / 4 * l_init / norm_stepped
    for p in PRODUCER_PATHS:
      # Every producer member shrinks by the same factor this step.
      np.testing.assert_allclose(
          new[p], factor * stepped[p], rtol=1e-5, atol=1e-7, err_msg=f"{'/'.join(p)} at step {n}"
      )
      if n >= 4:
        assert np.all(new[p] == 0.0)
      # The other channels follow plain SGD.
      others = np.arange(4) != c
      np.testing.assert_allclose(
          _get(params, p)[..., others],
          (_get(old, p) - LR * _get(grads, p))[..., others],
          rtol=1e-6,
          atol=1e-6,
      )


# ----------------------------------------------------------------------------------------
# Self-rectifying through the transform.

SR_DECAY_STEPS = 10
SR_MIN_DECAY_STEPS = 2
# Channel 0 is pushed up by the optimizer and has a large gradient: released. Channel 1 has
# as large a gradient but is pushed down: not released (AND logic).
RISING, FALLING = 0, 1
PUSH = 0.5  # |g| = PUSH * ||x||: rate = +-LR * PUSH = +-0.05
ACTIVE_GRAD_SCALE = 0.01  # the active channels' gradients are small


def _sr_recipe(**overrides):
  kw = dict(
      criterion="l2",
      allocation="global",
      target_flops=0.75,
      removal="dpm",
      decay_steps=SR_DECAY_STEPS,
      min_decay_steps=SR_MIN_DECAY_STEPS,
      rate_threshold=0.0,
      len_threshold=1.5,
      ema_decay=0.5,
      logic="and",
      cooldown=100,
  )
  kw.update(overrides)
  return recipes.depgraph(kw.pop("target_flops"), kw.pop("removal"), **kw)


def _sr_grads(params, seed, released: bool):
  """Small random gradients; RISING's grows its norm (until it is released, then it trains
  like the others), FALLING's shrinks it."""
  g = jax.tree.map(lambda x: ACTIVE_GRAD_SCALE * x, _random_grads(params, seed))
  w1, b1 = np.asarray(params["w1"]), np.asarray(params["b1"])
  if not released:
    g["w1"][:, RISING] = -PUSH * w1[:, RISING]
    g["b1"][RISING] = -PUSH * b1[RISING]
  g["w1"][:, FALLING] = PUSH * w1[:, FALLING]
  g["b1"][FALLING] = PUSH * b1[FALLING]
  return g


@functools.cache
def _run_sr(recipe, num_steps=SR_DECAY_STEPS + 6):
  """The SR run (cached: the tests below read the same run; they must not modify it)."""
  params = _mlp_params({RISING: 0.1, FALLING: 0.15})
  spec = _mlp_spec()
  tx = dpm_jax.prune(optax.sgd(LR), spec, recipe)
  step = _make_step(tx)
  opt_state = tx.init(params)
  l_init = np.linalg.norm(_channel(params, RISING))
  history = []
  released = False
  for i in range(num_steps):
    grads = _sr_grads(params, seed=i, released=released)
    new_params, opt_state = step(params, opt_state, grads)
    history.append(
        dict(
            params=params,
            grads=grads,
            new_params=new_params,
            prune_state=dpm_jax.prune_state(opt_state),
            keep=dpm_jax.keep_masks(opt_state),
        )
    )
    params = new_params
    released = bool(history[-1]["prune_state"].removal.released[RISING])
  return spec, l_init, history


def test_self_rectifying_releases_and_keeps_partly_decayed_weights():
  spec, l_init, history = _run_sr(_sr_recipe())
  first = history[0]
  assert first["keep"][0].tolist() == [i not in (RISING, FALLING) for i in range(WIDTH)]
  # Released at the first step allowed: after min_decay_steps decay steps.
  release_step = SR_MIN_DECAY_STEPS
  for i, h in enumerate(history[:release_step]):
    assert int(h["prune_state"].status[0][RISING]) == DECAYING, i
  h = history[release_step]
  ps = h["prune_state"]
  assert int(ps.status[0][RISING]) == ACTIVE
  assert int(ps.removal.released[RISING]) == 1
  assert int(ps.removal.released_at[RISING]) == release_step
  assert bool(h["keep"][0][RISING])
  # It keeps its partly decayed weights: the release step is a plain step from the decayed
  # norm L_init * (N - 2) / N, grown by the rate.
  norm = np.linalg.norm(_channel(h["new_params"], RISING))
  assert 0.0 < norm < l_init
  expected = l_init * (SR_DECAY_STEPS - release_step) / SR_DECAY_STEPS * (1 + LR * PUSH)
  np.testing.assert_allclose(norm, expected, rtol=1e-5)
  # Then it trains normally: its updates are the plain SGD updates.
  for h in history[release_step + 1 :]:
    np.testing.assert_allclose(
        _channel(h["new_params"], RISING),
        _channel(h["params"], RISING) - LR * _channel(h["grads"], RISING),
        rtol=1e-6,
        atol=1e-7,
    )
    assert int(h["prune_state"].status[0][RISING]) == ACTIVE
    assert int(h["prune_state"].removal.released[RISING]) == 1
  # Only RISING was released.
  assert int(history[-1]["prune_state"].removal.released.sum()) == 1


def test_self_rectifying_does_not_release_a_falling_channel():
  spec, _, history = _run_sr(_sr_recipe())
  for i, h in enumerate(history):
    ps = h["prune_state"]
    assert int(ps.removal.released[FALLING]) == 0
    assert not h["keep"][0][FALLING]
    if i + 1 < SR_DECAY_STEPS:
      assert int(ps.status[0][FALLING]) == DECAYING, i
    else:
      assert int(ps.status[0][FALLING]) == PRUNED, i
      assert np.all(_channel(h["new_params"], FALLING) == 0.0), i
  # When RISING is released FALLING's gradient is as large (it passes the length test): the
  # rate test is what keeps it decaying.
  ps = history[SR_MIN_DECAY_STEPS]["prune_state"]
  active = np.asarray(ps.status[0]) == ACTIVE
  grad_ema = np.asarray(ps.removal.grad_norm_ema)
  assert float(grad_ema[FALLING]) > 1.5 * float(np.mean(grad_ema[active]))
  assert float(ps.removal.rate_ema[FALLING]) < 0 < float(ps.removal.rate_ema[RISING])


def test_self_rectifying_replacement_meets_the_target_and_respects_cooldown():
  recipe = _sr_recipe()
  spec, _, history = _run_sr(recipe)
  release_step = SR_MIN_DECAY_STEPS
  dense = dpm_jax.spec_cost(spec).macs
  # The step that releases RISING also picks a replacement: the masks leaving every step
  # meet the target.
  h = history[release_step]
  assert int(h["prune_state"].removal.released[RISING]) == 1
  replaced = [c for c in range(WIDTH) if not h["keep"][0][c] and c != FALLING]
  assert len(replaced) == 1 and replaced[0] != RISING
  replacement = replaced[0]
  ps = h["prune_state"]
  assert int(ps.status[0][replacement]) == DECAYING
  assert int(ps.removal.decay_step[replacement]) == 0
  # Its L_init is its norm where the release step left it (where its decay starts).
  np.testing.assert_allclose(ps.removal.init_norm[replacement],
                             np.linalg.norm(_channel(h["new_params"], replacement)), rtol=1e-6)
  for h in history:
    keep = h["keep"]
    assert int((~keep[0]).sum()) == 2
    assert dpm_jax.spec_cost(spec, keep).macs / dense <= recipe.target_flops + 1e-9
  for h in history[release_step:]:
    # Within the cooldown the released channel is not selected again, although it is now
    # the weakest active channel.
    assert bool(h["keep"][0][RISING])
  norms = [np.linalg.norm(_channel(history[release_step]["new_params"], c))
           for c in range(WIDTH)]
  assert min((c for c in range(WIDTH) if c != FALLING), key=lambda c: norms[c]) == RISING
  ps = history[-1]["prune_state"]
  assert int(ps.status[0][replacement]) == PRUNED
  assert np.all(_channel(history[-1]["new_params"], replacement) == 0.0)


def test_self_rectifying_without_cooldown_reselects_the_released_channel():
  _, _, history = _run_sr(_sr_recipe(cooldown=0), num_steps=SR_MIN_DECAY_STEPS + 2)
  for h in history[SR_MIN_DECAY_STEPS:]:
    assert int(h["prune_state"].removal.released[RISING]) == 1
    assert int(h["prune_state"].status[0][RISING]) == DECAYING
    assert not h["keep"][0][RISING]


# ----------------------------------------------------------------------------------------
# Soft pruning through the transform: regrowth.


@pytest.mark.parametrize("zero, regrows", [("weights", True), ("producers", False)])
def test_soft_pruned_filters_regrow_through_batchnorm_when_its_scale_is_kept(zero, regrows):
  # SFP zeroes a filter's weights and lets them train: after BatchNorm the kernel's gradient
  # passes through the BN scale, so the filter regrows (where the BN bias keeps the ReLU
  # open: a trained network's, here set by hand). Zeroing the BN scale too (every producer
  # slice) leaves the kernel without gradient: it stays at zero.
  model = _ConvBN(nnx.Rngs(0))
  spec = dpm_jax.trace_groups(nnx.eval_shape(lambda: _ConvBN(nnx.Rngs(0))),
                              jax.ShapeDtypeStruct((1, 5, 5, 1), jnp.float32))
  model.train()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  params["bn"]["bias"] = jnp.full(4, 0.5)
  recipe = recipes.sfp(0.75, zero=zero, start_step=0, end_step=1000, interval=1000)
  tx = dpm_jax.prune(optax.sgd(LR), spec, recipe)  # no momentum: regrowth is the gradient's

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, stats, copy=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return loss, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  rng = np.random.default_rng(0)
  opt_state = tx.init(params)
  norms = []
  for _ in range(6):
    x = jnp.asarray(rng.normal(size=(16, 5, 5, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    params, stats, opt_state = step(params, stats, opt_state, x, y)
    c = int(np.nonzero(~dpm_jax.keep_masks(opt_state)[0])[0][0])
    norms.append(float(np.linalg.norm(np.asarray(params["conv"]["kernel"])[..., c])))
  assert norms[0] == 0.0  # zeroed at the event
  scale = float(np.asarray(params["bn"]["scale"])[c])
  if regrows:
    assert scale != 0.0 and all(n > 0.0 for n in norms[1:]), norms
  else:
    assert scale == 0.0 and all(n == 0.0 for n in norms), norms
  assert int(pruning.channel_status(dpm_jax.prune_state(opt_state))[c]) == SOFT
