"""Tests of dpm_jax.surgery: the smaller network computes what the masked one computes.

The equivalence tests give BatchNorm random statistics, scale and bias (a removed channel
whose bias or scale were left alone would change the output, so the comparisons can fail) and
run in eval mode. Weights are made with numpy and models built abstractly first: on CPU,
`jax.random`, `jnp.asarray` and eager execution compile once per shape. Forward passes are
jitted.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as linen
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import models
from dpm_jax.groups import path_str

TOLERANCE = 1e-5  # float32 outputs of O(1)
# Compile time dominates these tests and optimisation does not matter: XLA's cheapest level
# halves it on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _device(x: np.ndarray, dtype=np.float32) -> jax.Array:
  # Not jnp.asarray: on CPU it compiles a copy per new shape.
  return jax.device_put(np.asarray(x, dtype))


def _random_value(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """He-like kernels, BatchNorm statistics far from the identity."""
  if name == "kernel":
    return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
  if name in ("var", "scale"):
    return rng.uniform(0.5, 1.5, shape)
  if name in ("mean", "bias"):
    return rng.normal(0.0, 0.2, shape)
  raise ValueError(f"no random value for {name}")


def _randomized(model: nnx.Module, seed: int) -> nnx.Module:
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  values = jax.tree_util.tree_map_with_path(
      lambda p, x: (_device(_random_value(rng, path_str(p)[-1], x.shape), x.dtype)
                    if jnp.issubdtype(x.dtype, jnp.floating) else x),  # RNG keys, counts
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _random_keep(spec: dpm_jax.GroupSpec, seed: int) -> list[np.ndarray]:
  """Seeded masks, about half the channels, at least one channel kept per group."""
  rng = np.random.default_rng(seed)
  keep = [rng.random(g.size) < 0.5 for g in spec.groups]
  for k in keep:
    k[rng.integers(len(k))] = True
  return keep


def _forward(model: nnx.Module, x: jax.Array):
  """``model``'s forward pass, compiled once: ``(pure state dict, x) -> outputs``."""
  graphdef, state = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
  fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return fn.lower(state, x).compile(FAST_COMPILE)


