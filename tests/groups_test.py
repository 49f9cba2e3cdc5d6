"""Tests of dpm_jax.groups: channel groups checked by hand against each architecture.

Zoo models are built abstractly (`nnx.eval_shape`): tracing only needs shapes, and on CPU a
concrete model costs an XLA compile per kernel shape. Expected groups are written from the
architecture (which conv feeds which), never read back from the tracer.
"""

from __future__ import annotations

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import models
from dpm_jax.groups import CONSUMER, PRODUCER, STATISTIC, Group, Member

NUM_CLASSES = 10
CIFAR_INPUT = (1, 32, 32, 3)


@functools.cache
def _abstract_model(name: str, **kwargs) -> nnx.Module:
  return nnx.eval_shape(
      lambda: models.create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), **kwargs)
  )


@functools.cache
def _zoo_spec(name: str, shape: tuple[int, ...] = CIFAR_INPUT) -> dpm_jax.GroupSpec:
  return dpm_jax.trace_groups(_abstract_model(name), jnp.zeros(shape))


def _members(group: Group) -> set[tuple[str, int, str]]:
  """A group as ``{(path, axis, role)}``, paths joined with '/'."""
  return {("/".join(m.path), m.axis, m.role) for m in group.members}


def _convbn_out(prefix: str, spatial_dims: int = 2) -> set[tuple[str, int, str]]:
  """The output channel of a bias-free conv + BatchNorm (`models.ConvBN`)."""
  return {
      (f"{prefix}/conv/kernel", spatial_dims + 1, PRODUCER),
      (f"{prefix}/bn/scale", 0, PRODUCER),
      (f"{prefix}/bn/bias", 0, PRODUCER),
      (f"{prefix}/bn/mean", 0, STATISTIC),
      (f"{prefix}/bn/var", 0, STATISTIC),
  }


def _conv_in(prefix: str, spatial_dims: int = 2) -> set[tuple[str, int, str]]:
  return {(f"{prefix}/conv/kernel", spatial_dims, CONSUMER)}


def _assert_plain(spec: dpm_jax.GroupSpec) -> None:
  """Every member is a contiguous whole-group slice starting at 0 (no concat, no flatten)."""
  for g in spec.groups:
    for m in g.members:
      assert (m.offset, m.length, m.channel_stride, m.repeat) == (0, g.size, 1, 1), m


def _assert_groups(spec: dpm_jax.GroupSpec, expected: list[tuple[int, set]]) -> None:
  """``spec`` has exactly the ``(size, members)`` groups of ``expected``, in any order."""
  got = sorted((g.size, sorted(_members(g))) for g in spec.groups)
  want = sorted((size, sorted(members)) for size, members in expected)
  assert len(got) == len(want), (len(got), len(want))
  for (gs, gm), (ws, wm) in zip(got, want):
    assert (
        gs == ws and gm == wm
    ), f"group mismatch: missing {sorted(set(wm) - set(gm))}, extra {sorted(set(gm) - set(wm))}"


def _group_of(spec: dpm_jax.GroupSpec, path: str, axis: int) -> int | None:
  for i, g in enumerate(spec.groups):
    if any("/".join(m.path) == path and m.axis == axis for m in g.members):
      return i
  return None


# ----------------------------------------------------------------------------------------
# The zoo.


