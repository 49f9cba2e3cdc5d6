"""PSAP by construction: adaptive ratios from weight sparsity, protective reconstruction, soft
pruning that regrows, and the whole run compiled once."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import models
from dpm_jax import pruning
from dpm_jax import recipes
from dpm_jax.pruning import ACTIVE, SOFT, allocations


def _mlp2(v, x):
  h = jnp.maximum(x @ v["w1"] + v["b1"], 0)
  h = jnp.maximum(h @ v["w2"] + v["b2"], 0)
  return h @ v["w3"]


def _mlp2_params(w1, w2) -> dict[str, jax.Array]:
  """4 -> A (8) -> B (16) -> 2 with the given kernels of A and B."""
  return {"w1": jnp.asarray(w1, jnp.float32), "b1": jnp.zeros(8),
          "w2": jnp.asarray(w2, jnp.float32), "b2": jnp.zeros(16), "w3": jnp.ones((16, 2))}


@functools.cache
def _mlp2_ctx(target: float = 0.5) -> pruning.Context:
  v = _mlp2_params(np.ones((4, 8)), np.ones((8, 16)))
  return pruning.Context.build(dpm_jax.trace_groups_fn(_mlp2, v, jnp.zeros((1, 4))), target)


def _half_small(shape, rng) -> np.ndarray:
  """Ones with half the entries (at random) 0.01: half of them are near zero."""
  w = np.ones(shape, np.float32)
  w.flat[rng.permutation(w.size)[: w.size // 2]] = 0.01
  return w


def _removed_shares(ctx, selected) -> list[float]:
  return [float(1 - k.mean()) for k in np.split(~np.asarray(selected),
                                                np.cumsum(ctx.spec.sizes)[:-1])]


def _adaptive_select(ctx, allocation, params, target):
  k = ctx.num_channels
  scores = jnp.asarray(np.random.default_rng(0).random(k), jnp.float32)
  fn = jax.jit(lambda p: allocation.select(ctx, None, scores, jnp.ones(k, bool),
                                           jnp.zeros(k, bool), target * ctx.dense_cost, p)[0])
  return np.asarray(fn(params))


# ----------------------------------------------------------------------------------------
# Self-adaptive ratios.


def test_weight_sparsity_by_hand():
  ctx = _mlp2_ctx()
  rng = np.random.default_rng(0)
  # A's kernel: half its entries are 0.01, the layer's mean magnitude is 0.505, so with the
  # threshold 0.5 (0.2525) half are near zero; B's kernel is all ones: none.
  params = _mlp2_params(_half_small((4, 8), rng), np.ones((8, 16)))
  np.testing.assert_allclose(allocations.weight_sparsity(ctx.index, params, 0.5), [0.5, 0.0])
  # The threshold is relative to the layer's mean: 0.01 < 0.005 * 0.505 is false.
  np.testing.assert_allclose(allocations.weight_sparsity(ctx.index, params, 0.005), [0, 0])
  # Channel sparsity: channels below half the group's median norm.
  w1 = np.ones((4, 8), np.float32)
  w1[:, :3] = 0.1
  np.testing.assert_allclose(
      allocations.channel_sparsity(ctx.index, _mlp2_params(w1, np.ones((8, 16))), 0.5),
      [3 / 8, 0.0])


def test_adaptive_ratios_formula():
  s = jnp.array([0.4, 0.2, 0.0])   # mean 0.2: relative 2, 1, 0
  np.testing.assert_allclose(allocations.adaptive_ratios(s, 0.3, 0.0, 0.9), [0.6, 0.3, 0.0])
  np.testing.assert_allclose(allocations.adaptive_ratios(s, 0.3, 0.1, 0.5), [0.5, 0.3, 0.1])
  # No sparsity anywhere: equal ratios.
  np.testing.assert_allclose(allocations.adaptive_ratios(jnp.zeros(3), 0.3, 0.0, 0.9), [0.3] * 3)


def test_a_sparser_group_gets_a_larger_ratio():
  ctx = _mlp2_ctx()
  rng = np.random.default_rng(1)
  sparse_a = _mlp2_params(_half_small((4, 8), rng), rng.normal(1, 0.1, (8, 16)))
  out = _adaptive_select(ctx, allocations.Adaptive(), sparse_a, 0.6)
  a, b = _removed_shares(ctx, out)
  assert a > b
  assert ctx.cost_of(~out) <= 0.6 * ctx.dense_cost
  # The other way round.
  sparse_b = _mlp2_params(rng.normal(1, 0.1, (4, 8)), _half_small((8, 16), rng))
  a, b = _removed_shares(ctx, _adaptive_select(ctx, allocations.Adaptive(), sparse_b, 0.6))
  assert b > a


def test_equal_sparsity_gives_equal_ratios():
  ctx = _mlp2_ctx()
  rng = np.random.default_rng(2)
  params = _mlp2_params(_half_small((4, 8), rng), _half_small((8, 16), rng))
  a, b = _removed_shares(ctx, _adaptive_select(ctx, allocations.Adaptive(), params, 0.5))
  assert a > 0 and abs(a - b) <= 1 / 8   # the same ratio, floored per group


def test_clip_bounds_hold():
  ctx = _mlp2_ctx()
  rng = np.random.default_rng(3)
  params = _mlp2_params(_half_small((4, 8), rng), np.ones((8, 16)))  # B not sparse at all
  # An unreachable target: every group at its bound. A (sparse) at p_max = 0.5, B (no
  # sparsity) at p_min = 0.25.
  out = _adaptive_select(ctx, allocations.Adaptive(p_min=0.25, p_max=0.5), params, 0.05)
  assert _removed_shares(ctx, out) == [0.5, 0.25]


def _zoo(name: str):
  shape = {"digits_cnn": (1, 8, 8, 1), "resnet20": (1, 32, 32, 3),
           "vgg16_bn": (1, 32, 32, 3), "mobilenet_v2": (1, 32, 32, 3)}[name]
  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=10, rngs=nnx.Rngs(0)))
  spec = dpm_jax.trace_groups(model, jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_t(3, x.shape).astype(np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return spec, params


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "vgg16_bn", "mobilenet_v2"])
def test_bisection_meets_the_flops_target_on_the_zoo(name):
  spec, params = _zoo(name)
  ctx = pruning.Context.build(spec, 0.5)
  out = _adaptive_select(ctx, allocations.Adaptive(), params, 0.5)
  ratio = float(ctx.cost_of(~out)) / ctx.dense_cost
  # Under the target, by at most the cost of the dearest single channel (counts are whole).
  dearest = max(float(ctx.dense_cost - ctx.cost_of(jnp.arange(ctx.num_channels) != c))
                for c in np.cumsum((0,) + spec.sizes[:-1]))
  assert 0.5 - dearest / ctx.dense_cost - 1e-6 <= ratio <= 0.5 + 1e-6, ratio
  shares = _removed_shares(ctx, out)
  assert max(shares) <= 0.9 and len(set(np.round(shares, 2))) > 1  # adapted, within p_max


# ----------------------------------------------------------------------------------------
# Protective reconstruction, through the transform on a one-group MLP.


def _mlp(v, x):
  return jnp.maximum(x @ v["w1"] + v["b1"], 0) @ v["w2"]


WIDTH = 8
WEAK, STILL = 1, 2  # the two weakest channels: both zeroed at the first event


def _mlp_params():
  rng = np.random.default_rng(0)
  w1 = rng.normal(size=(4, WIDTH)).astype(np.float32)
  w1 /= np.linalg.norm(w1, axis=0)
  w1[:, WEAK] *= 0.1
  w1[:, STILL] *= 0.2
  w1[:, 5] *= 0.5     # the next weakest: the replacement
  return {"w1": jnp.asarray(w1), "b1": jnp.full(WIDTH, 0.01, jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(WIDTH, 2)), jnp.float32)}


def _pulse_grads(params, step, pulse_at):
  """Small gradients; WEAK's producer gradients are large from step ``pulse_at`` on."""
  g = jax.tree.map(lambda x: np.full(x.shape, 0.01, np.float32), params)
  if step >= pulse_at:
    g["w1"][:, WEAK] = 5.0
  return g


