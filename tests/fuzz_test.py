"""A fuzz test of tracing and surgery: random small networks written as plain functions.

For every network ``trace_groups_fn`` traces (``on_unknown="freeze"``), random keep masks
(one channel at least per group) must give, through ``remove_channels_fn``, a smaller network
that runs and computes what the original computes with the removed channels' producers
zeroed (``zero_channels``). A group the tracer offers but surgery cannot remove exactly (a
shape that no longer fits, a value that changes) fails the test.

Every network starts with a dense or conv stem and ends with a dense head on the mean or the
flatten of its positions. The blocks between come in families:

- ``supported``: dense and conv layers (1-D or 2-D), depthwise convs, activations that are
  zero at zero, BatchNorm (running statistics) and LayerNorm with scale and bias, residual
  adds, concatenations of two branches, attention scaled by a constant;
- ``frozen``: those and one operation the tracer does not know (a sort, a top-k, an
  argsort-gather, an embedding lookup) or ``cumsum``;
- ``attention``: those and attention scaled by ``1 / sqrt(q.shape[-1])``, by hand or after an
  even split of one projection into q, k and v, or ``jax.nn.dot_product_attention``;
- ``split``: those and one projection split evenly into parts that separate layers read;
- ``nonzero_at_zero``: those and a sigmoid or softplus, or a BatchNorm without scale and
  bias.

Every width is read from the arrays, so one function runs the original and the pruned
parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpm_jax

TOLERANCE = 1e-5
BATCH = 2
SPATIAL = {1: (4,), 2: (3, 3)}  # positions of a sequence [B, L, C] or image [B, H, W, C]
NUM_OUT = 3
# Compile time dominates and optimisation does not matter: XLA's cheapest level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

ZERO_AT_ZERO = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu, "silu": jax.nn.silu}
NONZERO_AT_ZERO = {"sigmoid": jax.nn.sigmoid, "softplus": jax.nn.softplus}
ACTIVATIONS = {**ZERO_AT_ZERO, **NONZERO_AT_ZERO}
FROZEN_OPS = ("sort", "cumsum", "top_k", "argsort_gather", "embed")
FAMILIES = ("supported", "frozen", "attention", "split", "nonzero_at_zero")
# Drawn networks per family (plus the examples below); the supported operations, which
# every family also draws, get the most.
MAX_EXAMPLES = {"supported": 60, "frozen": 20, "attention": 20, "split": 20,
                "nonzero_at_zero": 20}

# ----------------------------------------------------------------------------------------
# The networks.


def _conv(x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
  spatial = kernel.ndim - 2
  dn = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[spatial]
  return jax.lax.conv_general_dilated(x, kernel, (1,) * spatial, "SAME", dimension_numbers=dn,
                                      feature_group_count=groups)


def _linear(p: dict, h: jax.Array) -> jax.Array:
  """A dense layer (2-D kernel) or a convolution, with its bias if it has one."""
  y = h @ p["kernel"] if p["kernel"].ndim == 2 else _conv(h, p["kernel"])
  return y + p["bias"] if "bias" in p else y


def _norm(p: dict, h: jax.Array) -> jax.Array:
  """Eval-mode BatchNorm (running ``mean`` and ``var``) or LayerNorm over the channels."""
  if "mean" in p:
    y = (h - p["mean"]) * jax.lax.rsqrt(p["var"] + 1e-5)
  else:
    mu = jnp.mean(h, axis=-1, keepdims=True)
    y = (h - mu) * jax.lax.rsqrt(jnp.mean((h - mu) ** 2, axis=-1, keepdims=True) + 1e-5)
  if "scale" in p:
    y = y * p["scale"]
  return y + p["bias"] if "bias" in p else y


def _frozen(op: str, p: dict, h: jax.Array, k: int) -> jax.Array:
  """An operation along the channels that the tracer does not know (or, ``cumsum``, keeps
  whole)."""
  if op == "sort":
    return jnp.sort(h, axis=-1)
  if op == "cumsum":
    return jnp.cumsum(h, axis=-1)
  if op == "top_k":
    return jax.lax.top_k(h, min(k, h.shape[-1]))[0]
  if op == "argsort_gather":
    return jnp.take_along_axis(h, jnp.argsort(h, axis=-1), axis=-1)
  return p["table"][jnp.argmax(h, axis=-1)]  # an embedding lookup


def _attention(impl: str, p: dict, x: jax.Array, scale: float) -> jax.Array:
  """Single-head self-attention over the positions of ``x`` [B, ..., C].

  ``hand`` scales the scores by ``1 / sqrt(q.shape[-1])``, ``fused`` too after splitting one
  projection into q, k and v, ``constant`` by ``scale``; ``jax`` is
  ``jax.nn.dot_product_attention``.
  """
  h = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, positions, C]
  if impl == "fused":
    q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
  else:
    q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
  if impl != "jax":
    scores = jnp.einsum("bld,bmd->blm", q, k)
    scores = scores * scale if impl == "constant" else scores / jnp.sqrt(q.shape[-1])
    out = jnp.einsum("blm,bmd->bld", jax.nn.softmax(scores, axis=-1), v)
  else:
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], 1, t.shape[2])
    out = jax.nn.dot_product_attention(heads(q), heads(k), heads(v))
    out = out.reshape(out.shape[0], out.shape[1], -1)
  return (out @ p["o"]).reshape(*x.shape[:-1], -1)


def _apply(arch: dict, v: dict, x: jax.Array) -> jax.Array:
  """The network ``arch`` describes; every width is read from the arrays in ``v``."""
  h = x
  for i, block in enumerate(arch["blocks"]):
    p, kind = v.get(f"block{i}", {}), block["kind"]
    if kind == "linear":
      h = _linear(p, h)
    elif kind == "act":
      h = ACTIVATIONS[block["fn"]](h)
    elif kind == "norm":
      h = _norm(p, h)
    elif kind == "residual":
      y = _linear(p, h)
      h = h + (_norm(p["norm"], y) if "norm" in p else y)
    elif kind == "depthwise":  # one group per input channel, `mult` outputs each
      h = _conv(h, p["kernel"], groups=h.shape[-1]) + p["bias"]
    elif kind == "concat":
      h = jnp.concatenate([_linear(p["left"], h), _linear(p["right"], h)], axis=-1)
    elif kind == "frozen":
      h = _frozen(block["op"], p, h, block["k"])
    elif kind == "attention":
      h = _attention(block["impl"], p, h, block["dk"] ** -0.5)
    elif kind == "split":
      parts = jnp.split(_linear(p["fused"], h), len(p["parts"]), axis=-1)
      h = sum(_linear(q, part) for q, part in zip(p["parts"], parts))
  if arch["head"] == "mean":
    h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
  else:
    h = h.reshape(h.shape[0], -1)
  return _linear(v["head"], h)


# ----------------------------------------------------------------------------------------
# Drawing networks and their parameters.


WIDTH = st.integers(2, 8)
KSIZE = st.sampled_from([1, 3])


def _linear_block() -> st.SearchStrategy[dict]:
  return st.fixed_dictionaries({"kind": st.just("linear"), "width": WIDTH,
                                "conv": st.booleans(), "ksize": KSIZE, "bias": st.booleans()})


def _norm_block(affine: st.SearchStrategy[bool]) -> st.SearchStrategy[dict]:
  return st.fixed_dictionaries({"kind": st.just("norm"), "norm": st.sampled_from(["bn", "ln"]),
                                "affine": affine})


def _residual_block(affine: st.SearchStrategy[bool]) -> st.SearchStrategy[dict]:
  return st.fixed_dictionaries({"kind": st.just("residual"), "norm": st.booleans(),
                                "affine": affine, "conv": st.booleans(), "ksize": KSIZE,
                                "bias": st.booleans()})


def _attention_block(impls: list[str]) -> st.SearchStrategy[dict]:
  return st.fixed_dictionaries({"kind": st.just("attention"), "impl": st.sampled_from(impls),
                                "dk": WIDTH, "dv": WIDTH, "width": WIDTH})


# What every family draws from: the supported operations. Attention scaled by a constant
# reads no width from a shape.
SUPPORTED = st.one_of(
    _linear_block(),
    st.fixed_dictionaries({"kind": st.just("act"), "fn": st.sampled_from(sorted(ZERO_AT_ZERO))}),
    _norm_block(st.just(True)),
    _residual_block(st.just(True)),
    st.fixed_dictionaries({"kind": st.just("depthwise"), "mult": st.integers(1, 2),
                           "ksize": KSIZE}),
    st.fixed_dictionaries({"kind": st.just("concat"), "widths": st.tuples(WIDTH, WIDTH),
                           "conv": st.tuples(st.booleans(), st.booleans()), "ksize": KSIZE,
                           "bias": st.booleans()}),
    _attention_block(["constant"]),
)

# The one block each other family adds somewhere.
SPECIAL = {
    "frozen": st.fixed_dictionaries({"kind": st.just("frozen"),
                                     "op": st.sampled_from(FROZEN_OPS),
                                     "k": st.integers(1, 2), "dim": WIDTH}),
    "attention": _attention_block(["hand", "fused", "jax"]),
    "split": st.fixed_dictionaries({"kind": st.just("split"), "parts": st.integers(2, 3),
                                    "width": st.integers(1, 4), "out": WIDTH,
                                    "conv": st.booleans(), "ksize": KSIZE,
                                    "bias": st.booleans()}),
    "nonzero_at_zero": st.one_of(
        st.fixed_dictionaries({"kind": st.just("act"),
                               "fn": st.sampled_from(sorted(NONZERO_AT_ZERO))}),
        _norm_block(st.just(False)), _residual_block(st.just(False))),
}


@st.composite
def architectures(draw, family: str) -> dict:
  """A dense or conv stem, then up to 4 blocks (one of them the family's own) on sequences
  or images, then a mean or flatten head."""
  blocks = draw(st.lists(SUPPORTED, min_size=family == "supported", max_size=3))
  if family in SPECIAL:
    blocks.insert(draw(st.integers(0, len(blocks))), draw(SPECIAL[family]))
  return {"spatial": draw(st.sampled_from([1, 2])), "in_channels": draw(st.integers(1, 3)),
          "blocks": [draw(_linear_block())] + blocks,
          "head": draw(st.sampled_from(["mean", "flatten"]))}


class _Init:
  """Random float32 arrays: kernels scaled by fan-in, BatchNorm statistics far from the
  identity, so that a channel that surgery mixed up or left behind changes the outputs."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)

  def __call__(self, kind: str, *shape: int) -> jax.Array:
    if kind == "kernel":
      x = self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif kind in ("scale", "var"):
      x = self.rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean, embedding table
      x = self.rng.normal(0.0, 0.5, shape)
    return jax.device_put(np.asarray(x, np.float32))  # not jnp: no compile per shape

  def linear(self, cin: int, cout: int, conv: bool, ksize: int, bias: bool,
             spatial: int) -> dict:
    window = (ksize,) * spatial if conv else ()
    p = {"kernel": self("kernel", *window, cin, cout)}
    if bias:
      p["bias"] = self("bias", cout)
    return p

  def norm(self, kind: str, width: int, affine: bool) -> dict:
    p = {name: self(name, width) for name in ("mean", "var")} if kind == "bn" else {}
    if affine:
      p.update(scale=self("scale", width), bias=self("bias", width))
    return p


def _init(arch: dict, seed: int) -> dict:
  """Parameters for ``arch``; blocks without parameters have no entry."""
  make, v = _Init(seed), {}
  width, spatial = arch["in_channels"], arch["spatial"]
  for i, b in enumerate(arch["blocks"]):
    kind, name = b["kind"], f"block{i}"
    if kind == "linear":
      v[name] = make.linear(width, b["width"], b["conv"], b["ksize"], b["bias"], spatial)
      width = b["width"]
    elif kind == "norm":
      v[name] = make.norm(b["norm"], width, b["affine"])
    elif kind == "residual":
      v[name] = make.linear(width, width, b["conv"], b["ksize"], b["bias"], spatial)
      if b["norm"]:
        v[name]["norm"] = make.norm("bn", width, b["affine"])
    elif kind == "depthwise":
      v[name] = {"kernel": make("kernel", *(b["ksize"],) * spatial, 1, b["mult"] * width),
                 "bias": make("bias", b["mult"] * width)}
      width *= b["mult"]
    elif kind == "concat":
      (left, right), (conv_left, conv_right) = b["widths"], b["conv"]
      v[name] = {"left": make.linear(width, left, conv_left, b["ksize"], b["bias"], spatial),
                 "right": make.linear(width, right, conv_right, b["ksize"], b["bias"], spatial)}
      width = left + right
    elif kind == "frozen" and b["op"] == "embed":
      v[name] = {"table": make("table", width, b["dim"])}
      width = b["dim"]
    elif kind == "frozen" and b["op"] == "top_k":
      width = min(b["k"], width)
    elif kind == "attention":
      # dot_product_attention and an even split: one head dim for q, k and v.
      dv = b["dk"] if b["impl"] in ("jax", "fused") else b["dv"]
      if b["impl"] == "fused":
        v[name] = {"qkv": make("kernel", width, 3 * dv)}
      else:
        v[name] = {"q": make("kernel", width, b["dk"]), "k": make("kernel", width, b["dk"]),
                   "v": make("kernel", width, dv)}
      v[name]["o"] = make("kernel", dv, b["width"])
      width = b["width"]
    elif kind == "split":
      v[name] = {"fused": make.linear(width, b["parts"] * b["width"], b["conv"], b["ksize"],
                                      b["bias"], spatial),
                 "parts": [make.linear(b["width"], b["out"], False, 1, b["bias"], spatial)
                           for _ in range(b["parts"])]}
      width = b["out"]
  positions = int(np.prod(SPATIAL[spatial]))
  features = width if arch["head"] == "mean" else width * positions
  v["head"] = make.linear(features, NUM_OUT, False, 1, True, spatial)
  return v


def _keep(spec: dpm_jax.GroupSpec, bits: list[bool]) -> list[np.ndarray]:
  """One mask per group from ``bits``, read cyclically; the first channel stays where a mask
  would keep none (all-False bits keep one channel per group)."""
  keep, start = [], 0
  for g in spec.groups:
    k = np.array([bits[(start + c) % len(bits)] for c in range(g.size)], bool)
    if not k.any():
      k[0] = True
    keep.append(k)
    start += g.size
  return keep


def _compiled(fn: Callable[..., jax.Array], *args: Any) -> Callable[..., jax.Array]:
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _check_surgery(arch: dict, seed: int, bits: list[bool]) -> None:
  """The property: surgery with any keep masks is exact (see the module docstring)."""
  v = _init(arch, seed)
  rng = np.random.default_rng(seed + 1)
  x = jax.device_put(rng.standard_normal((BATCH, *SPATIAL[arch["spatial"]],
                                          arch["in_channels"])).astype(np.float32))
  apply = functools.partial(_apply, arch)
  spec = dpm_jax.trace_groups_fn(apply, v, x[:1], on_unknown="freeze")
  if not spec.groups:
    return
  keep = _keep(spec, bits)
  masked = dpm_jax.zero_channels(v, spec, keep)
  small = dpm_jax.remove_channels_fn(v, spec, keep)
  want = _compiled(apply, masked, x)(masked, x)
  got = _compiled(apply, small, x)(small, x)
  np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE,
                             err_msg=f"groups {spec.describe()}\nkeep {keep}")