def test_digits_cnn_groups():
  spec = _zoo_spec("digits_cnn", (1, 8, 8, 1))
  assert spec.sizes == (32, 64, 128)
  conv1, conv2, dense1 = spec.groups
  assert _members(conv1) == _convbn_out("convs/0") | _conv_in("convs/1")
  assert _members(conv2) == _convbn_out("convs/1") | {("dense/0/kernel", 0, CONSUMER)}
  assert _members(dense1) == {
      ("dense/0/kernel", 1, PRODUCER),
      ("dense/0/bias", 0, PRODUCER),
      ("head/kernel", 0, CONSUMER),
  }
  # Flatten of the 4x4x64 NHWC map: channel c owns dense rows c + 64 * r, r < 16.
  (rows,) = [m for m in conv2.members if m.path == ("dense", "0", "kernel")]
  assert rows == Member(("dense", "0", "kernel"), 0, 0, 64, CONSUMER, 1, 16, 64)
  np.testing.assert_array_equal(
      rows.indices(), np.arange(64)[:, None] + 64 * np.arange(16)[None, :]
  )
  assert sorted(rows.indices().ravel().tolist()) == list(range(1024))
  for g in (conv1, dense1):
    for m in g.members:
      assert (m.offset, m.length, m.channel_stride, m.repeat) == (0, g.size, 1, 1)
  # Forward order; the input channel and the logits are in no group.
  assert [g.name for g in spec.groups] == [
      "convs/0/conv/kernel",
      "convs/1/conv/kernel",
      "dense/0/kernel",
  ]
  assert _group_of(spec, "convs/0/conv/kernel", 2) is None
  assert _group_of(spec, "head/kernel", 1) is None
  assert _group_of(spec, "head/bias", 0) is None


def test_mnist1d_cnn_groups():
  # Kernels are (5, in, out): the output channel is axis 2, the input channel axis 1.
  spec = _zoo_spec("mnist1d_cnn", (1, 40, 1))
  assert spec.sizes == (32, 64, 64)
  conv1, conv2, conv3 = spec.groups
  assert _members(conv1) == _convbn_out("convs/0", 1) | _conv_in("convs/1", 1)
  assert _members(conv2) == _convbn_out("convs/1", 1) | _conv_in("convs/2", 1)
  assert _members(conv3) == _convbn_out("convs/2", 1) | {("head/kernel", 0, CONSUMER)}
  # Flatten of the 5x64 NLC map (40 pooled three times): channel c owns head rows
  # c + 64 * r, r < 5.
  (rows,) = [m for m in conv3.members if m.path == ("head", "kernel")]
  assert rows == Member(("head", "kernel"), 0, 0, 64, CONSUMER, 1, 5, 64)
  np.testing.assert_array_equal(
      rows.indices(), np.arange(64)[:, None] + 64 * np.arange(5)[None, :]
  )
  for g in (conv1, conv2):
    for m in g.members:
      assert (m.offset, m.length, m.channel_stride, m.repeat) == (0, g.size, 1, 1)
  # The input channel and the logits are in no group.
  assert _group_of(spec, "convs/0/conv/kernel", 1) is None
  assert _group_of(spec, "head/kernel", 1) is None
  assert _group_of(spec, "head/bias", 0) is None


def _cifar_resnet_expected(depth: int) -> list[tuple[int, set]]:
  n = (depth - 2) // 6
  widths = (16, 32, 64)
  expected = []
  for s, width in enumerate(widths):
    blocks = [f"stages/{s}/{b}" for b in range(n)]
    stream = _convbn_out("stem") if s == 0 else _convbn_out(f"{blocks[0]}/shortcut")
    for i, b in enumerate(blocks):
      stream |= _convbn_out(f"{b}/conv2")
      if s == 0 or i > 0:  # a stage's first block reads the previous stage's stream
        stream |= _conv_in(f"{b}/conv1")
      expected.append((width, _convbn_out(f"{b}/conv1") | _conv_in(f"{b}/conv2")))
    if s + 1 < len(widths):
      stream |= _conv_in(f"stages/{s + 1}/0/shortcut") | _conv_in(f"stages/{s + 1}/0/conv1")
    else:
      stream |= {("head/kernel", 0, CONSUMER)}
    expected.append((width, stream))
  return expected


@pytest.mark.parametrize("name,depth,num_groups", [("resnet20", 20, 12), ("resnet56", 56, 30)])
def test_cifar_resnet_groups(name, depth, num_groups):
  spec = _zoo_spec(name)
  assert len(spec.groups) == num_groups
  _assert_groups(spec, _cifar_resnet_expected(depth))
  _assert_plain(spec)
  # Stream groups first appear where the stage's first producer runs.
  assert spec.groups[0].name == "stem/conv/kernel"
  assert spec.groups[1].name == "stages/0/0/conv1/conv/kernel"


