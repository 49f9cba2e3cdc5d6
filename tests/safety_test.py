"""Never a silently wrong model: what the tracer must not offer, and what surgery must refuse.

Each model here was once traced into a group whose removal changed the model's function or
made it raise. Every group the tracer offers now is checked by surgery against the masked
model on a random input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax.groups import PRODUCER, Group, Member


def _paths(spec: dpm_jax.GroupSpec) -> set[str]:
  return {"/".join(m.path) for g in spec.groups for m in g.members}


def _check_every_group(model: nnx.Module, spec: dpm_jax.GroupSpec, x, seed: int = 0) -> None:
  """Random keep masks on every group: the small model runs and equals the masked one."""
  rng = np.random.default_rng(seed)
  keep = []
  for g in spec.groups:
    k = rng.random(g.size) < 0.5
    k[rng.integers(g.size)] = True
    keep.append(k)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, dpm_jax.zero_channels(nnx.to_pure_dict(state), spec, keep))
  masked = nnx.merge(graphdef, state)
  masked.eval()
  small = dpm_jax.remove_channels(masked, spec, keep)
  small.eval()
  np.testing.assert_allclose(small(x), masked(x), atol=1e-5, rtol=1e-5)


class _FrozenThenNorm(nnx.Module):
  """Dense(16->32) -> an op the tracer does not know -> a norm(32) -> Dense(32->64) -> head."""

  def __init__(self, norm: str, rngs: nnx.Rngs):
    self.inp = nnx.Linear(16, 32, rngs=rngs)
    self.norm = (nnx.LayerNorm(32, rngs=rngs) if norm == "layer"
                 else nnx.BatchNorm(32, use_running_average=True, rngs=rngs))
    self.mid = nnx.Linear(32, 64, rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    h = jnp.sort(self.inp(x), axis=-1)
    return self.head(nnx.relu(self.mid(self.norm(h))))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_frozen_op_then_norm_keeps_the_norm_whole(norm):
  model = _FrozenThenNorm(norm, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  spec = dpm_jax.trace_groups(model, x, on_unknown="freeze")
  assert not {"norm/scale", "norm/bias", "norm/mean", "norm/var"} & _paths(spec)
  assert spec.sizes == (64,)  # only mid -> head remains
  assert "norm/scale axis 0 (32 channels): passes through 'sort'" in str(spec)
  _check_every_group(model, spec, x)


class _EmbedNorm(nnx.Module):
  """Token embedding (a gather) -> LayerNorm -> MLP -> head, the common language-model start."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(50, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.up = nnx.Linear(16, 32, rngs=rngs)
    self.down = nnx.Linear(32, 16, rngs=rngs)
    self.head = nnx.Linear(16, 50, rngs=rngs)

  def __call__(self, tokens):
    h = self.norm(self.embed(tokens))
    return self.head(h + self.down(nnx.relu(self.up(h))))


def test_embedding_then_norm():
  model = _EmbedNorm(nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 50)
  spec = dpm_jax.trace_groups(model, tokens, on_unknown="freeze")
  assert spec.sizes == (32,)  # the MLP's hidden units; the embedding width stays
  assert not {"norm/scale", "embed/embedding"} & _paths(spec)
  _check_every_group(model, spec, tokens)


class _Attention(nnx.Module):
  """Single-head self-attention written by hand, or with jax.nn.dot_product_attention."""

  def __init__(self, fused: bool, rngs: nnx.Rngs):
    self.fused = fused
    self.q, self.k, self.v = (nnx.Linear(8, 16, rngs=rngs) for _ in range(3))
    self.o = nnx.Linear(16, 8, rngs=rngs)
    self.up = nnx.Linear(8, 24, rngs=rngs)
    self.head = nnx.Linear(24, 3, rngs=rngs)

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.fused:
      a = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
    else:
      s = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(q.shape[-1])
      a = jnp.einsum("bts,bsd->btd", jax.nn.softmax(s), v)
    return self.head(nnx.relu(self.up(x + self.o(a))))


