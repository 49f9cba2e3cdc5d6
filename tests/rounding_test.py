"""Channel multiples (``round_to``): every group keeps a multiple of m channels, or all."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import models
from dpm_jax.flops import FlopsModel
from dpm_jax.pruning import allocations

WIDTHS = {"conv_widths": (12, 16), "dense_widths": (24,)}


def _spec_and_params():
  model = models.create_model("digits_cnn", num_classes=10, rngs=nnx.Rngs(0), **WIDTHS)
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 8, 8, 1)))
  return spec, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _allowed(width: int, size: int, m: int) -> bool:
  return width == size or width % m == 0


def _run(spec, params, recipe, steps: int):
  tx = dpm_jax.prune(optax.sgd(0.01), spec, recipe)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    grads = jax.tree.map(
        lambda x, i=i: 0.01 * jax.random.normal(jax.random.key(i), x.shape), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return dpm_jax.keep_masks(state)


@pytest.mark.parametrize("method, options", [
    ("depgraph", {}),
    ("depgraph", {"removal": "dpm", "decay_steps": 4, "min_decay_steps": 1}),
    ("magnitude", {}),
    ("psap", {"interval": 2, "end_step": 4}),
    ("otov2", {"eps": 0.0}),
    ("sfp", {"interval": 2, "end_step": 4}),
    ("gate_decorator", {"tick_steps": 1, "ticks_per_tock": 3, "tock_steps": 1,
                        "tick_fraction": 0.25, "end_step": 12}),
])
def test_every_width_is_a_multiple_and_the_target_holds(method, options):
  spec, params = _spec_and_params()
  recipe = dpm_jax.recipes.PRESETS[method](target_flops=0.5, round_to=4, **options)
  keep = _run(spec, params, recipe, recipe.last_step + 3)
  widths = [int(k.sum()) for k in keep]
  assert all(_allowed(w, g.size, 4) for w, g in zip(widths, spec.groups)), widths
  flops = dpm_jax.spec_cost(spec, keep).macs / dpm_jax.spec_cost(spec).macs
  # Multiples of 4 in layers of 12 to 24 channels are coarse steps: the landing is too.
  assert 0.3 < flops <= 0.5 + 1e-6, (widths, flops)


def _two_groups():
  def f(v, x):
    h = jax.nn.relu(x @ v["w1"])
    return jax.nn.relu(h @ v["w2"]) @ v["w3"]

  v = {"w1": jnp.ones((4, 10)), "w2": jnp.ones((10, 16)), "w3": jnp.ones((16, 2))}
  return dpm_jax.trace_groups_fn(f, v, jnp.zeros((1, 4)))


def test_round_widths_keeps_the_important_channels_and_meets_the_target():
  spec = _two_groups()
  model = FlopsModel.build(spec)
  k = spec.num_channels
  scores = jnp.arange(k, dtype=jnp.float32)          # channel 0 of each group is least useful
  removed = jnp.zeros(k, bool)
  # The allocation left widths 7 and 11 (its least important channels gone).
  selected = jnp.concatenate([jnp.arange(10) < 3, jnp.arange(16) < 5])
  target = float(model.cost(~selected))
  index = dpm_jax.channels.ChannelIndex.build(spec)
  out = allocations.round_widths(model, index, scores, jnp.ones(k, bool), removed, selected,
                                 jnp.float32(target), np.array([1, 1]), np.array([4, 8]))
  out = np.asarray(out)
  widths = [int((~out[:10]).sum()), int((~out[10:]).sum())]
  assert widths[0] % 4 == 0 and widths[1] % 8 == 0, widths
  assert float(model.cost(jnp.asarray(~out))) <= target
  # Within a group the least important channels go first.
  for part in (out[:10], out[10:]):
    n = int(part.sum())
    assert part[:n].all() and not part[n:].any()
  # Multiples of 1 change nothing.
  same = allocations.round_widths(model, index, scores, jnp.ones(k, bool), removed, selected,
                                  jnp.float32(target), np.array([1, 1]), np.array([1, 1]))
  np.testing.assert_array_equal(same, selected)


def test_a_group_smaller_than_its_multiple_keeps_its_full_width_or_minimum():
  assert allocations.rounded_minimum(np.array([6, 32]), np.array([1, 1]),
                                     np.array([8, 8])).tolist() == [6, 8]


@pytest.mark.parametrize("value", [0, -8, 2.5, "8", True, ()])
def test_bad_round_to_is_refused_by_name(value):
  with pytest.raises(ValueError, match=r"round_to=.* must be an int >= 1"):
    dpm_jax.recipes.depgraph(target_flops=0.5, round_to=value)


def test_per_group_multiples_must_match_the_groups():
  spec, _ = _spec_and_params()
  recipe = dpm_jax.recipes.depgraph(target_flops=0.5, round_to=(8, 8))
  with pytest.raises(ValueError, match="round_to has 2 entries but the model has 3"):
    dpm_jax.prune(optax.sgd(0.1), spec, recipe)


def test_a_target_the_multiples_cannot_reach_is_refused_before_training():
  spec, _ = _spec_and_params()
  recipe = dpm_jax.recipes.depgraph(target_flops=0.05, round_to=16)
  with pytest.raises(ValueError, match="round_to=16 with the allocation's guard"):
    dpm_jax.prune(optax.sgd(0.1), spec, recipe)