def test_resnet20_stream_producers():
  # The brief's reading, spelled out: the stem, every block's conv2 + bn2 and the stage's
  # projection shortcut write one residual stream.
  spec = _zoo_spec("resnet20")
  stream = spec.groups[_group_of(spec, "stages/1/0/shortcut/conv/kernel", 3)]
  assert stream.size == 32
  assert {"/".join(m.path) for m in stream.producers()} == {
      f"stages/1/{b}/conv2/{leaf}"
      for b in range(3)
      for leaf in ("conv/kernel", "bn/scale", "bn/bias")
  } | {f"stages/1/0/shortcut/{leaf}" for leaf in ("conv/kernel", "bn/scale", "bn/bias")}


def test_vgg16_bn_groups():
  spec = _zoo_spec("vgg16_bn")
  widths = models.vgg.VGG16_CONV_WIDTHS
  expected = []
  for i, width in enumerate(widths):
    nxt = _conv_in(f"convs/{i + 1}") if i + 1 < len(widths) else {("dense/0/kernel", 0, CONSUMER)}
    expected.append((width, _convbn_out(f"convs/{i}") | nxt))
  expected.append(
      (
          512,
          {
              ("dense/0/kernel", 1, PRODUCER),
              ("dense/0/bias", 0, PRODUCER),
              ("head/kernel", 0, CONSUMER),
          },
      )
  )
  assert len(spec.groups) == 14  # 13 convs + the hidden dense layer
  _assert_groups(spec, expected)
  _assert_plain(spec)  # at 32x32 the flatten sees 1x1x512: one row per channel


def test_vgg16_bn_variants():
  # Without hidden dense layers only the 13 conv groups remain; at 64x64 the last map is
  # 2x2, so each channel of the last conv owns 4 rows of the dense layer.
  plain = dpm_jax.trace_groups(_abstract_model("vgg16_bn", dense_widths=()), jnp.zeros(CIFAR_INPUT))
  assert len(plain.groups) == 13
  assert _group_of(plain, "head/kernel", 0) == 12
  big = dpm_jax.trace_groups(_abstract_model("vgg16_bn", image_size=64), jnp.zeros((1, 64, 64, 3)))
  (rows,) = [m for m in big.groups[12].members if m.path == ("dense", "0", "kernel")]
  assert (rows.axis, rows.length, rows.repeat, rows.repeat_stride) == (0, 512, 4, 512)


def test_mobilenet_v2_groups():
  spec = _zoo_spec("mobilenet_v2")
  model = _abstract_model("mobilenet_v2")
  # stem + 7 stage outputs + 16 expanded widths + the last 1x1 conv.
  assert len(spec.groups) == 25
  _assert_plain(spec)
  # The stem's channels run through the first block's depthwise conv into its project conv.
  assert _members(spec.groups[0]) == (
      _convbn_out("stem") | _convbn_out("stages/0/0/depthwise") | _conv_in("stages/0/0/project")
  )
  num_expand = 0
  for s, stage in enumerate(model.stages):
    for b, block in enumerate(stage):
      p = f"stages/{s}/{b}"
      dw = _group_of(spec, f"{p}/depthwise/conv/kernel", 3)
      assert dw is not None and _group_of(spec, f"{p}/project/conv/kernel", 2) == dw
      assert _group_of(spec, f"{p}/depthwise/conv/kernel", 2) is None  # size-1 axis
      if block.expand is not None:
        num_expand += 1
        assert _group_of(spec, f"{p}/expand/conv/kernel", 3) == dw
        assert _members(spec.groups[dw]) == (
            _convbn_out(f"{p}/expand") | _convbn_out(f"{p}/depthwise") | _conv_in(f"{p}/project")
        )
  assert num_expand == 16
  # A stage's output stream: every block's project conv writes it (residual adds).
  stream = spec.groups[_group_of(spec, "stages/2/0/project/conv/kernel", 3)]
  assert stream.size == 32
  assert {"/".join(m.path) for m in stream.producers() if m.axis == 3} == {
      f"stages/2/{b}/project/conv/kernel" for b in range(3)
  }
  assert _group_of(spec, "last/conv/kernel", 3) == 24
  assert _group_of(spec, "head/kernel", 0) == 24


