"""Latency as a pruning cost: the measured table, its cache, the model over it, recipes."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import latency
from dpm_jax.flops import FlopsModel
from dpm_jax.pruning import allocations
from train import loop
from train import pruning as train_pruning


def _mlp3(v, x):
  h = jnp.maximum(x @ v["w1"], 0)
  h = jnp.maximum(h @ v["w2"], 0)
  return h @ v["w3"]


def _mlp3_params(a: float = 1.0, b: float = 1.0) -> dict[str, jax.Array]:
  """Group 0 (w1's columns, w2's rows) of scale ``a``, group 1 (w2's columns, w3's rows) of
  scale ``b``, each channel a little larger than the one before."""
  ramp = 1.0 + jnp.arange(16) / 16
  return {"w1": jnp.ones((4, 16)) * a * ramp, "w2": jnp.ones((16, 16)) * ramp[:, None] * a
          * b * ramp, "w3": (jnp.ones((16, 2)) * b * ramp[:, None])}


def _mlp3_spec() -> dpm_jax.GroupSpec:
  return dpm_jax.trace_groups_fn(_mlp3, _mlp3_params(), jnp.zeros((1, 4)))


class _ConvNet(nnx.Module):
  """conv -> relu -> depthwise conv -> relu -> conv -> mean -> dense: every kind of op."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 12, (3, 3), rngs=rngs)
    self.dw = nnx.Conv(12, 12, (3, 3), feature_group_count=12, rngs=rngs)
    self.conv2 = nnx.Conv(12, 8, (1, 1), strides=2, rngs=rngs)
    self.fc = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.dw(nnx.relu(self.conv1(x))))
    return self.fc(jnp.mean(nnx.relu(self.conv2(x)), axis=(1, 2)))


def _conv_spec(batch: int = 1) -> dpm_jax.GroupSpec:
  return dpm_jax.trace_groups(_ConvNet(nnx.Rngs(0)), jnp.zeros((batch, 8, 8, 3)))


@pytest.fixture(scope="module")
def conv_table(tmp_path_factory):
  cache = tmp_path_factory.mktemp("latency")
  table = latency.measure_latency(_conv_spec(), step=4, batch=2, repeats=1, warmup=0,
                                  cache_dir=str(cache))
  return table, cache


def test_every_layer_records_how_to_rebuild_its_operation():
  spec = _conv_spec()
  ops = {l.name: l.op for l in spec.layers}
  assert ops["dw/kernel"].depthwise and ops["dw/kernel"].axes[1] == ((1, 3, 1), (0, 3, 1))
  assert not ops["conv1/kernel"].depthwise
  assert dict(ops["conv2/kernel"].params)["window_strides"] == (2, 2)
  assert ops["fc/kernel"].primitive == "dot_general" and ops["fc/kernel"].batch == ((0, 0),)
  hash(spec)  # still static


