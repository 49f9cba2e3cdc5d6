"""Tests of dpm_jax.flops: MACs by hand arithmetic, published zoo counts, pruned counts.

Counting only traces the forward pass, so models are abstract (`nnx.eval_shape`) except where
surgery needs arrays; those get numpy zeros (no XLA compile per shape).
"""

from __future__ import annotations

import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import models


def _abstract(make):
  return nnx.eval_shape(make)


def _with_zeros(model: nnx.Module) -> nnx.Module:
  """``model`` (abstract or not) with host-made zero arrays."""
  graphdef, state = nnx.split(model)
  # jax.device_put, not jnp.asarray: on CPU the latter compiles a copy per new shape.
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype)),
                                               nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def _param_count(model: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _random_keep(spec: dpm_jax.GroupSpec, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  keep = [rng.random(g.size) < rng.uniform(0.2, 0.9) for g in spec.groups]
  for k in keep:
    k[rng.integers(len(k))] = True
  return keep


# ----------------------------------------------------------------------------------------
# Single layers, by hand.


def _conv(cin, cout, k, spatial_dims=2, **kwargs):
  return _abstract(lambda: nnx.Conv(cin, cout, (k,) * spatial_dims, rngs=nnx.Rngs(0),
                                    **kwargs))


@pytest.mark.parametrize(
    "layer,shape,macs,params",
    [
        # k * k * cin * cout * H * W.
        (lambda: _conv(3, 8, 3), (1, 10, 10, 3), 3 * 3 * 3 * 8 * 10 * 10, 3 * 3 * 3 * 8 + 8),
        # The batch multiplies: counts are for the inputs given.
        (lambda: _conv(3, 8, 3), (2, 10, 10, 3), 2 * 3 * 3 * 3 * 8 * 10 * 10, 3 * 3 * 3 * 8 + 8),
        # Stride 2, 'SAME' padding: 5x5 outputs.
        (lambda: _conv(3, 8, 3, strides=2), (1, 10, 10, 3), 3 * 3 * 3 * 8 * 5 * 5, 224),
        # 'VALID': 8x8 outputs.
        (lambda: _conv(3, 8, 3, padding="VALID"), (1, 10, 10, 3), 3 * 3 * 3 * 8 * 8 * 8, 224),
        # Depthwise: each output channel reads one input channel.
        (lambda: _conv(8, 8, 3, feature_group_count=8, use_bias=False), (1, 10, 10, 8),
         3 * 3 * 8 * 10 * 10, 3 * 3 * 8),
        # Depthwise with channel multiplier 2.
        (lambda: _conv(8, 16, 3, feature_group_count=8), (1, 10, 10, 8),
         3 * 3 * 16 * 10 * 10, 3 * 3 * 16 + 16),
        # Two groups: each output reads cin / 2 channels.
        (lambda: _conv(8, 6, 3, feature_group_count=2), (1, 10, 10, 8),
         3 * 3 * 4 * 6 * 10 * 10, 3 * 3 * 4 * 6 + 6),
        (lambda: _abstract(lambda: nnx.Linear(20, 7, rngs=nnx.Rngs(0))), (3, 20), 3 * 20 * 7,
         20 * 7 + 7),
        # Conv1D on [B, L, C]: k * cin * cout * L.
        (lambda: _conv(3, 8, 5, 1), (1, 40, 3), 5 * 3 * 8 * 40, 5 * 3 * 8 + 8),
        # Conv1D, stride 2, 'SAME': 20 outputs.
        (lambda: _conv(3, 8, 5, 1, strides=2), (1, 40, 3), 5 * 3 * 8 * 20, 5 * 3 * 8 + 8),
        # Depthwise Conv1D with channel multiplier 2.
        (lambda: _conv(8, 16, 3, 1, feature_group_count=8), (1, 40, 8), 3 * 16 * 40,
         3 * 16 + 16),
    ])
def test_single_layer(layer, shape, macs, params):
  report = dpm_jax.count_flops(layer(), jnp.zeros(shape))
  assert (report.macs, report.params) == (macs, params)
  assert report.flops == 2 * macs
  assert len(report.layers) == 1 and report.layers[0].macs == macs


class FlattenNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 6, (3, 3), strides=2, rngs=rngs)
    self.dense = nnx.Linear(4 * 4 * 6, 5, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.conv(x))
    return self.dense(h.reshape(h.shape[0], -1))


def test_flatten_dense_by_hand():
  model = _abstract(lambda: FlattenNet(nnx.Rngs(0)))
  report = dpm_jax.count_flops(model, jnp.zeros((1, 8, 8, 2)))
  conv_macs, dense_macs = 3 * 3 * 2 * 6 * 4 * 4, 96 * 5
  assert [(l.name, l.primitive, l.macs) for l in report.layers] == [
      ("conv/kernel", "conv", conv_macs), ("dense/kernel", "dot_general", dense_macs)]
  assert report.macs == conv_macs + dense_macs
  assert report.params == _param_count(model) == 3 * 3 * 2 * 6 + 6 + 96 * 5 + 5
  # Keep 2 of 6 conv channels: the conv makes 2 maps, the dense layer reads 4 * 4 * 2 rows.
  keep = [np.array([True, False, False, True, False, False])]
  pruned = dpm_jax.count_flops(model, jnp.zeros((1, 8, 8, 2)), keep=keep)
  assert pruned.macs == 3 * 3 * 2 * 2 * 16 + 32 * 5
  assert pruned.params == 3 * 3 * 2 * 2 + 2 + 32 * 5 + 5


def test_mnist1d_cnn_by_hand():
  # Conv1D k5 + BN + relu + max pool 2, three times (40 -> 20 -> 10 -> 5), then a flatten
  # of 5 x 64 into the head.
  model = _abstract(lambda: models.create_model("mnist1d_cnn", num_classes=10,
                                                rngs=nnx.Rngs(0)))
  report = dpm_jax.count_flops(model, jnp.zeros((1, 40, 1)))
  expected = [("convs/0/conv/kernel", "conv", 5 * 1 * 32 * 40),
              ("convs/1/conv/kernel", "conv", 5 * 32 * 64 * 20),
              ("convs/2/conv/kernel", "conv", 5 * 64 * 64 * 10),
              ("head/kernel", "dot_general", 5 * 64 * 10)]
  assert [(l.name, l.primitive, l.macs) for l in report.layers] == expected
  assert report.macs == 419_200
  # Bias-free conv kernels, BN scale and bias, the head's kernel and bias.
  assert report.params == _param_count(model) == (
      5 * (1 * 32 + 32 * 64 + 64 * 64) + 2 * (32 + 64 + 64) + 320 * 10 + 10)
  # Keep 8, 16 and 4 channels: every layer shrinks with both of its channel counts.
  keep = [np.arange(32) < 8, np.arange(64) < 16, np.arange(64) < 4]
  pruned = dpm_jax.count_flops(model, jnp.zeros((1, 40, 1)), keep=keep)
  assert [l.macs for l in pruned.layers] == [
      5 * 1 * 8 * 40, 5 * 8 * 16 * 20, 5 * 16 * 4 * 10, 5 * 4 * 10]
  assert pruned.params == 5 * (8 + 8 * 16 + 16 * 4) + 2 * (8 + 16 + 4) + 20 * 10 + 10


def test_pure_function_and_linen():
  def mlp(v, x):
    return jax.nn.relu(x @ v["w1"] + v["b1"]) @ v["w2"]

  v = {"w1": jnp.zeros((4, 8)), "b1": jnp.zeros(8), "w2": jnp.zeros((8, 3))}
  report = dpm_jax.count_flops_fn(mlp, v, jnp.zeros((1, 4)))
  assert (report.macs, report.params) == (4 * 8 + 8 * 3, 4 * 8 + 8 + 8 * 3)
  keep = [np.arange(8) < 5]
  pruned = dpm_jax.count_flops_fn(mlp, v, jnp.zeros((1, 4)), keep=keep)
  assert (pruned.macs, pruned.params) == (4 * 5 + 5 * 3, 4 * 5 + 5 + 5 * 3)

  class Net(linen.Module):

    @linen.compact
    def __call__(self, x):
      x = linen.BatchNorm(use_running_average=True)(linen.Conv(4, (3, 3))(x))
      return linen.Dense(3)(jnp.mean(linen.relu(x), axis=(1, 2)))

  x = jnp.zeros((1, 6, 6, 2))
  variables = jax.eval_shape(Net().init, jax.random.key(0), x)
  report = dpm_jax.count_flops_fn(lambda v, x: Net().apply(v, x), variables, x)
  assert report.macs == 3 * 3 * 2 * 4 * 36 + 4 * 3
  # Statistics are not parameters: conv (72 + 4), BN scale and bias (8), dense (12 + 3).
  assert report.params == 76 + 8 + 15


def test_str_lists_layers():
  model = _abstract(lambda: FlattenNet(nnx.Rngs(0)))
  lines = str(dpm_jax.count_flops(model, jnp.zeros((1, 8, 8, 2)))).splitlines()
  # A header, one row per layer (name, op, MACs) in forward order, then the total.
  assert [l.split() for l in lines[:-1]] == [
      ["layer", "op", "MACs"], ["conv/kernel", "conv", "1,728"],
      ["dense/kernel", "dot_general", "480"]]
  assert lines[-1] == "total: 2,208 MACs = 4,416 FLOPs (2 x MACs), 599 params"


# ----------------------------------------------------------------------------------------
# The zoo against published counts.


@pytest.mark.parametrize(
    "name,shape,classes,macs",
    [
        ("resnet20", (1, 32, 32, 3), 10, 40.6e6),
        ("resnet56", (1, 32, 32, 3), 10, 125.5e6),
        ("vgg16_bn", (1, 32, 32, 3), 10, 313e6),
        ("resnet50", (1, 224, 224, 3), 1000, 4.1e9),
    ])
def test_zoo_counts(name, shape, classes, macs):
  model = _abstract(lambda: models.create_model(name, num_classes=classes, rngs=nnx.Rngs(0)))
  report = dpm_jax.count_flops(model, jnp.zeros(shape))
  assert report.macs == pytest.approx(macs, rel=0.01)
  assert report.flops == 2 * report.macs
  assert report.params == _param_count(model)
  assert sum(l.macs for l in report.layers) == report.macs


def test_resnet50_exact():
  # torchvision's ResNet-50: 4,089,184,256 MACs ("4.1 GFLOPs") and 25,557,032 parameters.
  model = _abstract(lambda: models.create_model("resnet50", num_classes=1000,
                                                rngs=nnx.Rngs(0)))
  report = dpm_jax.count_flops(model, jnp.zeros((1, 224, 224, 3)))
  assert (report.macs, report.params) == (4_089_184_256, 25_557_032)


# ----------------------------------------------------------------------------------------
# Pruned counts without building the network.


@pytest.mark.parametrize("name,shape,seed", [("digits_cnn", (1, 8, 8, 1), 0),
                                             ("mnist1d_cnn", (1, 40, 1), 4),
                                             ("resnet20", (1, 32, 32, 3), 1),
                                             ("vgg16_bn", (1, 32, 32, 3), 2),
                                             ("mobilenet_v2", (1, 32, 32, 3), 3)])
def test_keep_matches_surgery(name, shape, seed):
  model = _with_zeros(_abstract(lambda: models.create_model(name, num_classes=10,
                                                            rngs=nnx.Rngs(0))))
  x = jnp.zeros(shape)
  spec = dpm_jax.trace_groups(model, x)
  dense = dpm_jax.spec_cost(spec)
  keep = _random_keep(spec, seed)
  predicted = dpm_jax.count_flops(model, x, keep=keep)
  assert predicted == dpm_jax.spec_cost(spec, keep)
  small = dpm_jax.remove_channels(model, spec, keep)
  measured = dpm_jax.count_flops(small, x)
  assert (predicted.macs, predicted.params) == (measured.macs, measured.params)
  assert [l.macs for l in predicted.layers] == [l.macs for l in measured.layers]
  assert measured.params == _param_count(small)
  assert predicted.macs < dense.macs and predicted.params < dense.params
  # Keeping everything is the dense network.
  assert dpm_jax.spec_cost(spec, [np.ones(g.size, bool) for g in spec.groups]) == dense