def test_resnet50_groups():
  spec = _zoo_spec("resnet50", (1, 64, 64, 3))
  depths, inner = models.resnet_imagenet.RESNET50_STAGE_DEPTHS, (64, 128, 256, 512)
  expected = [
      (64, _convbn_out("stem") | _conv_in("stages/0/0/shortcut") | _conv_in("stages/0/0/conv1"))
  ]
  for s, (depth, width) in enumerate(zip(depths, inner)):
    blocks = [f"stages/{s}/{b}" for b in range(depth)]
    stream = _convbn_out(f"{blocks[0]}/shortcut")
    for i, b in enumerate(blocks):
      expected.append((width, _convbn_out(f"{b}/conv1") | _conv_in(f"{b}/conv2")))
      expected.append((width, _convbn_out(f"{b}/conv2") | _conv_in(f"{b}/conv3")))
      stream |= _convbn_out(f"{b}/conv3")
      if i > 0:
        stream |= _conv_in(f"{b}/conv1")
    if s + 1 < len(depths):
      stream |= _conv_in(f"stages/{s + 1}/0/shortcut") | _conv_in(f"stages/{s + 1}/0/conv1")
    else:
      stream |= {("head/kernel", 0, CONSUMER)}
    expected.append((4 * width, stream))
  assert len(spec.groups) == 37  # stem + 4 streams + 2 per block (16 blocks)
  _assert_groups(spec, expected)
  _assert_plain(spec)


# ----------------------------------------------------------------------------------------
# Concatenation, Linen, pure functions.


class ConcatBlock(nnx.Module):
  """DenseNet-style: conv A and conv B read x, C reads concat([A, B]) (or [x, A, B])."""

  def __init__(self, rngs: nnx.Rngs, *, with_input: bool = False):
    self.with_input = with_input
    self.a = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.b = nnx.Conv(3, 5, (1, 1), rngs=rngs)
    self.c = nnx.Conv(9 + 3 * with_input, 6, (3, 3), rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    parts = [jax.nn.relu(self.a(x)), jax.nn.relu(self.b(x))]
    h = jnp.concatenate([x, *parts] if self.with_input else parts, axis=-1)
    return self.head(jnp.mean(jax.nn.relu(self.c(h)), axis=(1, 2)))


@pytest.mark.parametrize("with_input", [False, True])
def test_concat_groups(with_input):
  model = nnx.eval_shape(lambda: ConcatBlock(nnx.Rngs(0), with_input=with_input))
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 6, 6, 3)))
  assert spec.sizes == (4, 5, 6)
  group_a, group_b, group_c = spec.groups
  skip = 3 if with_input else 0  # the input's channels come first and are not prunable
  assert group_a.members[-1] == Member(("c", "kernel"), 2, skip, 4, CONSUMER)
  assert group_b.members[-1] == Member(("c", "kernel"), 2, skip + 4, 5, CONSUMER)
  assert _members(group_a) == {
      ("a/kernel", 3, PRODUCER),
      ("a/bias", 0, PRODUCER),
      ("c/kernel", 2, CONSUMER),
  }
  assert _members(group_b) == {
      ("b/kernel", 3, PRODUCER),
      ("b/bias", 0, PRODUCER),
      ("c/kernel", 2, CONSUMER),
  }
  assert _members(group_c) == {
      ("c/kernel", 3, PRODUCER),
      ("c/bias", 0, PRODUCER),
      ("head/kernel", 0, CONSUMER),
  }


