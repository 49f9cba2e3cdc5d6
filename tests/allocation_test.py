"""Tests for the FLOPs model and the FLOPs-targeted channel allocation.

``FlopsModel`` must count exactly what ``spec_cost`` counts, for any keep configuration;
``select_global`` is compared with a plain-Python reference of its rule (least important
first, skipping channels the minimum-channels guard protects, until the first prefix that
meets the target).
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
from dpm_jax.flops import FlopsModel
from dpm_jax.pruning import allocations as allocation
from dpm_jax import models


def _mlp2(v, x):
  h = jnp.maximum(x @ v["w1"] + v["b1"], 0)
  h = jnp.maximum(h @ v["w2"] + v["b2"], 0)
  return h @ v["w3"]


# 4 -> 8 -> 16 -> 2: MACs 4 * a + a * b + b * 2 for a, b kept channels; dense 192.
MLP2_SHAPES = {"w1": (4, 8), "b1": (8,), "w2": (8, 16), "b2": (16,), "w3": (16, 2)}


def _mlp2_macs(a: int, b: int) -> int:
  return 4 * a + a * b + 2 * b


@functools.cache
def _spec(name: str) -> dpm_jax.GroupSpec:
  if name == "mlp":
    v = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in MLP2_SHAPES.items()}
    return dpm_jax.trace_groups_fn(_mlp2, v, jax.ShapeDtypeStruct((1, 4), jnp.float32))
  shape = {"digits_cnn": (1, 8, 8, 1), "resnet20": (1, 32, 32, 3)}[name]
  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=10,
                                                       rngs=nnx.Rngs(0)))
  return dpm_jax.trace_groups(model, jax.ShapeDtypeStruct(shape, jnp.float32))


def _seg(spec) -> np.ndarray:
  return np.repeat(np.arange(len(spec.sizes)), spec.sizes)


def _split(spec, flat) -> list[np.ndarray]:
  return np.split(np.asarray(flat), np.cumsum(spec.sizes)[:-1])


def _macs(spec, keep_flat) -> int:
  return dpm_jax.spec_cost(spec, _split(spec, keep_flat)).macs


def _fast_macs(spec, keep_flat) -> int:
  """``_macs`` from the layer table alone (for the reference loop; checked against
  ``spec_cost`` below)."""
  keep = _split(spec, keep_flat)
  total = 0
  for layer in spec.layers:
    macs = layer.const
    for dim in layer.dims:
      macs *= dim.fixed + sum(
          t.multiplicity * int(keep[t.group].sum() if t.channels is None
                               else keep[t.group][list(t.channels)].sum())
          for t in dim.terms)
    total += macs
  return total


# ----------------------------------------------------------------------------------------
# FlopsModel.


def test_flops_model_hand_arithmetic():
  spec = _spec("mlp")
  assert spec.sizes == (8, 16)
  model = FlopsModel.build(spec)
  assert model.dense_cost == _mlp2_macs(8, 16) == 192
  keep = np.concatenate([np.arange(8) < 5, np.arange(16) < 10])
  assert float(model.cost(jnp.asarray(keep))) == _mlp2_macs(5, 10) == 90
  assert float(model.cost(jnp.zeros(24, bool))) == 0


@pytest.mark.parametrize("name", ["mlp", "digits_cnn", "resnet20"])
def test_flops_model_agrees_with_spec_cost(name):
  spec = _spec(name)
  model = FlopsModel.build(spec)
  np.testing.assert_allclose(model.dense_cost, dpm_jax.spec_cost(spec).macs, rtol=1e-7)
  macs = jax.jit(model.cost)
  # MACs are counted in float32 (no x64 in JAX by default): exact below 2**24 (the MLP and
  # the digits CNN), to float32 precision above (ResNet-20 has 40.6M).
  rtol = 0 if model.dense_cost < 2 ** 24 else 1e-6
  rng = np.random.default_rng(0)
  first = np.isin(np.arange(spec.num_channels), np.cumsum((0,) + spec.sizes[:-1]))
  for density in (0.1, 0.5, 0.9, 1.0):
    keep = (rng.random(spec.num_channels) < density) | first   # spec_cost: none emptied
    assert _macs(spec, keep) == _fast_macs(spec, keep)
    np.testing.assert_allclose(float(macs(jnp.asarray(keep))), _macs(spec, keep), rtol=rtol)
    assert model.static_cost(keep) == _macs(spec, keep)  # float64 on the host: exact
  # One group down to its first channel, the others whole.
  for g in range(len(spec.sizes)):
    keep = (_seg(spec) != g) | first
    np.testing.assert_allclose(float(macs(jnp.asarray(keep))), _macs(spec, keep), rtol=rtol)


# ----------------------------------------------------------------------------------------
# min_keep, check_reachable.


def test_min_keep():
  spec = _spec("mlp")
  np.testing.assert_array_equal(allocation.min_keep(spec, 1, 0.0), [1, 1])
  np.testing.assert_array_equal(allocation.min_keep(spec, 2, 0.5), [4, 8])
  np.testing.assert_array_equal(allocation.min_keep(spec, 5, 0.3), [5, 5])   # ceil(4.8)
  np.testing.assert_array_equal(allocation.min_keep(spec, 10, 0.0), [8, 10])  # <= size


def test_check_reachable():
  spec = _spec("mlp")
  model = FlopsModel.build(spec)
  minimum = allocation.min_keep(spec, 1, 0.5)
  # At the minimum (4 and 8 channels) the MLP keeps 64 / 192 of its MACs.
  lowest = _mlp2_macs(4, 8) / 192
  allocation.check_reachable(model, spec, minimum, lowest + 1e-6)
  allocation.check_reachable(model, spec, minimum, 1.0)
  with pytest.raises(ValueError, match=r"target_flops=0.01 cannot be met.*0\.333.*min_channels"):
    allocation.check_reachable(model, spec, minimum, 0.01)
  with pytest.raises(ValueError, match="cannot be met"):
    allocation.check_reachable(model, spec, minimum, lowest - 1e-3)


def test_flops_of_a_spec_with_a_group_declared_unprunable():
  spec = _spec("mlp").without(("w1",))
  assert spec.sizes == (16,)
  # The 8 channels of w1 are now fixed; keep 4 of w2's 16: 4 * 8 + 8 * 4 + 4 * 2.
  keep = np.arange(16) < 4
  assert dpm_jax.spec_cost(spec, [keep]).macs == 72
  model = FlopsModel.build(spec)
  assert model.dense_cost == 192
  assert float(model.cost(jnp.asarray(keep))) == 72


def test_check_reachable_without_groups():
  spec = _spec("mlp").without(("w1",), ("w2",))
  assert not spec.groups
  model = FlopsModel.build(spec)
  allocation.check_reachable(model, spec, np.zeros(0, np.int32), 1.0)
  with pytest.raises(ValueError, match="no prunable channel groups"):
    allocation.check_reachable(model, spec, np.zeros(0, np.int32), 0.5)


# ----------------------------------------------------------------------------------------
# select_global.


def _reference_global(spec, scores, candidates, removed, target_cost, minimum,
                      tolerance=0.0, swap_tries=32):
  """The rule, in plain Python: least important candidate first; skip a channel whose
  group is at its minimum; stop as soon as the MACs meet the target; then give back the
  most important channels just taken while the target still holds; then, while more than
  the tolerance under the target, exchange up to `swap_tries` of the most important taken
  channels for the least important candidates cheaper than it (until the target is met),
  when that lands closer to the target."""
  seg = _seg(spec)
  keep = ~np.asarray(removed).copy()
  count = np.bincount(seg[keep], minlength=len(spec.sizes))
  taken = []
  for c in np.argsort(np.where(candidates & keep, scores, np.inf), kind="stable"):
    if _fast_macs(spec, keep) <= target_cost or not (candidates[c] and keep[c]):
      break
    if count[seg[c]] - 1 < minimum[seg[c]]:
      continue
    keep[c] = False
    count[seg[c]] -= 1
    taken.append(c)
  by_importance = sorted(taken, key=lambda c: -scores[c])
  for c in by_importance:
    keep[c] = True
    if _fast_macs(spec, keep) > target_cost:
      keep[c] = False
  for c in by_importance[:swap_tries]:
    now = _fast_macs(spec, keep)
    if keep[c] or target_cost - now <= tolerance:
      continue
    keep[c] = True
    back = _fast_macs(spec, keep)
    count = np.bincount(seg[keep], minlength=len(spec.sizes))
    trial = keep.copy()
    cost = {}
    for d in range(len(keep)):
      trial[d] = False
      cost[d] = back - _fast_macs(spec, trial)
      trial[d] = keep[d]
    for d in np.argsort(np.where(candidates & keep, scores, np.inf), kind="stable"):
      if (not (candidates[d] and keep[d]) or d == c or cost[d] >= back - now
          or count[seg[d]] - 1 < minimum[seg[d]]):
        continue
      trial[d] = False
      count[seg[d]] -= 1
      if _fast_macs(spec, trial) <= target_cost:
        break
    landed = _fast_macs(spec, trial)
    if now < landed <= target_cost:
      keep = trial
    else:
      keep[c] = False
  return ~keep


@functools.cache
def _selector(name: str, fn_name: str):
  """``allocation.<fn_name>`` for model ``name``, jitted (eagerly every op compiles)."""
  model = FlopsModel.build(_spec(name))
  return jax.jit(functools.partial(getattr(allocation, fn_name), model))


def _select(name, fn_name, scores, candidates, removed, target, minimum) -> np.ndarray:
  return np.asarray(_selector(name, fn_name)(
      jnp.asarray(scores, jnp.float32), jnp.asarray(candidates), jnp.asarray(removed),
      jnp.float32(target), jnp.asarray(minimum, jnp.int32)))


def _select_global(name, *args) -> np.ndarray:
  return _select(name, "select_global", *args)


def test_select_global_hand_case():
  spec = _spec("mlp")
  # Group 0 (8 channels, 4 + 16 MACs each) is more important than group 1 (16 channels,
  # 8 + 2 MACs each) except for its channels 0 and 1.
  scores = np.concatenate([[0.05, 0.15], np.linspace(2, 3, 6), np.linspace(0.1, 1, 16)])
  none = np.zeros(24, bool)
  # 0.75 * 192 = 144 MACs: remove channels in order 0 (-20 -> 172), 8 (-9 -> 163;
  # group 0 has 7 left), 1 (-19 -> 144). Stop: the target is met exactly.
  out = _select_global("mlp", scores, ~none, none, 144.0, [1, 1])
  np.testing.assert_array_equal(np.nonzero(out)[0], [0, 1, 8])
  assert _macs(spec, ~out) == 144
  # One MAC less and the next channel (group 1, 0.16) goes too.
  out = _select_global("mlp", scores, ~none, none, 143.0, [1, 1])
  np.testing.assert_array_equal(np.nonzero(out)[0], [0, 1, 8, 9])


@pytest.mark.parametrize("name", ["mlp", "digits_cnn", "resnet20"])
@pytest.mark.parametrize("seed", [0, 1])
def test_select_global_matches_the_reference_rule(name, seed):
  spec = _spec(name)
  rng = np.random.default_rng(seed)
  k = spec.num_channels
  scores = rng.random(k).astype(np.float32)
  dense = dpm_jax.spec_cost(spec).macs
  minimum = allocation.min_keep(spec, 2, 0.25)
  removed = rng.random(k) < 0.1
  candidates = rng.random(k) < 0.8
  for target in (0.9, 0.55, 0.3):
    target_cost = np.float32(target * dense)
    out = _select_global(name, scores, candidates, removed, target_cost, minimum)
    ref = _reference_global(spec, scores, candidates, removed, target_cost, minimum)
    np.testing.assert_array_equal(out, ref, err_msg=f"target {target}")
    assert np.all(out[removed])                       # what was removed stays removed
    assert np.all(candidates[out & ~removed])          # new ones are candidates
    counts = np.bincount(_seg(spec)[~out], minlength=len(spec.sizes))
    assert np.all(counts >= minimum)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_select_global_takes_from_the_least_important_and_lands_under_the_target(name):
  spec = _spec(name)
  k = spec.num_channels
  scores = np.random.default_rng(3).random(k).astype(np.float32)
  minimum = allocation.min_keep(spec, 1, 0.0)
  dense = dpm_jax.spec_cost(spec).macs
  target = np.float32(0.5 * dense)
  # Without exchanges (a tolerance that any landing meets):
  no_exchange = jax.jit(functools.partial(allocation.select_global, FlopsModel.build(spec),
                                          tolerance=dense))
  out = np.asarray(no_exchange(jnp.asarray(scores), jnp.ones(k, bool), jnp.zeros(k, bool),
                               target, jnp.asarray(minimum)))
  assert _macs(spec, ~out) <= target
  # The removed channels come from the shortest prefix of the order of importance that
  # meets the target (no guard binds here) ...
  order = np.argsort(scores)
  prefix = next(n for n in range(k + 1)
                if _macs(spec, ~np.isin(np.arange(k), order[:n])) <= target)
  assert set(np.nonzero(out)[0]) <= set(order[:prefix])
  # ... and none of them could be given back without missing the target.
  for c in np.nonzero(out)[0]:
    assert _macs(spec, ~out | (np.arange(k) == c)) > target
  # Exchanges trade importance for precision: closer to the target, still under it.
  exchanged = _select_global(name, scores, np.ones(k, bool), np.zeros(k, bool), target, minimum)
  assert _macs(spec, ~out) <= _macs(spec, ~exchanged) <= target


@pytest.mark.parametrize("name", ["mlp", "digits_cnn"])
def test_min_channels_guard_is_never_violated(name):
  spec = _spec(name)
  k = spec.num_channels
  rng = np.random.default_rng(0)
  for min_channels, min_fraction in ((1, 0.0), (3, 0.25), (100, 0.0)):
    minimum = allocation.min_keep(spec, min_channels, min_fraction)
    for fn in ("select_global", "select_uniform"):
      # An unreachable target: everything the guard allows goes.
      out = _select(name, fn, rng.random(k), np.ones(k, bool), np.zeros(k, bool), 0.0,
                    minimum)
      counts = np.bincount(_seg(spec)[~out], minlength=len(spec.sizes))
      np.testing.assert_array_equal(counts, minimum, err_msg=f"{fn} {minimum}")


def test_select_global_jits_with_a_traced_target():
  spec = _spec("mlp")
  model = FlopsModel.build(spec)
  fn = jax.jit(functools.partial(allocation.select_global, model))
  scores = jnp.arange(24.0)
  ones, zeros, minimum = jnp.ones(24, bool), jnp.zeros(24, bool), jnp.ones(2, jnp.int32)
  a = fn(scores, ones, zeros, jnp.float32(150.0), minimum)
  b = fn(scores, ones, zeros, jnp.float32(100.0), minimum)
  assert fn._cache_size() == 1
  assert int(a.sum()) < int(b.sum())


def test_select_global_lands_within_one_percent_of_the_target_on_the_digits_cnn():
  spec = _spec("digits_cnn")
  k = spec.num_channels
  model = FlopsModel.build(spec)
  minimum = allocation.min_keep(spec, 1, 0.0)
  worst = 1.0
  for seed in range(8):
    scores = np.random.default_rng(seed).random(k).astype(np.float32)
    out = _select_global("digits_cnn", scores, np.ones(k, bool), np.zeros(k, bool),
                         np.float32(0.5 * model.dense_cost), minimum)
    worst = min(worst, _macs(spec, ~out) / model.dense_cost)
  assert worst >= 0.49, worst


# ----------------------------------------------------------------------------------------
# select_uniform.


def test_select_uniform_hand_case():
  spec = _spec("mlp")
  scores = np.concatenate([np.arange(8.0)[::-1], np.arange(16.0)])
  none = np.zeros(24, bool)
  out = _select("mlp", "select_uniform", scores, ~none, none, 96.0, [1, 1])
  # The smallest common fraction that halves the MACs is 3/8: 5 and 10 channels left
  # (90 MACs); at 5/16 (6 and 11 left) the MLP keeps 112.
  g0, g1 = _split(spec, out)
  np.testing.assert_array_equal(np.nonzero(g0)[0], [5, 6, 7])        # least important
  np.testing.assert_array_equal(np.nonzero(g1)[0], [0, 1, 2, 3, 4, 5])
  assert _macs(spec, ~out) == 90 == _mlp2_macs(5, 10)
  assert _mlp2_macs(6, 11) > 96


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20"])
def test_select_uniform_removes_the_same_fraction_of_every_group(name):
  spec = _spec(name)
  k = spec.num_channels
  model = FlopsModel.build(spec)
  scores = np.random.default_rng(0).random(k).astype(np.float32)
  minimum = allocation.min_keep(spec, 1, 0.0)
  sizes = np.asarray(spec.sizes)
  for target in (0.8, 0.5):
    target_cost = np.float32(target * model.dense_cost)
    out = _select(name, "select_uniform", scores, np.ones(k, bool), np.zeros(k, bool),
                  target_cost, minimum)
    assert _macs(spec, ~out) <= target_cost
    removed = np.asarray([g.sum() for g in _split(spec, out)])
    # One ratio r with removed_g = floor(r * size_g) for every group.
    lo = np.max(removed / sizes)
    hi = np.min((removed + 1) / sizes)
    assert lo < hi, (removed, sizes)
    # In every group the least important go.
    for g, s in zip(_split(spec, out), _split(spec, scores)):
      if g.any() and not g.all():
        assert s[g].max() <= s[~g].min()


def _widths_select(name, widths, target, scores, removed=None):
  spec = _spec(name)
  k = spec.num_channels
  alloc = allocation.Widths(widths=tuple(widths))
  ctx = dpm_jax.pruning.Context.build(spec, target)
  alloc.check(ctx)
  removed = np.zeros(k, bool) if removed is None else removed
  select = jax.jit(lambda s, r, t: alloc.select(ctx, None, s, jnp.ones(k, bool), r, t, None)[0])
  return lambda t: np.asarray(select(jnp.asarray(scores, jnp.float32), jnp.asarray(removed),
                                     jnp.float32(t * ctx.dense_cost)))


def test_widths_reaches_the_widths_at_the_final_target_and_shares_the_way_there():
  spec = _spec("digits_cnn")
  sizes = np.asarray(spec.sizes)
  widths = np.maximum(sizes // 4, 1)
  widths[0] = sizes[0] - 1          # one group nearly whole, as a released-into group is
  keep = np.concatenate([np.arange(n) < w for n, w in zip(sizes, widths)])
  final = _macs(spec, keep) / dpm_jax.spec_cost(spec).macs
  scores = np.random.default_rng(1).random(spec.num_channels)
  select = _widths_select("digits_cnn", widths, final, scores)
  out = select(final)
  assert [int((~g).sum()) for g in _split(spec, out)] == widths.tolist()
  for g, s in zip(_split(spec, out), _split(spec, scores)):   # the least important go
    if g.any() and not g.all():
      assert s[g].max() <= s[~g].min()
  # Half way: every group has lost about the same share of what it must lose in all.
  halfway = (1 + final) / 2
  out = select(halfway)
  assert _macs(spec, ~out) <= halfway * dpm_jax.spec_cost(spec).macs
  lost = np.asarray([g.sum() for g in _split(spec, out)])
  share = lost / (sizes - widths)
  assert 0 < share.max() < 1
  assert share.max() - share.min() <= 1 / (sizes - widths).min() + 1e-6, share


def test_widths_check_refuses_what_it_cannot_do():
  spec = _spec("mlp")                      # groups of 8 and 16 channels
  ctx = dpm_jax.pruning.Context.build(spec, 0.5)
  with pytest.raises(ValueError, match="no widths given"):
    allocation.Widths().check(ctx)
  with pytest.raises(ValueError, match="2 channel groups"):
    allocation.Widths(widths=(4,)).check(ctx)
  with pytest.raises(ValueError, match="keeps 9 of 8"):
    allocation.Widths(widths=(9, 4)).check(ctx)
  # 6 and 12 channels keep 4*6 + 6*12 + 2*12 = 120 of 192 MACs: over a 0.5 target.
  with pytest.raises(ValueError, match="0.6250 of the dense FLOPs, above target_flops=0.5"):
    allocation.Widths(widths=(6, 12)).check(ctx)
  allocation.Widths(widths=(4, 8)).check(ctx)   # 16 + 32 + 16 = 64 MACs
  with pytest.raises(ValueError, match="tuple of ints >= 1"):
    allocation.Widths(widths=(4, 0))


def test_widths_through_the_prune_transform_ends_at_the_widths():
  spec = _spec("mlp")
  widths = (3, 5)
  final = _mlp2_macs(*widths) / _mlp2_macs(8, 16)
  recipe = dpm_jax.recipes.depgraph(final, allocation=allocation.Widths(widths=widths),
                                    num_events=3, start_step=0, end_step=4)
  params = {k: jax.random.normal(jax.random.key(i), s) for i, (k, s)
            in enumerate(MLP2_SHAPES.items())}
  tx = dpm_jax.prune(optax.sgd(0.01), spec, recipe)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grads, s, p))
  for _ in range(6):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert [int(m.sum()) for m in dpm_jax.keep_masks(state)] == list(widths)