class _Residual(nnx.Module):
  """y = conv1(x); conv2(relu(y)) + y, then a dense layer."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    y = self.conv1(x)
    return self.fc(jnp.mean(self.conv2(nnx.relu(y)) + y, axis=(1, 2)))


def test_layers_whose_outputs_are_added_are_joined():
  spec = dpm_jax.trace_groups(_Residual(nnx.Rngs(0)), jnp.zeros((1, 8, 8, 3)))
  assert {l.name: l.op.joined for l in spec.layers} == {
      "conv1/kernel": True, "conv2/kernel": True, "fc/kernel": False}
  # A depthwise conv's output channels are its input's: nothing is joined.
  assert not any(l.op.joined for l in _conv_spec().layers)


def test_a_second_measurement_reads_the_cache(conv_table):
  table, cache = conv_table
  files = sorted(os.listdir(cache))
  assert len(files) == len(table.entries)  # one file per distinct operation
  mtimes = [os.path.getmtime(cache / f) for f in files]
  again = latency.measure_latency(_conv_spec(), step=4, batch=2, repeats=1, warmup=0,
                                  cache_dir=str(cache))
  assert again == table  # timings are never equal twice: these were read back
  assert [os.path.getmtime(cache / f) for f in files] == mtimes
  # What the files say is what a second call returns.
  path = cache / files[0]
  stored = json.loads(path.read_text())
  stored["seconds"] = [7.0] * len(stored["seconds"])
  path.write_text(json.dumps(stored))
  edited = latency.measure_latency(_conv_spec(), step=4, batch=2, repeats=1, warmup=0,
                                   cache_dir=str(cache))
  assert sum(all(s == 7.0 for s in e.seconds) for _, e in edited.entries) == 1


def test_a_spec_traced_at_another_batch_finds_the_table(conv_table):
  table, _ = conv_table
  for batch in (1, 5):
    model = table(_conv_spec(batch))
    assert model.dense_cost == table(_conv_spec()).dense_cost


def test_dense_cost_is_the_sum_of_every_layer_at_full_width(conv_table):
  table, _ = conv_table
  spec = _conv_spec()
  model = table(spec)
  full = sum(table.lookup(l).seconds[-1] for l in spec.layers)
  np.testing.assert_allclose(model.dense_cost, full, rtol=1e-6)
  assert model.dense_cost > 0 and model.unit == "predicted latency"


def _random_table(spec, step, seed=0):
  rng = np.random.default_rng(seed)
  sizes = {l.name: int(np.prod([len(g) for g in latency.layer_grids(spec, l, step)]))
           for l in spec.layers}
  return latency.LatencyTable.from_seconds(
      spec, step, {name: rng.uniform(1.0, 2.0, n).tolist() for name, n in sizes.items()})


def test_interpolation_is_exact_at_grid_points_and_linear_between():
  spec = _mlp3_spec()
  table = _random_table(spec, 8)
  model = table(spec)
  w1, w2, w3 = (table.lookup(l) for l in spec.layers)
  cost = jax.jit(model.cost)
  for a, b in itertools.product((1, 8, 16), repeat=2):
    keep = jnp.concatenate([jnp.arange(16) < a, jnp.arange(16) < b])
    ia, ib = (1, 8, 16).index(a), (1, 8, 16).index(b)
    want = w1.seconds[ia] + w2.seconds[3 * ia + ib] + w3.seconds[ib]
    np.testing.assert_allclose(float(cost(keep)), want, rtol=1e-6)
  # Halfway between two grid points of one dimension: the mean of the two.
  keep = jnp.concatenate([jnp.arange(16) < 12, jnp.ones(16, bool)])
  want = (0.5 * (w1.seconds[1] + w1.seconds[2]) + 0.5 * (w2.seconds[5] + w2.seconds[8])
          + w3.seconds[2])
  np.testing.assert_allclose(float(cost(keep)), want, rtol=1e-6)
  # Batched dimensions, as allocations pass them.
  dims = jnp.stack([model.dim_sizes(jnp.ones(32)), model.dim_sizes(keep)], axis=1)
  np.testing.assert_allclose(model.cost_of_dims(dims), [model.dense_cost, want], rtol=1e-6)


# Group 0 widens layer 1 and 2's input, group 1 layer 2's output and layer 3's input. Their
# FLOPs (4a + ab + 2b) weigh both groups alike; this device's latency depends on b only.
_B_ONLY = {"w1": [1.0, 1.0, 1.0], "w2": [1.0, 2.0, 4.0] * 3, "w3": [1.0, 2.0, 4.0]}


def _pruned_widths(cost, target: float = 0.6) -> list[int]:
  """Widths after one hard one-shot event of global L2 (not normalised) allocation: group
  0's channels are the least important (and no swaps trade importance for precision)."""
  spec = _mlp3_spec()
  recipe = dpm_jax.recipes.depgraph(
      target_flops=target, criterion="l2",
      allocation=allocations.Global(normalize=False, flops_tolerance=0.2), round_to=8,
      cost=cost)
  params = _mlp3_params(a=0.1, b=1.0)
  tx = dpm_jax.prune(optax.sgd(0.0), spec, recipe)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  return [int(k.sum()) for k in dpm_jax.keep_masks(state)]


def test_where_latency_and_flops_disagree_the_allocation_follows_the_cost():
  spec = _mlp3_spec()
  table = latency.LatencyTable.from_seconds(spec, 8, _B_ONLY)
  by_flops = _pruned_widths(FlopsModel.build)
  by_latency = _pruned_widths(table)
  # FLOPs: the least important group (0) goes down first and is enough.
  assert by_flops == [8, 16]
  # Latency: cutting group 0 saves nothing, so group 1 goes down.
  assert by_latency == [16, 8]
  flops, lat = FlopsModel.build(spec), table(spec)
  keep = lambda widths: jnp.concatenate([jnp.arange(16) < w for w in widths])
  assert float(lat.cost(keep(by_latency))) <= 0.6 * lat.dense_cost
  assert float(lat.cost(keep(by_flops))) > 0.6 * lat.dense_cost  # misses the latency target
  assert float(flops.cost(keep(by_flops))) <= 0.6 * flops.dense_cost