class LinenCNN(linen.Module):

  @linen.compact
  def __call__(self, x):
    for width in (4, 6):
      x = linen.Conv(width, (3, 3))(x)
      x = linen.relu(linen.BatchNorm(use_running_average=True)(x))
    x = linen.relu(linen.Dense(5)(jnp.mean(x, axis=(1, 2))))
    return linen.Dense(3)(x)


def test_linen_cnn():
  module = LinenCNN()
  x = jnp.zeros((1, 6, 6, 2))
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  spec = dpm_jax.trace_groups_fn(lambda v, x: module.apply(v, x), variables, x)

  def convbn(i):
    return {
        (f"params/Conv_{i}/kernel", 3, PRODUCER),
        (f"params/Conv_{i}/bias", 0, PRODUCER),
        (f"params/BatchNorm_{i}/scale", 0, PRODUCER),
        (f"params/BatchNorm_{i}/bias", 0, PRODUCER),
        (f"batch_stats/BatchNorm_{i}/mean", 0, STATISTIC),
        (f"batch_stats/BatchNorm_{i}/var", 0, STATISTIC),
    }

  assert spec.sizes == (4, 6, 5)
  assert _members(spec.groups[0]) == convbn(0) | {("params/Conv_1/kernel", 2, CONSUMER)}
  assert _members(spec.groups[1]) == convbn(1) | {("params/Dense_0/kernel", 0, CONSUMER)}
  assert _members(spec.groups[2]) == {
      ("params/Dense_0/kernel", 1, PRODUCER),
      ("params/Dense_0/bias", 0, PRODUCER),
      ("params/Dense_1/kernel", 0, CONSUMER),
  }
  assert all(m.path[0] in ("params", "batch_stats") for g in spec.groups for m in g.members)
  # Statistics are not parameters.
  assert ("batch_stats", "BatchNorm_0", "mean") not in spec.params
  assert ("params", "BatchNorm_0", "scale") in spec.params


def _mlp_vars(widths=(4, 8, 3)):
  rng = np.random.default_rng(0)
  return {
      "w1": jax.device_put(rng.standard_normal(widths[:2]).astype(np.float32)),
      "b1": jnp.zeros(widths[1]),
      "w2": jax.device_put(rng.standard_normal(widths[1:]).astype(np.float32)),
  }


def test_plain_mlp():
  def mlp(v, x):
    return jax.nn.relu(x @ v["w1"] + v["b1"]) @ v["w2"]

  spec = dpm_jax.trace_groups_fn(mlp, _mlp_vars(), jnp.zeros((2, 4)))
  assert spec.groups == (
      Group(
          8,
          (
              Member(("w1",), 1, 0, 8, PRODUCER),
              Member(("b1",), 0, 0, 8, PRODUCER),
              Member(("w2",), 0, 0, 8, CONSUMER),
          ),
      ),
  )
  assert spec.params == (("b1",), ("w1",), ("w2",))
  assert dict(spec.shapes) == {("w1",): (4, 8), ("b1",): (8,), ("w2",): (8, 3)}


def test_inputs_and_outputs_are_not_prunable():
  # The input features, the logits, and channels added to the input (a residual on x) are
  # tied to the outside world.
  v = {"w1": jnp.zeros((4, 4)), "w2": jnp.zeros((4, 6)), "w3": jnp.zeros((6, 3))}

  def f(v, x):
    h = x + jax.nn.relu(x @ v["w1"])  # w1's outputs are added to the input: fixed
    return jax.nn.relu(h @ v["w2"]) @ v["w3"]

  spec = dpm_jax.trace_groups_fn(f, v, jnp.zeros((2, 4)))
  assert spec.sizes == (6,)
  assert _members(spec.groups[0]) == {("w2", 1, PRODUCER), ("w3", 0, CONSUMER)}

  # An output that is also read by a later layer stays whole.
  def g(v, x):
    h = jax.nn.relu(x @ v["w2"])
    return h @ v["w3"], h

  assert dpm_jax.trace_groups_fn(g, v, jnp.zeros((2, 4))).groups == ()