def _pure(model: nnx.Module) -> dict[str, Any]:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _spec_path(key_path) -> tuple[str, ...]:
  """A leaf's path without an ``nnx.Variable``'s own ``value`` key."""
  path = path_str(key_path)
  return path[:-1] if path and path[-1] == "value" else path


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return {_spec_path(k): x for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _slice_by_hand(x, path: tuple[str, ...], spec: dpm_jax.GroupSpec, keep) -> np.ndarray:
  """``x`` (at spec path ``path``) without every group member's removed indices."""
  x = np.asarray(x)
  for axis in range(x.ndim):
    removed = [m.indices()[~np.asarray(k)].ravel() for g, k in zip(spec.groups, keep)
               for m in g.members if (m.path, m.axis) == (path, axis)]
    if removed:
      x = np.delete(x, np.concatenate(removed), axis=axis)
  return x


def _sliced_by_hand(variables, spec: dpm_jax.GroupSpec, keep) -> dict:
  """Flat ``{path: array}`` of ``variables`` sliced with numpy."""
  return {path: _slice_by_hand(x, path, spec, keep) for path, x in _flat(variables).items()}


def _assert_flat_equal(actual: dict, expected: dict) -> None:
  assert actual.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(np.asarray(actual[path]), expected[path],
                                  err_msg="/".join(path))


def _assert_feature_counts(small: nnx.Module, depthwise: set) -> None:
  """Every layer's attributes agree with its arrays."""
  for path, node in nnx.iter_graph(small):
    where = "/".join(map(str, path))
    if isinstance(node, nnx.Conv):
      shape = node.kernel[...].shape
      assert node.kernel_shape == shape, where
      assert node.out_features == shape[-1], where
      assert node.in_features == shape[-2] * node.feature_group_count, where
      if path in depthwise:
        assert node.feature_group_count == node.in_features == node.out_features, where
    elif isinstance(node, nnx.Linear):
      assert (node.in_features, node.out_features) == node.kernel[...].shape, where
    elif isinstance(node, nnx.BatchNorm):
      for name in ("scale", "bias", "mean", "var"):
        assert getattr(node, name)[...].shape == (node.num_features,), where


# ----------------------------------------------------------------------------------------
# The zoo.

ZOO = [
    ("digits_cnn", (2, 8, 8, 1)),
    ("mnist1d_cnn", (2, 40, 1)),  # Conv1D: kernels (5, in, out), a flatten into the head
    # ResNet-20 and ResNet-110 are ResNet-56's class with fewer or more blocks: skipped.
    ("resnet56", (2, 32, 32, 3)),
    ("vgg16_bn", (2, 32, 32, 3)),
    ("mobilenet_v2", (2, 32, 32, 3)),
    ("resnet50", (2, 64, 64, 3)),  # fully convolutional: a small input keeps it fast
]


@pytest.mark.parametrize("name,shape", ZOO)
def test_zoo_surgery_is_exact(name, shape):
  seed = ZOO.index((name, shape))
  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=10, rngs=nnx.Rngs(0)))
  model = _randomized(model, seed)
  model.eval()
  x = _device(np.random.default_rng(seed).standard_normal(shape))
  spec = dpm_jax.trace_groups(model, x[:1])
  keep = _random_keep(spec, seed)
  before, graphdef_before = _pure(model), nnx.graphdef(model)
  depthwise = {p for p, n in nnx.iter_graph(model)
               if isinstance(n, nnx.Conv) and n.feature_group_count == n.in_features > 1}

  small = dpm_jax.remove_channels(model, spec, keep)

  # The input module is unchanged.
  assert nnx.graphdef(model) == graphdef_before
  _assert_flat_equal(_flat(_pure(model)), _flat(before))
  # Arrays: every member's removed indices are gone, nothing else changed.
  _assert_flat_equal(_flat(_pure(small)), _sliced_by_hand(before, spec, keep))
  _assert_feature_counts(small, depthwise)
  # The architecture read back from the arrays rebuilds the same module, attributes and all.
  rebuilt = nnx.eval_shape(lambda: models.from_arch(small.arch(), rngs=nnx.Rngs(1)))
  rebuilt.eval()
  assert nnx.graphdef(rebuilt) == nnx.graphdef(small)
  assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(rebuilt))) == jax.tree.map(
      jnp.shape, nnx.to_pure_dict(nnx.state(small)))

  # Outputs: masked (producers of removed channels zeroed) == surgically smaller.
  state = nnx.to_pure_dict(nnx.state(model))
  forward = _forward(model, x)
  masked = forward(dpm_jax.zero_channels(state, spec, keep), x)
  pruned = _forward(small, x)(nnx.to_pure_dict(nnx.state(small)), x)
  assert pruned.shape == masked.shape == (shape[0], 10)
  np.testing.assert_allclose(pruned, masked, rtol=0, atol=TOLERANCE)
  # The removed channels mattered: the test would see a surgery that mixed channels up.
  assert float(jnp.abs(forward(state, x) - masked).max()) > 1e-3