@pytest.mark.parametrize("fused", [False, True])
def test_attention_channels_are_not_offered(fused):
  model = _Attention(fused, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  spec = dpm_jax.trace_groups(model, x)
  assert not {"q/kernel", "k/kernel", "v/kernel", "o/kernel"} & _paths(spec)
  assert spec.sizes == (24,)
  listing = str(spec)
  for name in ("q", "k", "v"):
    assert f"{name}/kernel axis 1 (16 channels): contracted between two activations" in listing
  _check_every_group(model, spec, x)


def test_array_built_inside_the_model_fixes_what_it_meets():
  # A positional table built with iota, added to a hidden layer: surgery cannot slice it.
  def f(v, x):
    h = x @ v["w1"] + jnp.sin(jnp.arange(8.0))
    return jax.nn.relu(h) @ v["w2"]

  v = {"w1": jnp.ones((4, 8)), "w2": jnp.ones((8, 3))}
  spec = dpm_jax.trace_groups_fn(f, v, jnp.zeros((2, 4)))
  assert spec.groups == ()
  assert "meets an array built inside the model" in str(spec)
  # A scalar or a broadcast constant does not vary along the channels: still prunable.
  g = lambda v, x: jax.nn.relu(x @ v["w1"] * jnp.full((8,), 0.5)) @ v["w2"]
  assert dpm_jax.trace_groups_fn(g, v, jnp.zeros((2, 4))).sizes == (8,)


@pytest.mark.parametrize("activation, prunable", [
    (jax.nn.relu, True), (jax.nn.gelu, True), (jax.nn.silu, True), (jax.nn.relu6, True),
    (jnp.tanh, True), (lambda h: jax.nn.leaky_relu(h, 0.1), True),
    (jax.nn.sigmoid, False), (jax.nn.softplus, False), (lambda h: jax.nn.relu(h + 0.5), False),
    (jnp.cos, False)])
def test_channels_that_are_not_zero_when_pruned_are_fixed(activation, prunable):
  # sigmoid(0) = 0.5: a pruned channel would still feed 0.5 * its row into the next layer.
  def f(v, x):
    return activation(x @ v["w1"] + v["b1"]) @ v["w2"]

  keys = jax.random.split(jax.random.key(0), 3)
  v = {"w1": jax.random.normal(keys[0], (4, 8)), "b1": jax.random.normal(keys[1], (8,)),
       "w2": jax.random.normal(keys[2], (8, 3))}
  spec = dpm_jax.trace_groups_fn(f, v, jnp.zeros((2, 4)))
  if not prunable:
    assert spec.groups == ()
    assert "w2 axis 0 (8 channels): not zero when its producers are" in str(spec)
    return
  assert spec.sizes == (8,)
  keep = [np.arange(8) % 3 != 0]
  x = jax.random.normal(keys[1], (5, 4))
  dpm_jax.remove_channels_fn(v, spec, keep, apply_fn=f, sample=x, tolerance=1e-6)


class _AffineFreeNorm(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(8, use_scale=False, use_bias=False, use_running_average=True,
                              rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.mean(nnx.relu(self.norm(self.conv(x))), axis=(1, 2)))


def test_batchnorm_without_scale_and_bias_keeps_its_channels():
  # (0 - mean) / std is not zero: the channel's running statistics keep it alive.
  model = _AffineFreeNorm(nnx.Rngs(0))
  model.norm.mean[...] = jnp.linspace(-1.0, 1.0, 8)
  spec = dpm_jax.trace_groups(model, jnp.zeros((1, 6, 6, 3)))
  assert spec.groups == ()


def _mlp():
  def f(v, x):
    return jax.nn.relu(x @ v["w1"] + v["b1"]) @ v["w2"]

  keys = jax.random.split(jax.random.key(0), 3)
  v = {"w1": jax.random.normal(keys[0], (4, 8)), "b1": jax.random.normal(keys[1], (8,)),
       "w2": jax.random.normal(keys[2], (8, 3))}
  return f, v, dpm_jax.trace_groups_fn(f, v, jnp.zeros((1, 4)))


def test_integer_keep_masks_are_refused():
  # np.arange(n) as a mask once kept every channel but channel 0.
  _, v, spec = _mlp()
  for fn in (dpm_jax.remove_channels_fn, dpm_jax.zero_channels):
    with pytest.raises(ValueError, match="dtype int64; keep masks are boolean"):
      fn(v, spec, [np.arange(8)])


def test_zero_channels_checks_the_spec_against_the_variables():
  _, v, spec = _mlp()
  other = {"w1": jnp.ones((4, 6)), "b1": jnp.ones(6), "w2": jnp.ones((6, 3))}
  keep = [np.arange(8) < 4]
  with pytest.raises(ValueError, match=r"b1 has shape \(6,\) but the spec was traced with"):
    dpm_jax.zero_channels(other, spec, keep)


def test_finalize_checks_the_spec_against_the_params():
  _, v, spec = _mlp()
  tx = dpm_jax.prune(optax.sgd(0.1), spec, dpm_jax.recipes.depgraph(target_flops=0.5))
  opt_state = tx.init(v)
  _, _, other = _mlp()
  other_params = {"w1": jnp.ones((4, 8)), "b1": jnp.ones(8), "w2": jnp.ones((8, 5))}
  with pytest.raises(ValueError, match="w2 has shape"):
    dpm_jax.finalize(other_params, opt_state, spec)


def test_surgery_check_names_the_group_that_is_not_exact():
  f, v, spec = _mlp()
  x = jax.random.normal(jax.random.key(5), (3, 4))
  keep = [np.arange(8) % 2 == 0]
  small = dpm_jax.remove_channels_fn(v, spec, keep, apply_fn=f, sample=x)
  assert small["w1"].shape == (4, 4)

  # A group declared by hand that the model does not allow: the bias alone.
  bad = dpm_jax.GroupSpec((), spec.shapes, spec.params, spec.layers).with_groups(
      Group(8, (Member(("b1",), 0, 0, 8, PRODUCER),)))
  with pytest.raises(dpm_jax.SurgeryCheckError, match=r"group 0 \(b1\)"):
    dpm_jax.remove_channels_fn(v, bad, keep, apply_fn=f, sample=x)
  # Without a sample nothing is checked, as before.
  dpm_jax.remove_channels_fn(v, bad, keep)


def test_surgery_check_on_an_nnx_model():
  model = _Attention(fused=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  spec = dpm_jax.trace_groups(model, x)
  keep = [np.arange(24) < 20]
  assert dpm_jax.remove_channels(model, spec, keep, sample=x).up.out_features == 20
  # The q/k channels the tracer used to offer, declared by hand: the check refuses them.
  qk = Group(16, (Member(("q", "kernel"), 1, 0, 16, PRODUCER),
                  Member(("q", "bias"), 0, 0, 16, PRODUCER),
                  Member(("k", "kernel"), 1, 0, 16, PRODUCER),
                  Member(("k", "bias"), 0, 0, 16, PRODUCER)))
  with pytest.raises(dpm_jax.SurgeryCheckError, match=r"group 1 \(q/kernel\)"):
    dpm_jax.remove_channels(model, spec.with_groups(qk), keep + [np.arange(16) < 12], sample=x)