def test_split_glu_ties_halves():
  # a * sigmoid(b) with a, b = split(h, 2): channel i and i + 8 of w1 are one channel.
  v = {"w1": jnp.zeros((4, 16)), "b1": jnp.zeros(16), "w2": jnp.zeros((8, 3))}

  def glu(v, x):
    a, b = jnp.split(x @ v["w1"] + v["b1"], 2, axis=-1)
    return (a * jax.nn.sigmoid(b)) @ v["w2"]

  spec = dpm_jax.trace_groups_fn(glu, v, jnp.zeros((2, 4)))
  assert spec.groups == (
      Group(
          8,
          (
              Member(("w1",), 1, 0, 8, PRODUCER, 1, 2, 8),
              Member(("b1",), 0, 0, 8, PRODUCER, 1, 2, 8),
              Member(("w2",), 0, 0, 8, CONSUMER),
          ),
      ),
  )
  np.testing.assert_array_equal(spec.groups[0].members[0].indices()[3], [3, 11])


def test_split_at_static_positions_is_fixed_and_listed():
  # The jaxpr holds the split point as a number: whether the model reads it from a shape
  # that surgery updates (as here) or wrote it by hand (pruning channel 0 would then move
  # channel 3 into ``a``) cannot be told, so the channels are fixed, and the listing says
  # why. A user who knows better declares the groups by hand.
  v = {"w1": jnp.zeros((4, 8)), "wa": jnp.zeros((3, 2)), "wb": jnp.zeros((5, 2))}

  def f(v, x):
    h = jax.nn.relu(x @ v["w1"])
    a, b = jnp.split(h, [v["wa"].shape[0]], axis=-1)
    return a @ v["wa"] + b @ v["wb"]

  spec = dpm_jax.trace_groups_fn(f, v, jnp.zeros((2, 4)))
  assert spec.groups == ()
  assert "w1 axis 1 (8 channels): sliced" in str(spec)
  declared = spec.with_groups(
      Group(3, (Member(("w1",), 1, 0, 3, PRODUCER), Member(("wa",), 0, 0, 3, CONSUMER))),
      Group(5, (Member(("w1",), 1, 3, 5, PRODUCER), Member(("wb",), 0, 0, 5, CONSUMER))))
  small = dpm_jax.remove_channels_fn(
      v, declared, [np.array([True, False, True]), np.ones(5, bool)])
  assert small["wa"].shape == (2, 2) and small["w1"].shape == (4, 7)


def test_static_slice_after_prunable_channels_is_fixed():
  # h[:, 2:4] with channel 0 pruned would read channels 3 and 4: silently wrong.
  v = {"w1": jnp.zeros((4, 8)), "w2": jnp.zeros((2, 3)), "w3": jnp.zeros((8, 3))}

  def f(v, x):
    h = jax.nn.relu(x @ v["w1"])
    return h[:, 2:4] @ v["w2"] + h @ v["w3"]

  spec = dpm_jax.trace_groups_fn(f, v, jnp.zeros((2, 4)))
  assert spec.groups == ()
  # The whole axis is not a slice: channels stay prunable.
  g = lambda v, x: jax.nn.relu(x @ v["w1"])[:, :] @ v["w3"]
  assert dpm_jax.trace_groups_fn(g, v, jnp.zeros((2, 4))).sizes == (8,)


def test_transpose_keeps_roles():
  v = _mlp_vars()

  def f(v, x):
    h = jax.nn.relu(jnp.einsum("bi,ji->bj", x, v["w1"].T) + v["b1"])
    return (v["w2"].T @ h.T).T

  spec = dpm_jax.trace_groups_fn(f, v, jnp.zeros((2, 4)))
  assert [_members(g) for g in spec.groups] == [
      {("w1", 1, PRODUCER), ("b1", 0, PRODUCER), ("w2", 0, CONSUMER)}
  ]