class ConcatNet(nnx.Module):
  """DenseNet-style: C reads concat([x, A(x), B(x)]); the input's channels stay."""

  def __init__(self, rngs: nnx.Rngs):
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn_a = nnx.BatchNorm(4, rngs=rngs)
    self.b = nnx.Conv(3, 5, (1, 1), use_bias=False, rngs=rngs)
    self.c = nnx.Conv(12, 6, (3, 3), rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    h = jnp.concatenate([x, jnp.tanh(self.bn_a(self.a(x))), jnp.tanh(self.b(x))], axis=-1)
    return self.head(jnp.mean(jnp.tanh(self.c(h)), axis=(1, 2)))


def test_concat_surgery():
  model = _randomized(nnx.eval_shape(lambda: ConcatNet(nnx.Rngs(0))), 7)
  model.eval()
  x = _device(np.random.default_rng(7).standard_normal((2, 6, 6, 3)))
  spec = dpm_jax.trace_groups(model, x[:1])
  assert spec.sizes == (4, 5, 6)
  keep = [np.array([1, 0, 1, 0], bool), np.array([0, 1, 1, 0, 1], bool),
          np.array([1, 1, 0, 0, 1, 0], bool)]
  small = dpm_jax.remove_channels(model, spec, keep)
  assert small.c.kernel_shape == (3, 3, 3 + 2 + 3, 3) and small.c.in_features == 8
  assert small.bn_a.num_features == 2 and small.head.in_features == 3
  kernel = np.asarray(model.c.kernel[...])
  np.testing.assert_array_equal(small.c.kernel[...],
                                kernel[:, :, [0, 1, 2, 3, 5, 8, 9, 11]][..., [0, 1, 4]])
  masked_state = dpm_jax.zero_channels(nnx.to_pure_dict(nnx.state(model)), spec, keep)
  masked = _forward(model, x)(masked_state, x)
  pruned = _forward(small, x)(nnx.to_pure_dict(nnx.state(small)), x)
  np.testing.assert_allclose(pruned, masked, rtol=0, atol=TOLERANCE)


class DepthwiseNet(nnx.Module):
  """A depthwise conv with channel multiplier 2 (output 2c and 2c + 1 read channel c), on
  images (``spatial_dims=2``) or sequences (1)."""

  def __init__(self, rngs: nnx.Rngs, spatial_dims: int = 2):
    self.expand = nnx.Conv(2, 4, (1,) * spatial_dims, rngs=rngs)
    self.depthwise = nnx.Conv(4, 8, (3,) * spatial_dims, feature_group_count=4, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)  # RNG state in the model: left alone
    self.head = nnx.Linear(8, 3, rngs=rngs)
    self.spatial_axes = tuple(range(1, spatial_dims + 1))

  def __call__(self, x):
    h = jnp.tanh(self.bn(self.depthwise(jnp.tanh(self.expand(x)))))
    return self.head(self.dropout(jnp.mean(h, axis=self.spatial_axes)))


@pytest.mark.parametrize("spatial_dims", [1, 2])
def test_depthwise_multiplier_surgery(spatial_dims):
  model = _randomized(nnx.eval_shape(lambda: DepthwiseNet(nnx.Rngs(0), spatial_dims)), 8)
  model.eval()
  x = _device(np.random.default_rng(8).standard_normal((2,) + (5,) * spatial_dims + (2,)))
  spec = dpm_jax.trace_groups(model, x[:1])
  assert spec.sizes == (4,)
  (dw,) = [m for m in spec.groups[0].members if m.path == ("depthwise", "kernel")]
  assert (dw.axis, dw.length, dw.channel_stride, dw.repeat, dw.repeat_stride) == (
      spatial_dims + 1, 4, 2, 2, 1)
  keep = [np.array([1, 0, 1, 1], bool)]
  small = dpm_jax.remove_channels(model, spec, keep)
  assert small.depthwise.kernel_shape == (3,) * spatial_dims + (1, 6)
  assert (small.depthwise.in_features, small.depthwise.out_features,
          small.depthwise.feature_group_count) == (3, 6, 3)
  assert small.bn.num_features == 6 and small.head.in_features == 6
  np.testing.assert_array_equal(small.depthwise.kernel[...],
                                np.asarray(model.depthwise.kernel[...])[..., [0, 1, 4, 5, 6, 7]])
  masked_state = dpm_jax.zero_channels(nnx.to_pure_dict(nnx.state(model)), spec, keep)
  masked = _forward(model, x)(masked_state, x)
  pruned = _forward(small, x)(nnx.to_pure_dict(nnx.state(small)), x)
  np.testing.assert_allclose(pruned, masked, rtol=0, atol=TOLERANCE)
  positions = 5 ** spatial_dims
  assert dpm_jax.count_flops(small, x[:1]).macs == dpm_jax.spec_cost(spec, keep).macs == (
      2 * 3 * positions + 3 ** spatial_dims * 6 * positions + 6 * 3)


# ----------------------------------------------------------------------------------------
# A property: random small architectures as pure functions.


def _conv(x, kernel, groups=1):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups)