class _Ranked(pruning.Criterion):
  """Channels in a fixed order of importance: WEAK, STILL, 5, then the rest (a zeroed
  channel is not the least important just because it is zero)."""

  def score(self, ctx, state, params):
    return jnp.asarray([3.0, 0.0, 1.0, 4.0, 5.0, 2.0, 6.0, 7.0])


def test_a_zeroed_channel_with_large_gradients_is_restored_and_protected():
  params = _mlp_params()
  spec = dpm_jax.trace_groups_fn(_mlp, params, jnp.zeros((1, 4)))
  recipe = recipes.psap(0.75, criterion=_Ranked(), allocation="uniform", start_step=0,
                        end_step=30, interval=10, gamma=2.0, ema_decay=0.5, protect_events=1)
  # Learning rate 0: the weights move only by pruning, so every value can be checked.
  tx = dpm_jax.prune(optax.sgd(0.0), spec, recipe)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  opt_state, history = tx.init(params), []
  saved = {k: np.asarray(v) for k, v in params.items()}
  dense = dpm_jax.spec_cost(spec).macs
  for i in range(25):
    params, opt_state = step(params, opt_state, _pulse_grads(params, i, pulse_at=3))
    ps = dpm_jax.prune_state(opt_state)
    history.append((jax.tree.map(np.asarray, params), np.asarray(ps.status[0]),
                    np.asarray(ps.removal.released)))
    # The masks leaving every step meet the target.
    assert dpm_jax.spec_cost(spec, dpm_jax.keep_masks(opt_state)).macs <= 0.75 * dense
  assert step._cache_size() == 1
  (p0, s0, _) = history[0]
  assert s0[WEAK] == SOFT and s0[STILL] == SOFT
  assert np.all(p0["w1"][:, [WEAK, STILL]] == 0) and np.all(p0["b1"][[WEAK, STILL]] == 0)
  # WEAK pulses once its gradients grow (at step 3), not before ...
  first = next(i for i, (_, s, _) in enumerate(history) if s[WEAK] == ACTIVE)
  assert first == 3
  p, s, released = history[first]
  assert released[WEAK] == 1
  # ... and gets exactly the weights it had when it was zeroed,
  np.testing.assert_array_equal(p["w1"][:, WEAK], saved["w1"][:, WEAK])
  np.testing.assert_array_equal(p["b1"][WEAK], saved["b1"][WEAK])
  # while the weakest unprotected channel replaces it (zeroed at the next step).
  assert s[5] == SOFT and history[first + 1][0]["w1"][:, 5].tolist() == [0.0] * 4
  # STILL, with small gradients, stays zeroed and is never restored.
  for _, s, released in history:
    assert s[STILL] == SOFT and released[STILL] == 0
  # Protected for one event: the event at step 10 does not select WEAK although it ranks
  # last; the event at step 20 does, and its gradients, still large, restore it again.
  assert history[10][1][WEAK] == ACTIVE and history[10][1][5] == SOFT
  assert history[20][1][WEAK] == SOFT
  np.testing.assert_array_equal(history[20][0]["w1"][:, WEAK], 0.0)
  assert history[21][1][WEAK] == ACTIVE and history[-1][2][WEAK] == 2
  np.testing.assert_array_equal(history[21][0]["w1"][:, WEAK], saved["w1"][:, WEAK])