def test_wrapped_subfunctions():
  @jax.custom_jvp
  def act(x):
    return jax.nn.relu(x)

  act.defjvp(lambda primals, tangents: (act(primals[0]), tangents[0] * (primals[0] > 0)))

  @jax.custom_vjp
  def squash(x):
    return jnp.tanh(x)

  squash.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))

  @jax.jit
  def dense(h, w):
    return h @ w

  def f(v, x):
    h = act(dense(x, v["w1"]) + v["b1"])
    h = jax.checkpoint(lambda h: squash(h) * 2.0)(h)
    return dense(h, v["w2"])

  spec = dpm_jax.trace_groups_fn(f, _mlp_vars(), jnp.zeros((2, 4)))
  assert [_members(g) for g in spec.groups] == [
      {("w1", 1, PRODUCER), ("b1", 0, PRODUCER), ("w2", 0, CONSUMER)}
  ]
  assert spec.groups[0].size == 8


# ----------------------------------------------------------------------------------------
# Ops the tracer cannot read; hand-declared groups.


def _two_layer_vars():
  return {"w1": jnp.zeros((4, 8)), "w2": jnp.zeros((8, 6)), "w3": jnp.zeros((6, 3))}


def _sort(h):
  return jnp.sort(h, axis=-1)


def _while(h):
  return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, h))[1]


def _scan(h):
  return jax.lax.scan(lambda c, _: (jnp.tanh(c), None), h, None, length=3)[0]


@pytest.mark.parametrize("op,primitive", [(_sort, "sort"), (_while, "while"), (_scan, "scan")])
def test_unknown_primitive(op, primitive):
  def f(v, x):
    h = jax.nn.relu(x @ v["w1"])
    h = op(jax.nn.relu(h @ v["w2"]))  # only w2's channels reach the unknown op
    return h @ v["w3"]

  v, x = _two_layer_vars(), jnp.zeros((2, 4))
  with pytest.raises(dpm_jax.UnsupportedPrimitiveError) as err:
    dpm_jax.trace_groups_fn(f, v, x)
  message = str(err.value)
  assert f"'{primitive}'" in message
  assert "parameters ['w2']" in message  # the parameter whose channels reach it
  assert "on_unknown='freeze'" in message and "with_groups" in message

  frozen = dpm_jax.trace_groups_fn(f, v, x, on_unknown="freeze")
  assert [_members(g) for g in frozen.groups] == [{("w1", 1, PRODUCER), ("w2", 0, CONSUMER)}]
  with pytest.raises(ValueError, match="on_unknown"):
    dpm_jax.trace_groups_fn(f, v, x, on_unknown="ignore")


def test_custom_rule():
  # A rule teaches the tracer: sort along the features is elementwise for channel purposes
  # here (a made-up reading, just to exercise the hook).
  def sort_rule(tr, eqn, ins, origins):
    return ins[0]

  def f(v, x):
    return _sort(jax.nn.relu(x @ v["w1"])) @ v["w2"]

  spec = dpm_jax.trace_groups_fn(f, _two_layer_vars(), jnp.zeros((2, 4)), rules={"sort": sort_rule})
  assert spec.sizes == (8,)


def test_with_groups_and_without():
  def f(v, x):
    h = _sort(jax.nn.relu(x @ v["w1"]))
    return jax.nn.relu(h @ v["w2"]) @ v["w3"]

  spec = dpm_jax.trace_groups_fn(f, _two_layer_vars(), jnp.zeros((2, 4)), on_unknown="freeze")
  assert spec.sizes == (6,)
  declared = Group(8, (Member(("w1",), 1, 0, 8, PRODUCER), Member(("w2",), 0, 0, 8, CONSUMER)))
  both = spec.with_groups(declared)
  assert both.sizes == (6, 8) and both.groups[1] == declared
  assert both.without(("w3",)).groups == (declared,)
  assert both.without(("w1",), ("w2",)).groups == ()
  assert both.without(("nothing",)) == both
  with pytest.raises(ValueError, match="w9 is not a traced variable"):
    spec.with_groups(Group(8, (Member(("w9",), 1, 0, 8, PRODUCER),)))
  with pytest.raises(ValueError, match="reaches index 7 but the axis has 6 entries"):
    spec.with_groups(Group(8, (Member(("w2",), 1, 0, 8, PRODUCER),)))