def _affine(y, p):
  """Optional conv bias, then optional eval-mode BatchNorm."""
  if "bias" in p:
    y = y + p["bias"]
  if "bn" in p:
    bn = p["bn"]
    y = (y - bn["mean"]) * jax.lax.rsqrt(bn["var"] + 1e-5) * bn["scale"] + bn["bias"]
  return y


def _apply(arch: dict, v: dict, x: jax.Array) -> jax.Array:
  """The network ``arch`` describes; every width is read from the arrays."""
  h = x
  for i, block in enumerate(arch["blocks"]):
    p, kind = v[f"block{i}"], block["kind"]
    if kind == "conv":
      h = jnp.tanh(_affine(_conv(h, p["kernel"]), p))
    elif kind == "residual":
      h = jnp.tanh(h + _affine(_conv(h, p["kernel"]), p))
    elif kind == "concat":
      a = jnp.tanh(_affine(_conv(h, p["kernel"]), p))
      b = jnp.tanh(_conv(h, p["other"]))
      h = jnp.concatenate([a, b], axis=-1)
    elif kind == "depthwise":
      h = jnp.tanh(_affine(_conv(h, p["kernel"], groups=h.shape[-1]), p))
    elif kind == "glu":
      a, b = jnp.split(_affine(_conv(h, p["kernel"]), p), 2, axis=-1)
      h = a * jax.nn.sigmoid(b)
  if arch["head"] == "mean":
    h = jnp.mean(h, axis=(1, 2))
  elif arch["head"] == "flatten":
    h = h.reshape(h.shape[0], -1)
  else:  # NCHW flatten: a channel owns a contiguous block of rows
    h = h.transpose(0, 3, 1, 2).reshape(h.shape[0], -1)
  if "hidden" in v:
    h = jnp.tanh(h @ v["hidden"]["kernel"] + v["hidden"]["bias"])
  return h @ v["out"]["kernel"] + v["out"]["bias"]