# ----------------------------------------------------------------------------------------
# The fuzz test.


def _net(*blocks: dict, spatial: int = 1, in_channels: int = 2, head: str = "mean") -> dict:
  return {"spatial": spatial, "in_channels": in_channels, "blocks": list(blocks), "head": head}


def _dense(width: int) -> dict:
  return {"kind": "linear", "width": width, "conv": False, "ksize": 1, "bias": True}


def _attend(impl: str, dk: int = 4, dv: int = 4) -> dict:
  return {"kind": "attention", "impl": impl, "dk": dk, "dv": dv, "width": 4}


def _bits(*groups: str) -> list[bool]:
  """Keep bits group by group ("1011": drop the second of four channels), then keep all."""
  bits = [c == "1" for c in "".join(groups)]
  return bits + [True] * (16 - len(bits))


NONE = [False] * 16  # every group down to its first channel
# Small networks of each family, always checked: (arch, seed, bits).
EXAMPLES = {
    "supported": [
        (_net(_dense(4), {"kind": "norm", "norm": "bn", "affine": True}, _dense(3)), 0, NONE),
        (_net({**_dense(4), "conv": True, "ksize": 3},
              {"kind": "residual", "norm": True, "affine": True, "conv": True, "ksize": 3,
               "bias": False},
              {"kind": "concat", "widths": (3, 2), "conv": (True, False), "ksize": 3,
               "bias": True}, spatial=2, head="flatten"), 1, [True, False] * 8),
        (_net(_dense(4), _attend("constant", 3, 2), {"kind": "act", "fn": "gelu"}), 2,
         [True, False, False] * 5 + [True]),
    ],
    # Normalisations and residual adds after an operation the tracer froze.
    "frozen": [
        (_net(_dense(4), {"kind": "frozen", "op": op, "k": 2, "dim": 3},
              {"kind": "norm", "norm": "ln", "affine": True}, _dense(3)), 0, NONE)
        for op in ("sort", "top_k", "embed")
    ] + [
        (_net(_dense(4), {"kind": "frozen", "op": "argsort_gather", "k": 2, "dim": 3},
              {"kind": "residual", "norm": True, "affine": True, "conv": False, "ksize": 1,
               "bias": True}), 0, NONE),
    ],
    # 1 / sqrt(q.shape[-1]) after q and k lose channels; q, k and v pruned apart.
    "attention": [
        # Groups: the stem, q and k, v, the output projection.
        (_net(_dense(4), _attend("hand")), 0, _bits("1111", "1011")),
        (_net(_dense(4), _attend("jax")), 0, _bits("1111", "1000")),
        # Fused, q and k stay whole (their channels sit twice in one kernel axis): the
        # stem, v, the output projection.
        (_net(_dense(4), _attend("fused")), 0, _bits("1111", "1000")),
    ],
    # A projection split evenly into parts that are pruned apart.
    "split": [
        (_net(_dense(4), {"kind": "split", "parts": 2, "width": 3, "out": 4, "conv": False,
                          "ksize": 1, "bias": True}), 0, _bits("1111", "101", "111")),
    ],
    # A removed channel that is not zero after its zeroed producers.
    "nonzero_at_zero": [
        (_net(_dense(4), {"kind": "act", "fn": "sigmoid"}, _dense(3)), 0, NONE),
        (_net(_dense(4), {"kind": "norm", "norm": "bn", "affine": False}), 0, NONE),
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_is_exact_on_random_networks(family):
  # Deterministic; without shrinking (minutes for these compiles), a failure shows the
  # example as drawn: add hypothesis.Phase.shrink to `phases` to minimise it.
  @hypothesis.settings(max_examples=MAX_EXAMPLES[family], deadline=None, derandomize=True,
                       database=None, phases=[hypothesis.Phase.explicit,
                                              hypothesis.Phase.generate],
                       suppress_health_check=[hypothesis.HealthCheck.too_slow])
  @hypothesis.given(arch=architectures(family), seed=st.integers(0, 2**16),
                    bits=st.lists(st.booleans(), min_size=16, max_size=16))
  def check(arch: dict, seed: int, bits: list[bool]) -> None:
    _check_surgery(arch, seed, bits)

  for arch, seed, bits in EXAMPLES[family]:
    check = hypothesis.example(arch=arch, seed=seed, bits=bits)(check)
  check()
