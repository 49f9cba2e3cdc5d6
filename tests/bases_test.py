"""The DPM paper's other bases, by construction: Gate Decorator (Taylor scores, tick-tock,
L1 on the gates), OTOv2 (saliency partition, half-space projection) and DepGraph's sparse
learning (group lasso)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import channels
from dpm_jax import pruning
from dpm_jax import recipes
from dpm_jax.pruning import (ACTIVE, DECAYING, PRUNED, PUSHED, criteria, regularizers, removals,
                             schedules)


class _ConvBN(nnx.Module):
  """conv -> BatchNorm -> relu -> global mean -> dense: one group of 4, gated by bn/scale."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2)))


@functools.cache
def _conv_bn():
  model = _ConvBN(nnx.Rngs(0))
  spec = dpm_jax.trace_groups(nnx.eval_shape(lambda: _ConvBN(nnx.Rngs(0))),
                              jax.ShapeDtypeStruct((1, 5, 5, 1), jnp.float32))
  model.train()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  params["bn"]["scale"] = jnp.array([1.0, 0.5, 2.0, 0.1])
  params["bn"]["bias"] = jnp.array([0.2, 0.3, -0.1, 0.4])

  def loss(p, x, y):
    logits = nnx.merge(graphdef, p, stats, copy=True)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return spec, params, jax.jit(jax.grad(loss))


def _batch(seed):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(8, 5, 5, 1)), jnp.float32),
          jnp.asarray(rng.integers(0, 3, 8)))


# ----------------------------------------------------------------------------------------
# Gate Decorator.


def test_taylor_scores_by_hand_and_accumulated_over_a_tick():
  spec, params, grad = _conv_bn()
  ctx = pruning.Context.build(spec, 0.5)
  taylor = criteria.Taylor()
  grads = [grad(params, *_batch(i)) for i in range(3)]
  by_hand = [np.abs(np.asarray(params["bn"]["scale"]) * np.asarray(g["bn"]["scale"]))
             for g in grads]
  np.testing.assert_allclose(taylor.step_scores(ctx, params, grads[0]), by_hand[0], rtol=1e-6)
  state = taylor.init(ctx, params)
  step = lambda g, event: pruning.Step(params, g, g, jnp.asarray(0), jnp.asarray(event))
  for g in grads:
    state = taylor.update(ctx, state, step(g, False))
  np.testing.assert_allclose(taylor.score(ctx, state, params), sum(by_hand), rtol=1e-5)
  # An event's selection uses what was accumulated; the next tick starts afresh.
  state = taylor.update(ctx, state, step(grads[0], True))
  np.testing.assert_allclose(state, by_hand[0], rtol=1e-6)


def test_taylor_without_a_gate_is_the_first_order_estimate():
  def mlp(v, x):
    return jnp.maximum(x @ v["w1"] + v["b1"], 0) @ v["w2"]

  rng = np.random.default_rng(0)
  v = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.ones(4),
       "w2": jnp.ones((4, 2))}
  g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), v)
  ctx = pruning.Context.build(dpm_jax.trace_groups_fn(mlp, v, jnp.zeros((1, 3))), 0.5)
  by_hand = np.abs((np.asarray(v["w1"]) * np.asarray(g["w1"])).sum(0)
                   + np.asarray(v["b1"]) * np.asarray(g["b1"]))
  np.testing.assert_allclose(criteria.Taylor().step_scores(ctx, v, g), by_hand, rtol=1e-5)


def test_tick_tock_refuses_a_target_its_ticks_cannot_reach():
  s = schedules.TickTock(start_step=10, end_step=100, tick_steps=5, ticks_per_tock=2,
                         tock_steps=3, tick_fraction=0.1)
  spec, _, _ = _conv_bn()
  events = [c for c in range(10, 101) if (c - 10) % 13 < 10 and (c - 10) % 13 % 5 == 0]
  assert s.num_ticks == len(events) == 14
  s.check(pruning.Context.build(spec, 0.9 ** 14))          # just within reach
  with pytest.raises(ValueError, match=r"14 ticks .* leave 0.229 .* at least 0.1086"):
    s.check(pruning.Context.build(spec, 0.2))
  with pytest.raises(ValueError, match="out of reach"):  # before training, in prune()
    dpm_jax.prune(optax.sgd(0.1), spec, recipes.gate_decorator(   # 4 ticks leave 0.656
        0.5, start_step=10, end_step=30, tick_steps=5, ticks_per_tock=2, tock_steps=3,
        tick_fraction=0.1))