def _init(arch: dict, seed: int) -> dict:
  rng = np.random.default_rng(seed)

  def arr(name, *shape):
    return _device(_random_value(rng, name, shape))

  def conv_block(cin, cout, ksize, bn, bias, groups=1):
    p = {"kernel": arr("kernel", ksize, ksize, cin // groups, cout)}
    if bias:
      p["bias"] = arr("bias", cout)
    if bn:
      p["bn"] = {name: arr(name, cout) for name in ("mean", "var", "scale", "bias")}
    return p

  v, width = {}, arch["in_channels"]
  for i, b in enumerate(arch["blocks"]):
    kind, w, k = b["kind"], b["width"], b["ksize"]
    if kind == "conv":
      v[f"block{i}"] = conv_block(width, w, k, b["bn"], b["bias"])
      width = w
    elif kind == "residual":
      v[f"block{i}"] = conv_block(width, width, k, b["bn"], b["bias"])
    elif kind == "concat":
      v[f"block{i}"] = conv_block(width, w, k, b["bn"], b["bias"])
      v[f"block{i}"]["other"] = arr("kernel", 1, 1, width, b["width2"])
      width = w + b["width2"]
    elif kind == "depthwise":
      v[f"block{i}"] = conv_block(width, width, k, b["bn"], b["bias"], groups=width)
    elif kind == "glu":
      v[f"block{i}"] = conv_block(width, 2 * w, k, b["bn"], b["bias"])
      width = w
  features = width if arch["head"] == "mean" else width * arch["size"] ** 2
  if arch["hidden"]:
    v["hidden"] = {"kernel": arr("kernel", features, arch["hidden"]),
                   "bias": arr("bias", arch["hidden"])}
    features = arch["hidden"]
  v["out"] = {"kernel": arr("kernel", features, 3), "bias": arr("bias", 3)}
  return v


_block = st.fixed_dictionaries({
    "kind": st.sampled_from(["conv", "residual", "concat", "depthwise", "glu"]),
    "width": st.integers(2, 8),
    "width2": st.integers(2, 8),
    "ksize": st.sampled_from([1, 3]),
    "bn": st.booleans(),
    "bias": st.booleans(),
})
_architectures = st.fixed_dictionaries({
    "in_channels": st.integers(1, 3),
    "size": st.sampled_from([2, 3]),
    "blocks": st.lists(_block, min_size=1, max_size=4),
    "head": st.sampled_from(["mean", "flatten", "flatten_nchw"]),
    "hidden": st.sampled_from([0, 2, 5, 8]),
})


@hypothesis.settings(max_examples=15, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(arch=_architectures, seed=st.integers(0, 2**16))
def test_random_architectures(arch, seed):
  v = _init(arch, seed)
  x = _device(np.random.default_rng(seed).standard_normal(
      (2, arch["size"], arch["size"], arch["in_channels"])))
  apply = functools.partial(_apply, arch)
  spec = dpm_jax.trace_groups_fn(apply, v, x[:1])
  hypothesis.assume(spec.groups)
  keep = _random_keep(spec, seed)
  small = dpm_jax.remove_channels_fn(v, spec, keep)
  _assert_flat_equal(_flat(small), _sliced_by_hand(v, spec, keep))
  masked = dpm_jax.zero_channels(v, spec, keep)
  pruned_out = jax.jit(apply).lower(small, x).compile(FAST_COMPILE)(small, x)
  masked_out = jax.jit(apply).lower(masked, x).compile(FAST_COMPILE)(masked, x)
  np.testing.assert_allclose(pruned_out, masked_out, rtol=0, atol=TOLERANCE)
  # The counts of the pruned network, predicted from the dense trace.
  predicted, measured = dpm_jax.spec_cost(spec, keep), dpm_jax.count_flops_fn(apply, small, x[:1])
  assert (predicted.macs, predicted.params) == (measured.macs, measured.params)


# ----------------------------------------------------------------------------------------
# Linen and the pure-tree functions.


class LinenNet(linen.Module):
  widths: tuple[int, ...] = (4, 6)
  hidden: int = 5

  @linen.compact
  def __call__(self, x):
    for width in self.widths:
      x = linen.BatchNorm(use_running_average=True)(linen.Conv(width, (3, 3))(x))
      x = jnp.tanh(x)
    x = jnp.tanh(linen.Dense(self.hidden)(jnp.mean(x, axis=(1, 2))))
    return linen.Dense(3)(x)


class NNXNet(nnx.Module):
  """`LinenNet` in NNX."""

  def __init__(self, rngs: nnx.Rngs, widths=(4, 6), hidden=5, in_features=2):
    ins = (in_features, *widths[:-1])
    self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs) for i, o in zip(ins, widths)])
    self.bns = nnx.List([nnx.BatchNorm(o, rngs=rngs) for o in widths])
    self.dense = nnx.Linear(widths[-1], hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, 3, rngs=rngs)

  def __call__(self, x):
    for conv, bn in zip(self.convs, self.bns):
      x = jnp.tanh(bn(conv(x)))
    return self.head(jnp.tanh(self.dense(jnp.mean(x, axis=(1, 2)))))


def _nnx_path(linen_path: tuple[str, ...]) -> tuple[str, ...]:
  """``('params', 'Conv_1', 'kernel')`` -> ``('convs', '1', 'kernel')``, and so on."""
  _, layer, leaf = linen_path
  kind, index = layer.split("_")
  if kind == "Dense":
    return ("dense" if index == "0" else "head", leaf)
  return ("convs" if kind == "Conv" else "bns", index, leaf)