# ----------------------------------------------------------------------------------------
# The spec as a value.


def test_trace_is_deterministic_and_hashable():
  model = _abstract_model("resnet56")
  first = dpm_jax.trace_groups(model, jnp.zeros(CIFAR_INPUT))
  second = dpm_jax.trace_groups(model, jnp.zeros(CIFAR_INPUT))
  assert first == second
  assert hash(first) == hash(second)
  assert len({first, second}) == 1
  assert first.num_channels == sum(first.sizes) == (16 + 32 + 64) * (1 + 9)


def test_trace_leaves_model_alone():
  model = _abstract_model("digits_cnn", conv_widths=(4, 6), dense_widths=(5,))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)  # numpy: jax.random would compile once per leaf shape
  values = jax.tree.map(
      lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype)),
      nnx.to_pure_dict(state),
  )
  nnx.replace_by_pure_dict(state, values)
  model = nnx.merge(graphdef, state)
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 8, 8, 1)))
  assert spec.sizes == (4, 6, 5)
  assert model.convs[0].bn.use_running_average is False  # still in training mode
  jax.tree.map(np.testing.assert_array_equal, values, nnx.to_pure_dict(nnx.state(model)))


def test_summary_and_describe():
  spec = _zoo_spec("digits_cnn", (1, 8, 8, 1))
  lines = str(spec).splitlines()
  assert lines[0] == "GroupSpec: 3 groups, 224 channels"
  # One row per group: index, size, producers (kernel, BN scale and bias), consumers, name.
  assert [l.split() for l in lines[1:6]] == [
      ["#", "size", "producers", "consumers", "name"],
      ["0", "32", "3", "1", "convs/0/conv/kernel"],
      ["1", "64", "3", "1", "convs/1/conv/kernel"],
      ["2", "128", "2", "1", "dense/0/kernel"],
      ["not", "prunable:"]]
  # Then every parameter axis kept whole, and why.
  assert lines[6:] == [
      "  convs/0/conv/kernel axis 2 (1 channels): comes from the model's input",
      "  head/bias axis 0 (10 channels): reaches the model's output",
      "  head/kernel axis 1 (10 channels): reaches the model's output"]
  description = spec.describe()
  assert "consumer  dense/0/kernel axis 0 [0:64] x16 stride 64" in description
  assert "statistic convs/0/bn/mean axis 0 [0:32]" in description


def test_without_keeps_flop_counts_consistent():
  # Dropping a group renumbers the others; the layer costs must follow (the dropped group's
  # channels count as unprunable).
  spec = _zoo_spec("digits_cnn", (1, 8, 8, 1))
  smaller = spec.without(("convs", "1", "bn", "scale"))  # only the second conv's group
  assert smaller.sizes == (32, 128)
  assert dpm_jax.spec_cost(smaller) == dpm_jax.spec_cost(spec)
  keep = [np.arange(32) < 8, np.arange(128) < 100]
  full_keep = [keep[0], np.ones(64, bool), keep[1]]
  assert dpm_jax.spec_cost(smaller, keep) == dpm_jax.spec_cost(spec, full_keep)


def test_an_embedding_lookup_passes_its_width_and_fixes_its_vocabulary():
  def lm(v, tokens):
    return jax.nn.relu(v["embed"][tokens] @ v["w1"]) @ v["w2"]

  v = {"embed": jnp.ones((50, 8)), "w1": jnp.ones((8, 16)), "w2": jnp.ones((16, 50))}
  spec = dpm_jax.trace_groups_fn(lm, v, jnp.zeros((2, 5), jnp.int32))
  assert [[(m.path, m.axis, m.role) for m in g.members] for g in spec.groups] == [
      [(("embed",), 1, PRODUCER), (("w1",), 0, CONSUMER)],
      [(("w1",), 1, PRODUCER), (("w2",), 0, CONSUMER)]]
  assert "embed axis 0 (50 channels): indexed by a gather" in str(spec)