def test_tick_tock_timeline_and_the_fraction_a_tick_removes():
  s = schedules.TickTock(start_step=10, end_step=100, tick_steps=5, ticks_per_tock=2,
                         tock_steps=3, tick_fraction=0.1)
  spec, _, _ = _conv_bn()
  ctx = pruning.Context.build(spec, 0.5)
  all_active = jnp.zeros(4, jnp.int8)
  events = [c for c in range(40)
            if bool(s.event(ctx, s.init(ctx), jnp.asarray(c), all_active)[0])]
  # Cycles of 13 steps: ticks at 10 and 15, a tock at 20-22; ticks at 23 and 28, ...
  assert events == [10, 15, 23, 28, 36]
  assert [c for c in range(10, 40) if bool(s.in_tock(jnp.asarray(c)))] == [20, 21, 22, 33, 34,
                                                                            35]
  # A tick asks for tick_fraction of the remaining FLOPs: 0.9 of them with all channels...
  _, target, _ = s.event(ctx, s.init(ctx), jnp.asarray(10), all_active)
  assert float(target) == pytest.approx(0.9)
  # ... and no event once the target is met.
  half = jnp.asarray([0, 0, 2, 2], jnp.int8)
  assert not bool(s.event(ctx, s.init(ctx), jnp.asarray(10), half)[0])


def test_tock_applies_l1_to_the_gates_only():
  spec, params, grad = _conv_bn()
  ctx = pruning.Context.build(spec, 0.5)
  ticktock = schedules.TickTock(tick_steps=2, ticks_per_tock=1, tock_steps=2, end_step=100)
  reg = regularizers.GateL1(strength=0.5, schedule=ticktock)
  g = grad(params, *_batch(0))
  status = jnp.zeros(4, jnp.int8)
  out, _ = reg.update(ctx, None, g, params, status, jnp.asarray(2))   # a tock step
  expected = np.asarray(g["bn"]["scale"]) + 0.5 * np.sign(np.asarray(params["bn"]["scale"]))
  np.testing.assert_allclose(out["bn"]["scale"], expected, rtol=1e-6)
  for path in (("bn", "bias"), ("conv", "kernel"), ("conv", "bias"), ("head", "kernel")):
    np.testing.assert_array_equal(out[path[0]][path[1]], g[path[0]][path[1]])
  out, _ = reg.update(ctx, None, g, params, status, jnp.asarray(1))   # a tick step
  jax.tree.map(np.testing.assert_array_equal, out, g)


def _run(recipe, spec, params, grad, steps, lr=0.1):
  tx = dpm_jax.prune(optax.sgd(lr), spec, recipe)
  step = jax.jit(lambda p, s, b: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(grad(p, *b), s, p)))
  state, history = tx.init(params), []
  for i in range(steps):
    params, state = step(params, state, _batch(i))
    history.append((params, dpm_jax.prune_state(state)))
  assert step._cache_size() == 1
  return history


@functools.cache
def _digits():
  model = nnx.eval_shape(lambda: dpm_jax.models.create_model("digits_cnn", num_classes=10,
                                                             rngs=nnx.Rngs(0)))
  spec = dpm_jax.trace_groups(model, jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))
  return spec, pruning.Context.build(spec, 0.5)


def test_a_tick_removes_the_stated_fraction_of_the_remaining_flops():
  spec, ctx = _digits()
  s = schedules.TickTock(tick_steps=1, ticks_per_tock=100, end_step=100, tick_fraction=0.1)
  alloc = recipes.gate_decorator(0.5).allocation
  k = ctx.num_channels
  status = jnp.zeros(k, jnp.int8)
  scores = jnp.asarray(np.random.default_rng(0).random(k), jnp.float32)
  now = 1.0
  for tick in range(3):
    event, target, _ = s.event(ctx, s.init(ctx), jnp.asarray(tick), status)
    assert bool(event) and float(target) == pytest.approx(now * 0.9, rel=1e-5)
    removed, _ = alloc.select(ctx, None, scores, status == ACTIVE, status != ACTIVE,
                              target * ctx.dense_cost, None)
    status = jnp.where(removed, jnp.int8(PRUNED), status)
    after = float(ctx.cost_of(status == ACTIVE)) / ctx.dense_cost
    assert now * 0.9 - 0.01 <= after <= now * 0.9 + 1e-6   # within 1% under the tick's target
    now = after