def test_linen_matches_nnx():
  x = _device(np.random.default_rng(0).standard_normal((2, 6, 6, 2)))
  rng = np.random.default_rng(1)
  abstract = jax.eval_shape(LinenNet().init, jax.random.key(0), x)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, s: _device(_random_value(rng, path_str(p)[-1], s.shape), s.dtype), abstract)
  spec = dpm_jax.trace_groups_fn(lambda v, x: LinenNet().apply(v, x), variables, x[:1])
  keep = [np.array([1, 0, 0, 1], bool), np.array([0, 1, 1, 0, 1, 0], bool),
          np.array([1, 1, 0, 1, 0], bool)]
  sliced = dpm_jax.remove_channels_fn(variables, spec, keep)
  _assert_flat_equal(_flat(sliced), _sliced_by_hand(variables, spec, keep))
  # Collection by collection, with the prefix the spec's paths start with.
  for collection in ("params", "batch_stats"):
    part = dpm_jax.remove_channels_fn(variables[collection], spec, keep, prefix=(collection,))
    _assert_flat_equal(_flat(part), _flat(sliced[collection]))
  with pytest.raises(ValueError, match="prefix="):
    dpm_jax.remove_channels_fn(variables["params"], spec, keep)
  # The pruned Linen module, rebuilt with the kept widths, computes the masked network.
  masked = dpm_jax.zero_channels(variables, spec, keep)
  small_module = LinenNet(widths=(2, 3), hidden=3)
  pruned_out = small_module.apply(sliced, x)
  np.testing.assert_allclose(pruned_out, LinenNet().apply(masked, x), rtol=0, atol=TOLERANCE)

  # The same network in NNX, same weights: the same groups and the same sliced arrays.
  model = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  by_nnx_path = {_nnx_path(p): a for p, a in _flat(variables).items()}
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
      lambda p, _: by_nnx_path[path_str(p)], nnx.to_pure_dict(state)))
  model = nnx.merge(graphdef, state)
  model.eval()
  nnx_spec = dpm_jax.trace_groups(model, x[:1])
  assert [[(_nnx_path(m.path), m.axis, m.role) for m in g.members] for g in spec.groups] == [
      [(m.path, m.axis, m.role) for m in g.members] for g in nnx_spec.groups]
  small = dpm_jax.remove_channels(model, nnx_spec, keep)
  _assert_flat_equal(_flat(_pure(small)),
                     {_nnx_path(p): np.asarray(a) for p, a in _flat(sliced).items()})
  np.testing.assert_allclose(small(x), pruned_out, rtol=0, atol=TOLERANCE)


# ----------------------------------------------------------------------------------------
# Optimizer states.

OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    # Nesting: the params-shaped trees sit deeper.
    "chain_multisteps": lambda: optax.MultiSteps(
        optax.chain(optax.add_decayed_weights(1e-4),
                    optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)), 2),
}


def _train_step(graphdef, tx):
  def loss_fn(params, stats, x, y):
    logits = nnx.merge(graphdef, params, stats)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, stats, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@pytest.mark.parametrize("optimizer,as_state", [
    ("sgd_momentum", False), ("adam", False), ("chain_multisteps", False),
    # tx.init of an nnx.State: the moments hold nnx.Variables.
    ("adam", True)])