def test_a_latency_recipe_needs_round_to_a_multiple_of_the_step():
  spec = _mlp3_spec()
  table = latency.LatencyTable.from_seconds(spec, 8, _B_ONLY)
  for round_to in (1, 4, 12):
    recipe = dpm_jax.recipes.depgraph(target_flops=0.6, round_to=round_to, cost=table)
    with pytest.raises(ValueError, match=r"round_to=.*multiples of 8.*multiple of 8"):
      dpm_jax.prune(optax.sgd(0.1), spec, recipe)
  dpm_jax.prune(optax.sgd(0.1), spec,
                dpm_jax.recipes.depgraph(target_flops=0.6, round_to=8, cost=table))


def test_an_unreachable_latency_target_says_latency():
  spec = _mlp3_spec()
  table = latency.LatencyTable.from_seconds(spec, 8, _B_ONLY)
  recipe = dpm_jax.recipes.depgraph(target_flops=0.2, round_to=8, cost=table)
  with pytest.raises(ValueError, match="of its predicted latency"):
    dpm_jax.prune(optax.sgd(0.1), spec, recipe)


def test_layers_that_cannot_be_rebuilt_are_refused_by_name():
  spec = _mlp3_spec()
  blind = dataclasses.replace(spec, layers=tuple(l._replace(op=None) for l in spec.layers))
  with pytest.raises(ValueError, match="layer w1 .*Layer.op is None"):
    latency.measure_latency(blind, repeats=1, warmup=0)
  odd = dataclasses.replace(spec, layers=tuple(
      l._replace(op=l.op._replace(primitive="ragged_dot")) for l in spec.layers))
  with pytest.raises(ValueError, match="'ragged_dot', which has no latency probe"):
    latency.measure_latency(odd, repeats=1, warmup=0)
  table = latency.LatencyTable.from_seconds(spec, 8, _B_ONLY)
  with pytest.raises(ValueError, match="no timings for layer conv1/kernel"):
    table(_conv_spec())


@pytest.mark.parametrize("option", [{"step": 0}, {"repeats": 0}, {"warmup": -1},
                                    {"batch": 0}, {"step": 2.0}])
def test_bad_measurement_options_are_refused_by_name(option):
  with pytest.raises(ValueError, match=f"{next(iter(option))}="):
    latency.measure_latency(_mlp3_spec(), **option)


def test_a_cost_must_build_a_cost_model():
  with pytest.raises(TypeError, match="cost='latency' must build a cost model"):
    dpm_jax.recipes.depgraph(target_flops=0.5, cost="latency")


def test_hand_made_tables_are_checked():
  spec = _mlp3_spec()
  with pytest.raises(ValueError, match="no seconds for layer w3"):
    latency.LatencyTable.from_seconds(spec, 8, {"w1": [1.0] * 3, "w2": [1.0] * 9})
  with pytest.raises(ValueError, match="w2 needs 9 values"):
    latency.LatencyTable.from_seconds(spec, 8, {**_B_ONLY, "w2": [1.0] * 3})


def test_the_config_asks_for_round_to_a_multiple_of_the_latency_step():
  config = importlib.import_module("configs.default").get_config()
  config.pruning.enabled = True
  assert config.pruning.cost == "flops"
  train_pruning.validate_pruning_config(config, steps_per_epoch=390)
  config.pruning.cost = "latency"
  with pytest.raises(loop.ConfigError, match=r"round_to=1 with cost='latency'.*round_to=8"):
    train_pruning.validate_pruning_config(config, steps_per_epoch=390)
  config.pruning.round_to = 16
  train_pruning.validate_pruning_config(config, steps_per_epoch=390)
  config.pruning.cost = "seconds"
  with pytest.raises(loop.ConfigError, match="choose one of flops, latency"):
    train_pruning.validate_pruning_config(config, steps_per_epoch=390)