# ----------------------------------------------------------------------------------------
# OTOv2.


def _mlp(v, x):
  return jnp.maximum(x @ v["w1"] + v["b1"], 0) @ v["w2"]


def test_half_space_projection_removes_exactly_the_channels_that_leave_it():
  rng = np.random.default_rng(0)
  v = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.zeros(4),
       "w2": jnp.ones((4, 2))}
  ctx = pruning.Context.build(dpm_jax.trace_groups_fn(_mlp, v, jnp.zeros((1, 3))), 0.5)
  removal = removals.HalfSpace(eps=0.9)
  status = jnp.asarray([PUSHED, PUSHED, PUSHED, ACTIVE], jnp.int8)
  # The step keeps 0.95, 0.85 and 0.5 of channels 0, 1, 2 (and the active channel 3 at 0.5):
  # <x~, x> / ||x||^2 is that factor, so 1 and 2 leave the half-space (< 0.9), 0 does not.
  keep = np.array([0.95, 0.85, 0.5, 0.5], np.float32)
  stepped = {"w1": v["w1"] * keep, "b1": v["b1"], "w2": v["w2"]}
  updates = jax.tree.map(lambda a, b: a - b, stepped, v)
  step = pruning.Step(v, updates, updates, jnp.asarray(3), jnp.asarray(False))
  landed, out, _, freed = removal.land(ctx, removal.init(ctx, v), status, step, stepped,
                                       jnp.zeros(4, bool))
  assert out.tolist() == [PUSHED, PRUNED, PRUNED, ACTIVE] and not bool(freed.any())
  w1 = np.asarray(landed["w1"])
  np.testing.assert_array_equal(w1[:, 1:3], 0.0)
  np.testing.assert_allclose(w1[:, [0, 3]], np.asarray(stepped["w1"])[:, [0, 3]])
  # Zero channels stay zero, whatever the step.
  step = pruning.Step(landed, updates, updates, jnp.asarray(4), jnp.asarray(False))
  again, out2, _, _ = removal.land(ctx, removal.init(ctx, v), out, step,
                                   jax.tree.map(lambda a: a + 1.0, landed), jnp.zeros(4, bool))
  np.testing.assert_array_equal(np.asarray(again["w1"])[:, 1:3], 0.0)
  assert out2.tolist()[1:3] == [PRUNED, PRUNED]


def test_self_rectifying_stops_after_the_last_event_except_under_the_projection():
  rng = np.random.default_rng(1)
  v = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.zeros(4),
       "w2": jnp.ones((4, 2))}
  spec = dpm_jax.trace_groups_fn(_mlp, v, jnp.zeros((1, 3)))
  sr = removals.SelfRectifying(decay_steps=10, min_decay_steps=1, rate_threshold=-0.5,
                               len_threshold=0.0, logic="or", release_steps=3)
  status = jnp.asarray([DECAYING, ACTIVE, ACTIVE, ACTIVE], jnp.int8)
  grads = jax.tree.map(jnp.ones_like, v)
  stepped = {"w1": v["w1"] * 1.1, "b1": v["b1"], "w2": v["w2"]}  # channel 0's norm grows

  def released(removal, count):
    ctx = pruning.Context.build(spec, 0.5, last_event=10)
    state = removal.init(ctx, v)._replace(  # HalfSpace's state is its removal's
        decay_step=jnp.asarray([5, 0, 0, 0]),
        init_norm=jnp.sqrt(channels.sq_norms(ctx.index, v)))
    step = pruning.Step(v, grads, jax.tree.map(lambda a, b: a - b, stepped, v),
                        jnp.asarray(count), jnp.asarray(False))
    _, out, _, freed = removal.land(ctx, state, status, step, stepped, jnp.zeros(4, bool))
    return bool(freed[0]) and int(out[0]) == ACTIVE

  assert released(sr, 12)          # within release_steps of the last event (10)
  assert not released(sr, 13)      # after it: the decay goes on, the pruning settles
  # Under OTOv2's projection the decays start when channels are projected, any time:
  # releases are not cut off.
  assert released(removals.HalfSpace(then=sr), 13)