def test_optimizer_state_surgery(optimizer, as_state):
  tx = OPTIMIZERS[optimizer]()
  model = nnx.eval_shape(lambda: models.create_model(
      "digits_cnn", num_classes=3, rngs=nnx.Rngs(0), conv_widths=(4, 6), dense_widths=(5,)))
  model = _randomized(model, 3)
  model.eval()
  rng = np.random.default_rng(3)
  x = _device(rng.standard_normal((4, 8, 8, 1)))
  y = _device(rng.integers(0, 3, 4), np.int32)
  spec = dpm_jax.trace_groups(model, x[:1])
  keep = [np.array([1, 0, 1, 1], bool), np.array([0, 1, 1, 0, 0, 1], bool),
          np.array([1, 0, 0, 1, 1], bool)]

  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  if not as_state:  # the functional style: pure dicts
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
  opt_state = tx.init(params)
  step = _train_step(graphdef, tx)
  for _ in range(3):  # real steps: non-zero moments (MultiSteps: one applied update)
    params, opt_state, _ = step(params, stats, opt_state, x, y)
  assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(opt_state) if np.ndim(leaf) > 1)

  sliced = dpm_jax.remove_channels_opt_state(tx, opt_state, spec, keep)
  # Every params-shaped subtree is sliced (optax knows where they are), nothing else.
  paths = jax.tree_util.tree_map_with_path(lambda p, _: "/".join(_spec_path(p)), params)
  expected = optax.tree_utils.tree_map_params(
      tx, lambda x, path: _slice_by_hand(x, tuple(path.split("/")), spec, keep), opt_state,
      paths)
  assert jax.tree.structure(sliced) == jax.tree.structure(expected)
  for (path, actual), want in zip(jax.tree_util.tree_flatten_with_path(sliced)[0],
                                  jax.tree.leaves(expected)):
    np.testing.assert_array_equal(actual, want, err_msg=jax.tree_util.keystr(path))
  # By hand: a conv kernel's moments keep exactly the kept input and output channels.
  conv1 = ("convs", "1", "conv", "kernel")
  full = [x for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
          if _spec_path(p)[-4:] == conv1]
  cut = [x for p, x in jax.tree_util.tree_flatten_with_path(sliced)[0]
         if _spec_path(p)[-4:] == conv1]
  assert len(full) == len(cut) == {"sgd_momentum": 1, "adam": 2, "chain_multisteps": 3}[optimizer]
  for f, c in zip(full, cut):
    np.testing.assert_array_equal(c, np.asarray(f)[:, :, [0, 2, 3]][..., [1, 2, 5]])

  # Fine-tune the smaller model with the sliced state.
  small = dpm_jax.remove_channels(nnx.merge(graphdef, params, stats), spec, keep)
  small_graphdef, small_params, small_stats = nnx.split(small, nnx.Param, nnx.BatchStat)
  if not as_state:
    small_params, small_stats = nnx.to_pure_dict(small_params), nnx.to_pure_dict(small_stats)
  assert jax.tree.map(jnp.shape, small_params) == jax.tree.map(
      jnp.shape, dpm_jax.remove_channels_fn(params, spec, keep))
  small_step = _train_step(small_graphdef, tx)
  for _ in range(2):
    small_params, sliced, loss = small_step(small_params, small_stats, sliced, x, y)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(sliced) == jax.tree.structure(expected)


# ----------------------------------------------------------------------------------------
# Bad input.


@functools.cache
def _zeros_model(name: str, **kwargs) -> nnx.Module:
  model = nnx.eval_shape(lambda: models.create_model(name, num_classes=10, rngs=nnx.Rngs(0),
                                                     **kwargs))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda s: _device(np.zeros(s.shape), s.dtype),
                                               nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def test_bad_keep_masks():
  model = _zeros_model("digits_cnn", conv_widths=(4, 6), dense_widths=(5,))
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 8, 8, 1)))
  good = [np.ones(4, bool), np.ones(6, bool), np.ones(5, bool)]
  cases = [
      (good[:2], r"Expected 3 keep masks \(one per group of the spec\), got 2"),
      ([good[0], np.ones(5, bool), good[2]],
       r"Keep mask 1 \(group convs/1/conv/kernel\) has shape \(5,\); the group has 6 channels"),
      ([good[0], np.ones((6, 1), bool), good[2]], r"must have shape \(6,\)"),
      ([good[0], good[1], np.zeros(5, bool)],
       r"Keep mask 2 \(group dense/0/kernel\) keeps no channel"),
      # Indices or 0/1 integers are not masks: np.arange(n) would drop channel 0.
      ([np.arange(4), good[1], good[2]],
       r"Keep mask 0 \(group convs/0/conv/kernel\) has dtype int64; keep masks are boolean"),
      ([good[0], good[1], np.ones(5, int)], r"Keep mask 2 .* has dtype int64"),
  ]
  pure = nnx.to_pure_dict(nnx.state(model))
  for keep, message in cases:
    for fn in (lambda k: dpm_jax.remove_channels(model, spec, k),
               lambda k: dpm_jax.remove_channels_fn(pure, spec, k),
               lambda k: dpm_jax.zero_channels(pure, spec, k),
               lambda k: dpm_jax.spec_cost(spec, k)):
      with pytest.raises(ValueError, match=message):
        fn(keep)
  small = dpm_jax.remove_channels(model, spec, [np.array([True, False, True, False]),
                                                good[1], good[2]])
  assert small.convs[0].conv.out_features == 2


