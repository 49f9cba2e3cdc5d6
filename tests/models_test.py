"""Tests for the model zoo: shapes, parameter counts, and architectures as data.

Models are built abstractly (`nnx.eval_shape`) wherever no numbers are needed: on CPU every
new kernel shape costs an XLA compile of the random initialiser, so eager construction of
the big models takes seconds. Only the digits CNN is materialised.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpm_jax import models

INPUT_SHAPES = {
    "digits_cnn": (2, 8, 8, 1),
    "digits_vit": (2, 8, 8, 1),
    "mnist1d_cnn": (2, 40, 1),
    "resnet50": (2, 64, 64, 3),  # small spatial size; the network is fully convolutional
    "decoder_lm": (2, 8),  # tokens
}
CIFAR_INPUT_SHAPE = (2, 32, 32, 3)
NUM_CLASSES = 10
# Models that read tokens and give logits per position (num_classes is the vocabulary).
TOKEN_MODELS = ("decoder_lm",)
# Keys of arch() that are not widths, left alone when making pruned-looking widths.
NON_WIDTH_KEYS = ("name", "num_classes", "in_channels", "image_size", "length", "head_dim",
                  "patch_size", "attention", "queries_per_kv", "max_length")


def _input_shape(name: str) -> tuple[int, ...]:
  return INPUT_SHAPES.get(name, CIFAR_INPUT_SHAPE)


def _input(name: str) -> jax.ShapeDtypeStruct:
  dtype = jnp.int32 if name in TOKEN_MODELS else jnp.float32
  return jax.ShapeDtypeStruct(_input_shape(name), dtype)


def _output_shape(name: str) -> tuple[int, ...]:
  shape = _input_shape(name)
  return (*shape, NUM_CLASSES) if name in TOKEN_MODELS else (shape[0], NUM_CLASSES)


def _abstract_model(name: str, num_classes: int = NUM_CLASSES, **kwargs: Any) -> nnx.Module:
  return nnx.eval_shape(
      lambda: models.create_model(
          name, num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs
      )
  )


def _abstract_forward(model: nnx.Module, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  return nnx.eval_shape(lambda m, x: m(x), model, x)


@functools.cache
def _default_arch_json(name: str) -> str:
  return json.dumps(models.model_arch(_abstract_model(name)))


def _default_arch(name: str) -> dict[str, Any]:
  """A fresh copy of the default architecture of ``name``."""
  return json.loads(_default_arch_json(name))


@functools.cache
def _cached_digits_model() -> models.DigitsCNN:
  return models.create_model("digits_cnn", num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))


def _digits_model() -> models.DigitsCNN:
  """A fresh copy of a digits CNN with real weights; tests may mutate it."""
  return nnx.clone(_cached_digits_model())


def _param_count(model: nnx.Module) -> int:
  params = nnx.state(model, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _assert_same_state_shapes(model: nnx.Module, other: nnx.Module) -> None:
  """Same state tree and leaf shapes; a mismatch names the offending leaf."""
  state, other_state = nnx.state(model), nnx.state(other)
  assert jax.tree.structure(state) == jax.tree.structure(other_state)
  for (path, leaf), other_leaf in zip(
      jax.tree.leaves_with_path(state), jax.tree.leaves(other_state)
  ):
    assert leaf.shape == other_leaf.shape, (
        f"{jax.tree_util.keystr(path)}: {leaf.shape} != {other_leaf.shape}"
    )


def _pruned_arch(name: str, seed: int = 0) -> dict[str, Any]:
  """The default arch of ``name`` with every width replaced by a random smaller one."""
  rng = np.random.default_rng(seed)
  arch = _default_arch(name)
  for key, widths in arch.items():
    if key not in NON_WIDTH_KEYS:
      arch[key] = jax.tree.map(lambda w: int(rng.integers(1, w + 1)), widths)
  if name == "mobilenet_v2":
    # The first block has no expand conv: its depthwise conv runs on the stem's output.
    arch["hidden_widths"][0][0] = arch["stem_width"]
  return arch


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_and_from_arch(name: str):
  model = _abstract_model(name)
  for mode in ("train", "eval"):
    getattr(model, mode)()
    logits = _abstract_forward(model, _input(name))
    assert (logits.shape, logits.dtype) == (_output_shape(name), jnp.float32), mode

  arch = models.model_arch(model)
  assert (arch["name"], arch["num_classes"]) == (name, NUM_CLASSES)
  assert json.loads(json.dumps(arch)) == arch
  rebuilt = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(1)))
  _assert_same_state_shapes(model, rebuilt)
  model.train()  # the mode is part of the graphdef; a fresh model trains
  assert nnx.graphdef(rebuilt) == nnx.graphdef(model)


# ResNet-56/110 are ResNet-20's class with more blocks.
@pytest.mark.parametrize(
    "name", ["digits_cnn", "mnist1d_cnn", "resnet20", "vgg16_bn", "mobilenet_v2", "resnet50",
             "digits_vit", "decoder_lm"]
)
def test_pruned_widths(name: str):
  arch = _pruned_arch(name)
  assert arch != _default_arch(name)
  model = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(0)))
  assert models.model_arch(model) == arch
  model.eval()  # train mode is covered above; tracing its BatchNorm updates is slower
  assert _abstract_forward(model, _input(name)).shape == _output_shape(name)


@pytest.mark.parametrize("attention", ["einsum", "jax", "flax"])
def test_transformer_attention_forms_keep_their_arch(attention: str):
  for name, widths in (("digits_vit", {"num_heads": [2, 3]}),
                       ("decoder_lm", {"num_kv_heads": [1, 2], "queries_per_kv": 2})):
    model = _abstract_model(name, attention=attention, **widths)
    arch = models.model_arch(model)
    assert arch["attention"] == attention and {k: arch[k] for k in widths} == widths
    rebuilt = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(1)))
    assert nnx.graphdef(rebuilt) == nnx.graphdef(model)
    assert _abstract_forward(model, _input(name)).shape == _output_shape(name)


def test_transformer_bad_widths():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    models.transformer.Attention(8, num_heads=3, head_dim=4, num_kv_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention must be one of"):
    _abstract_model("digits_vit", attention="flash")
  with pytest.raises(ValueError, match="mlp_widths needs 2 entries"):
    _abstract_model("decoder_lm", mlp_widths=[8])


@pytest.mark.parametrize(
    "name, num_classes, expected, exact",
    [
        ("mnist1d_cnn", 10, 34_410, 34_410),
        ("resnet56", 10, 0.85e6, None),
        ("vgg16_bn", 10, 15.0e6, None),
        ("resnet50", 1000, 25.6e6, 25_557_032),  # exactly torchvision's resnet50
    ],
)
def test_param_count(name: str, num_classes: int, expected: float, exact: int | None):
  count = _param_count(_abstract_model(name, num_classes))
  assert count == pytest.approx(expected, rel=0.02)
  if exact is not None:
    assert count == exact


# Hand-made surgery in numpy (no XLA compile per new shape).
def _slice(variable: nnx.Variable, index: Any) -> None:
  variable.set_value(jnp.asarray(np.asarray(variable[...])[index]))


def _keep_outputs(layer: nnx.Conv | nnx.Linear, keep: np.ndarray) -> None:
  _slice(layer.kernel, (..., keep))
  layer.out_features = len(keep)
  if isinstance(layer, nnx.Conv):
    layer.kernel_shape = layer.kernel.shape
  if layer.bias is not None:
    _slice(layer.bias, keep)


def _keep_inputs(layer: nnx.Conv | nnx.Linear, keep: np.ndarray) -> None:
  _slice(layer.kernel, (..., keep, slice(None)))
  layer.in_features = len(keep)
  if isinstance(layer, nnx.Conv):
    layer.kernel_shape = layer.kernel.shape


def _keep_bn(bn: nnx.BatchNorm, keep: np.ndarray) -> None:
  for variable in (bn.scale, bn.bias, bn.mean, bn.var):
    _slice(variable, keep)
  bn.num_features = len(keep)


def test_arch_reads_current_arrays():
  """Slicing channels out by hand, as surgery does, changes what arch() reports."""
  model = _digits_model()
  first, second = model.convs
  keep_first = np.arange(0, 32, 2)  # 16 of 32
  _keep_outputs(first.conv, keep_first)
  _keep_bn(first.bn, keep_first)
  _keep_inputs(second.conv, keep_first)
  keep_second = np.arange(0, 64, 4)  # 16 of 64
  _keep_outputs(second.conv, keep_second)
  _keep_bn(second.bn, keep_second)
  # After the NHWC flatten, channel c of the 4x4x64 map is rows c, c + 64, ... of dense.
  dense = model.dense[0]
  kernel = np.asarray(dense.kernel[...]).reshape(4, 4, 64, -1)[:, :, keep_second]
  dense.kernel.set_value(jnp.asarray(kernel.reshape(-1, kernel.shape[-1])))
  dense.in_features = dense.kernel.shape[0]
  keep_hidden = np.arange(100)
  _keep_outputs(dense, keep_hidden)
  _keep_inputs(model.head, keep_hidden)

  arch = models.model_arch(model)
  assert arch["conv_widths"] == [16, 16]
  assert arch["dense_widths"] == [100]
  rebuilt = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(1)))
  _assert_same_state_shapes(model, rebuilt)
  assert nnx.graphdef(rebuilt) == nnx.graphdef(model)
  x = jax.random.normal(jax.random.key(0), _input_shape("digits_cnn"))
  assert nnx.jit(lambda m, x: m(x))(model, x).shape == (x.shape[0], NUM_CLASSES)


def test_train_and_eval_mode():
  model = _digits_model()
  bn = model.convs[0].bn
  assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
  assert not bn.use_running_average  # a fresh model trains
  forward = nnx.jit(lambda m, x: m(x))
  x = jax.random.normal(jax.random.key(0), _input_shape("digits_cnn")) + 3.0
  train_logits = forward(model, x)
  assert float(jnp.abs(bn.mean[...]).max()) > 0.0  # batch statistics were tracked
  model.eval()
  mean = bn.mean[...]
  eval_logits = forward(model, x)
  np.testing.assert_array_equal(bn.mean[...], mean)
  assert train_logits.shape == eval_logits.shape == (x.shape[0], NUM_CLASSES)
  assert bool(jnp.all(jnp.isfinite(eval_logits)))
  assert not np.allclose(train_logits, eval_logits)


def _assert_kaiming_fan_out(kernel: jax.Array, fan_out: int) -> None:
  """``kernel`` looks drawn from an untruncated N(0, 2 / fan_out)."""
  kernel = np.asarray(kernel)
  std = math.sqrt(2.0 / fan_out)
  assert float(kernel.std()) == pytest.approx(std, rel=0.05)
  # Untruncated: about 1.2% beyond 2.5 standard deviations. A truncated normal (flax's
  # lecun_normal default) rescaled to this variance never goes past 2.27.
  assert float(np.mean(np.abs(kernel) > 2.5 * std)) > 0.005


def test_conv_init_is_kaiming_fan_out():
  conv = _digits_model().convs[1].conv
  assert conv.bias is None
  assert conv.kernel.shape == (3, 3, 32, 64)
  # Here 2 / fan_out equals LeCun's 1 / fan_in: the layer below tells them apart.
  _assert_kaiming_fan_out(conv.kernel[...], 3 * 3 * 64)
  # Four times more inputs than outputs: LeCun fan-in (flax's default) would give 1/4 of the
  # variance, He fan-in 1/2, LeCun fan-out 1/2, fan-avg 2/5.
  narrowing = models.ConvBN(64, 16, 3, rngs=nnx.Rngs(0)).conv
  _assert_kaiming_fan_out(narrowing.kernel[...], 3 * 3 * 16)


def test_conv1d_init_is_kaiming_fan_out():
  # 64 -> 16 channels: fan-out 5 * 16 is far from fan-in 5 * 64 (32 -> 64 would make He
  # fan-out and LeCun fan-in agree).
  conv = models.ConvBN(64, 16, 5, spatial_dims=1, rngs=nnx.Rngs(0)).conv
  assert conv.kernel.shape == (5, 64, 16)
  _assert_kaiming_fan_out(conv.kernel[...], 5 * 16)


def test_structure_does_not_follow_equal_widths():
  """Widths that happen to match add no residual and drop no projection."""
  arch = _default_arch("mobilenet_v2")
  # The first block of the 24-wide stage (stride 1) pruned to its input's width.
  arch["stage_widths"][1] = arch["stage_widths"][0]
  model = nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(0)))
  assert not model.stages[1][0].residual
  # The stem as wide as stage 1's stream: the first block keeps its projection.
  resnet50 = _abstract_model("resnet50", stem_width=_default_arch("resnet50")["stage_widths"][0])
  assert resnet50.stages[0][0].shortcut is not None


def test_unknown_name():
  with pytest.raises(ValueError, match="'resnet18'") as info:
    models.create_model("resnet18", num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
  assert ", ".join(sorted(models.MODELS)) in str(info.value)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet20", {"block_widths": [[16, 16], [32, 32], [64, 64]]}),
        ("resnet20", {"stage_widths": [16, 32]}),
        ("resnet20", {"depth": 21}),
        ("vgg16_bn", {"conv_widths": [64] * 12}),
        ("resnet50", {"block_widths": [[[64]] * 3, [[128, 128]] * 4] * 2}),
    ],
)
def test_bad_widths(name: str, kwargs: dict[str, Any]):
  with pytest.raises(ValueError):
    _abstract_model(name, **kwargs)


def test_mobilenet_first_block_hidden_width_is_stem_width():
  arch = _default_arch("mobilenet_v2")
  arch["stem_width"] = 8  # the first block has no expand conv, so 32 no longer fits
  with pytest.raises(ValueError, match="hidden width == input width"):
    nnx.eval_shape(lambda: models.from_arch(arch, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
    "module",
    ["", ".layers", ".digits_cnn", ".mnist1d_cnn", ".resnet_cifar", ".vgg", ".mobilenet_v2",
     ".resnet_imagenet", ".transformer"],
)
def test_docstring_examples(module: str):
  result = doctest.testmod(importlib.import_module("dpm_jax.models" + module))
  assert result.failed == 0