def test_half_space_push_acts_on_redundant_channels_only():
  rng = np.random.default_rng(1)
  v = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.ones(4),
       "w2": jnp.ones((4, 2))}
  ctx = pruning.Context.build(dpm_jax.trace_groups_fn(_mlp, v, jnp.zeros((1, 3))), 0.5)
  g = jax.tree.map(jnp.zeros_like, v)
  status = jnp.asarray([PUSHED, ACTIVE, PUSHED, ACTIVE], jnp.int8)
  out, _ = regularizers.HalfSpacePush(lmbda=0.5).update(ctx, None, g, v, status, 0)
  norms = np.sqrt((np.asarray(v["w1"]) ** 2).sum(0) + 1.0)
  for c in range(4):
    want = 0.5 / norms[c] if c in (0, 2) else 0.0
    np.testing.assert_allclose(out["w1"][:, c], want * np.asarray(v["w1"])[:, c], rtol=1e-5)
    np.testing.assert_allclose(out["b1"][c], want, rtol=1e-5)
  np.testing.assert_array_equal(out["w2"], 0.0)  # consumers are not pushed


def test_saliency_partition_picks_the_stated_share():
  spec, params, grad = _conv_bn()
  # 4 equal channels: the target's share of the MACs goes (2 of 4 at 0.5).
  recipe = recipes.otov2(0.5, start_step=2, lmbda=0.0, eps=0.0)  # partition only
  history = _run(recipe, spec, params, grad, 4)
  statuses = [np.asarray(ps.status[0]) for _, ps in history]
  assert all((s == ACTIVE).all() for s in statuses[:2])
  assert (statuses[2] == PUSHED).sum() == 2 and (statuses[3] == PUSHED).sum() == 2
  # The redundant ones are the least salient at the partition.
  ps = history[1][1]
  importance = np.asarray(recipe.criterion.score(pruning.Context.build(spec, 0.5),
                                                 ps.criterion, history[1][0]))
  assert set(np.nonzero(statuses[2] == PUSHED)[0]) == set(np.argsort(importance)[:2])


# ----------------------------------------------------------------------------------------
# DepGraph's sparse learning.


def test_group_lasso_strength_and_term():
  rng = np.random.default_rng(2)
  v = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b1": jnp.zeros(4),
       "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
  ctx = pruning.Context.build(dpm_jax.trace_groups_fn(_mlp, v, jnp.zeros((1, 3))), 0.5)
  imp = np.sqrt((np.asarray(v["w1"]) ** 2).sum(0) + (np.asarray(v["w2"]) ** 2).sum(1))
  want = 5e-4 * 16.0 ** ((imp.max() - imp) / (imp.max() - imp.min()))
  strength = regularizers.group_lasso_strength(ctx.index, v, 5e-4, 16.0)
  np.testing.assert_allclose(strength, want, rtol=1e-5)
  assert float(strength.max()) == pytest.approx(16 * float(strength.min()), rel=1e-5)
  g = jax.tree.map(jnp.zeros_like, v)
  out, _ = regularizers.GroupLasso().update(ctx, None, g, v, jnp.zeros(4, jnp.int8), 0)
  # Every member of a channel, producers and consumers: strength * w.
  np.testing.assert_allclose(out["w1"], want * np.asarray(v["w1"]), rtol=1e-5)
  np.testing.assert_allclose(out["w2"], want[:, None] * np.asarray(v["w2"]), rtol=1e-5)


def test_sparse_learning_shrinks_the_weak_channels_before_pruning():
  spec, params, grad = _conv_bn()
  plain = recipes.depgraph(0.5, start_step=1000)
  sparse = recipes.depgraph(0.5, start_step=1000, sparse_learning=True, reg=0.5)
  norms = lambda p: np.sqrt(channels.sq_norms(pruning.Context.build(spec, 0.5).index, p))
  a = norms(_run(plain, spec, params, grad, 5)[-1][0])
  b = norms(_run(sparse, spec, params, grad, 5)[-1][0])
  assert np.all(b < a)
  weakest = np.argmin(a)
  assert b[weakest] / a[weakest] < np.max(b / a)   # pushed hardest