def test_spec_from_another_model():
  narrow = _zeros_model("digits_cnn", conv_widths=(4, 6), dense_widths=(5,))
  wide = _zeros_model("digits_cnn", conv_widths=(4, 8), dense_widths=(5,))
  spec = dpm_jax.trace_groups(narrow, jnp.zeros((1, 8, 8, 1)))
  keep = [np.arange(n) % 2 == 0 for n in spec.sizes]
  message = (r"Variable convs/1/\S+ has shape \((3, 3, 4, )?8,?\) but the spec was traced with "
             r"shape \((3, 3, 4, )?6,?\): the spec does not match these variables")
  with pytest.raises(ValueError, match=message):
    dpm_jax.remove_channels(wide, spec, keep)
  with pytest.raises(ValueError, match=message):
    dpm_jax.remove_channels_fn(nnx.to_pure_dict(nnx.state(wide)), spec, keep)


def test_spec_from_a_shallower_or_deeper_model():
  # ResNet-20's variables are ResNet-56's first blocks with the same shapes: only the
  # paths tell the specs apart. Slicing ResNet-56 with ResNet-20's spec would leave blocks
  # 3-8 of every stage unsliced (a broken model), so it must fail.
  x = jnp.zeros((1, 32, 32, 3))
  r20, r56 = _zeros_model("resnet20"), _zeros_model("resnet56")
  spec20, spec56 = dpm_jax.trace_groups(r20, x), dpm_jax.trace_groups(r56, x)
  with pytest.raises(ValueError, match="stages/0/3/.* is not among the variables the spec"):
    dpm_jax.remove_channels(r56, spec20, _random_keep(spec20, 0))
  with pytest.raises(ValueError, match="is not among the variables the spec"):
    dpm_jax.remove_channels_fn(nnx.to_pure_dict(nnx.state(r56)), spec20, _random_keep(spec20, 0))
  with pytest.raises(ValueError, match="variables this model does not have.*stages/0/3/"):
    dpm_jax.remove_channels(r20, spec56, _random_keep(spec56, 0))


def test_unresizable_module():
  class Scale(nnx.Module):

    def __init__(self, n):
      self.w = nnx.Param(jnp.ones(n))

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.scale = Scale(4)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.dense(x) * self.scale.w[...]))

  model = Net(nnx.Rngs(0))
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 3)))
  keep = [np.array([1, 0, 1, 1], bool)]
  with pytest.raises(TypeError, match="Cannot update the feature counts of Scale at scale"):
    dpm_jax.remove_channels(model, spec, keep)
  dpm_jax.register_module_resizer(Scale, lambda module: None)
  try:
    small = dpm_jax.remove_channels(model, spec, keep)
  finally:
    dpm_jax.surgery._RESIZERS.pop(Scale)
  assert small.scale.w[...].shape == (3,) and small.dense.out_features == 3


def test_surgery_compiles_nothing(caplog):
  # Slicing concrete arrays happens on the host: a new keep configuration (new shapes) must
  # not cost an XLA compile per sliced array.
  model = _zeros_model("digits_cnn", conv_widths=(5, 7), dense_widths=(9,))
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 8, 8, 1)))
  keep = [np.arange(n) % 3 == 1 for n in spec.sizes]
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    small = dpm_jax.remove_channels(model, spec, keep)
    dpm_jax.zero_channels(nnx.to_pure_dict(nnx.state(model)), spec, keep)
    dpm_jax.remove_channels_opt_state(optax.sgd(0.1, momentum=0.9), opt_state, spec, keep)
  assert small.convs[1].conv.kernel_shape == (3, 3, 2, 2)
  compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiles, compiles