def test_soft_pruned_channels_regrow_between_events_and_finalize_zeroes_them():
  params = _mlp_params()
  spec = dpm_jax.trace_groups_fn(_mlp, params, jnp.zeros((1, 4)))
  recipe = recipes.psap(0.75, allocation="uniform", start_step=0, end_step=30, interval=10,
                        gamma=100.0)  # no pulses
  tx = dpm_jax.prune(optax.sgd(0.1), spec, recipe)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  for i in range(5):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    params, opt_state = step(params, opt_state, grads)
    zeroed = ~dpm_jax.keep_masks(opt_state)[0]
    if i == 0:
      assert np.all(np.asarray(params["w1"])[:, zeroed] == 0)
  assert np.all(np.asarray(params["w1"])[:, zeroed] != 0)  # regrown
  final, keep = dpm_jax.finalize(params, opt_state, spec)
  assert np.all(np.asarray(final["w1"])[:, ~keep[0]] == 0)
  assert np.all(np.asarray(final["b1"])[~keep[0]] == 0)


def test_only_protective_recipes_carry_a_backup():
  params = _mlp_params()
  spec = dpm_jax.trace_groups_fn(_mlp, params, jnp.zeros((1, 4)))
  psap = dpm_jax.prune(optax.sgd(0.1), spec, recipes.psap(0.75)).init(params)
  backup = dpm_jax.prune_state(psap).removal.backup
  chex.assert_trees_all_equal_shapes(backup, params)
  for recipe in (recipes.psap(0.75, removal="soft"), recipes.depgraph(0.75, "dpm"),
                 recipes.sfp(0.75)):
    state = dpm_jax.prune_state(dpm_jax.prune(optax.sgd(0.1), spec, recipe).init(params))
    n = sum(x.size for x in jax.tree.leaves(state))
    assert n < 8 * WIDTH, recipe   # per-channel vectors only: no params-sized tree
