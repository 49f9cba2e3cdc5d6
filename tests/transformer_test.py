"""Attention heads and MLP units of transformers as channel groups: tracing, surgery, FLOPs.

Every attention form (by hand, ``jax.nn.dot_product_attention``, ``nnx.MultiHeadAttention``)
of the zoo's ViT and decoder LM, with and without grouped queries, is traced into one group
per block's heads and one per block's MLP units; random keep masks remove them exactly, and
the FLOPs of the small model are the cost of the keep masks and a count by hand.
"""

from __future__ import annotations

import functools
import json
import sys

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm_jax
from dpm_jax import checkpoint
from dpm_jax import models
from train import loop
from train import main as main_lib

FORMS = ("einsum", "jax", "flax")
DIM, HEAD_DIM, CLASSES, VOCAB, LENGTH = 16, 4, 10, 20, 6
VIT_HEADS, LM_KV_HEADS, MLP_WIDTHS = (4, 2), (3, 2), (8, 6)
PATCH, IMAGE = 2, 8
TOKENS = (IMAGE // PATCH) ** 2


@functools.cache
def _cached_vit(attention: str) -> nnx.Module:
  return models.create_model("digits_vit", num_classes=CLASSES, rngs=nnx.Rngs(0), dim=DIM,
                             num_heads=VIT_HEADS, head_dim=HEAD_DIM, mlp_widths=MLP_WIDTHS,
                             attention=attention, patch_size=PATCH)


@functools.cache
def _cached_lm(attention: str, queries_per_kv: int) -> nnx.Module:
  return models.create_model("decoder_lm", num_classes=VOCAB, rngs=nnx.Rngs(0), dim=DIM,
                             num_kv_heads=LM_KV_HEADS, queries_per_kv=queries_per_kv,
                             head_dim=HEAD_DIM, mlp_widths=MLP_WIDTHS, attention=attention,
                             max_length=LENGTH)


def _vit(attention: str) -> nnx.Module:
  """A fresh copy of a small ViT (eager initialisation compiles: build each form once)."""
  return nnx.clone(_cached_vit(attention))


def _lm(attention: str, queries_per_kv: int) -> nnx.Module:
  return nnx.clone(_cached_lm(attention, queries_per_kv))


def _images(n: int = 3) -> jax.Array:
  return jax.random.normal(jax.random.key(1), (n, IMAGE, IMAGE, 1))


def _tokens(n: int = 3) -> jax.Array:
  return jax.random.randint(jax.random.key(1), (n, LENGTH), 0, VOCAB)


def _members(group: dpm_jax.Group) -> dict[str, tuple[str, int, int]]:
  """``path -> (role, channel_stride, repeat)`` of a group's members."""
  return {"/".join(m.path): (m.role, m.channel_stride, m.repeat) for m in group.members}


def _assert_head_group(group: dpm_jax.Group, block: int, attention: str,
                       queries_per_kv: int = 1) -> None:
  """The group is one block's heads: q, k, v kernels and biases produce, the output
  projection consumes; a channel is a key/value head and its query heads."""
  prefix = f"blocks/{block}/attention"
  # By hand and jax: [in, heads * head_dim] kernels, a head is head_dim entries.
  # nnx.MultiHeadAttention: [in, heads, head_dim] kernels, a head is one entry of axis 1.
  size = 1 if attention == "flax" else HEAD_DIM
  q, kv = size * queries_per_kv, size
  strided = lambda n, role: (role, n, n) if n > 1 else (role, 1, 1)
  assert _members(group) == {
      f"{prefix}/query/kernel": strided(q, "producer"),
      f"{prefix}/query/bias": strided(q, "producer"),
      f"{prefix}/key/kernel": strided(kv, "producer"),
      f"{prefix}/key/bias": strided(kv, "producer"),
      f"{prefix}/value/kernel": strided(kv, "producer"),
      f"{prefix}/value/bias": strided(kv, "producer"),
      f"{prefix}/out/kernel": strided(q, "consumer"),
  }


def _assert_mlp_group(group: dpm_jax.Group, block: int) -> None:
  assert _members(group) == {f"blocks/{block}/mlp_in/kernel": ("producer", 1, 1),
                             f"blocks/{block}/mlp_in/bias": ("producer", 1, 1),
                             f"blocks/{block}/mlp_out/kernel": ("consumer", 1, 1)}


@pytest.mark.parametrize("attention", FORMS)
def test_vit_groups_are_heads_and_mlp_units(attention):
  spec = dpm_jax.trace_groups(_vit(attention), _images(1))
  assert spec.sizes == (VIT_HEADS[0], MLP_WIDTHS[0], VIT_HEADS[1], MLP_WIDTHS[1])
  for block in range(2):
    _assert_head_group(spec.groups[2 * block], block, attention)
    _assert_mlp_group(spec.groups[2 * block + 1], block)
  listing = str(spec)
  # The residual stream stays whole, and the listing says why.
  assert (f"blocks/0/norm1/scale axis 0 ({DIM} channels): mixed by a reduction over the "
          "channel axis") in listing
  assert f"blocks/0/attention/out/bias axis 0 ({DIM} channels): mixed by a reduction" in listing


@pytest.mark.parametrize("queries_per_kv", [1, 2])
@pytest.mark.parametrize("attention", FORMS)
def test_decoder_groups_are_kv_heads_with_their_queries(attention, queries_per_kv):
  spec = dpm_jax.trace_groups(_lm(attention, queries_per_kv), _tokens(1))
  assert spec.sizes == (LM_KV_HEADS[0], MLP_WIDTHS[0], LM_KV_HEADS[1], MLP_WIDTHS[1])
  for block in range(2):
    _assert_head_group(spec.groups[2 * block], block, attention, queries_per_kv)
    _assert_mlp_group(spec.groups[2 * block + 1], block)
  assert f"embed/embedding axis 0 ({VOCAB} channels): indexed by a gather" in str(spec)


def _random_keep(spec: dpm_jax.GroupSpec, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  keep = []
  for g in spec.groups:
    k = rng.random(g.size) < 0.5
    k[rng.integers(g.size)] = True
    keep.append(k)
  return keep


def _masked(model: nnx.Module, spec: dpm_jax.GroupSpec, keep) -> nnx.Module:
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, dpm_jax.zero_channels(nnx.to_pure_dict(state), spec, keep))
  return nnx.merge(graphdef, state)


def _check_surgery(model: nnx.Module, x: jax.Array, seed: int):
  """Random keep masks: the small model computes what the masked one does."""
  spec = dpm_jax.trace_groups(model, x[:1])
  keep = _random_keep(spec, seed)
  masked = _masked(model, spec, keep)
  small = dpm_jax.remove_channels(masked, spec, keep)
  run = nnx.jit(lambda m, x: m(x))  # one compile each, rather than one per operation
  np.testing.assert_allclose(run(small, x), run(masked, x), atol=1e-5, rtol=1e-5)
  return spec, keep, small


@pytest.mark.parametrize("attention", FORMS)
def test_vit_surgery_removes_heads_and_units_exactly(attention):
  spec, keep, small = _check_surgery(_vit(attention), _images(), seed=0)
  arch = small.arch()
  assert arch["num_heads"] == [int(keep[0].sum()), int(keep[2].sum())]
  assert arch["mlp_widths"] == [int(keep[1].sum()), int(keep[3].sum())]
  for block, heads in zip(small.blocks, arch["num_heads"]):
    assert block.attention.num_heads == heads
    if attention == "flax":
      assert block.attention.qkv_features == heads * HEAD_DIM
      assert block.attention.out.in_features == (heads, HEAD_DIM)
  # The small model is what its arch describes.
  rebuilt = models.from_arch(arch, rngs=nnx.Rngs(0))
  assert nnx.graphdef(rebuilt) == nnx.graphdef(small)
  del spec


@pytest.mark.parametrize("queries_per_kv", [1, 2])
@pytest.mark.parametrize("attention", FORMS)
def test_decoder_surgery_removes_kv_heads_exactly(attention, queries_per_kv):
  _, keep, small = _check_surgery(_lm(attention, queries_per_kv), _tokens(), seed=1)
  kv_heads = [int(keep[0].sum()), int(keep[2].sum())]
  assert small.arch()["num_kv_heads"] == kv_heads
  for block, kv in zip(small.blocks, kv_heads):
    assert (block.attention.num_kv_heads, block.attention.num_heads) == (
        kv, kv * queries_per_kv)


def _vit_macs(heads: list[int], mlp: list[int]) -> int:
  """MACs of the ViT for one image, by hand."""
  macs = TOKENS * PATCH * PATCH * DIM + DIM * CLASSES  # patch embedding, classifier
  for h, m in zip(heads, mlp):
    macs += 3 * TOKENS * DIM * h * HEAD_DIM  # q, k, v projections
    macs += 2 * h * TOKENS * TOKENS * HEAD_DIM  # q.k and p.v, per head
    macs += TOKENS * h * HEAD_DIM * DIM  # output projection
    macs += 2 * TOKENS * DIM * m  # MLP
  return macs


def _lm_macs(kv_heads: list[int], queries_per_kv: int, mlp: list[int]) -> int:
  """MACs of the decoder for one sequence, by hand (the embedding lookup costs none)."""
  macs = LENGTH * DIM * VOCAB
  for kv, m in zip(kv_heads, mlp):
    h = kv * queries_per_kv
    macs += LENGTH * DIM * (h + 2 * kv) * HEAD_DIM  # q, then k and v of the kv heads
    macs += 2 * h * LENGTH * LENGTH * HEAD_DIM  # q.k and p.v: every query head (masked too)
    macs += LENGTH * h * HEAD_DIM * DIM + 2 * LENGTH * DIM * m
  return macs


@pytest.mark.parametrize("attention", FORMS)
def test_vit_flops_of_the_small_model(attention):
  model, x = _vit(attention), _images(1)
  spec = dpm_jax.trace_groups(model, x)
  assert dpm_jax.spec_cost(spec).macs == _vit_macs(list(VIT_HEADS), list(MLP_WIDTHS))
  keep = _random_keep(spec, seed=2)
  small = dpm_jax.remove_channels(model, spec, keep)
  arch = small.arch()
  hand = _vit_macs(arch["num_heads"], arch["mlp_widths"])
  assert dpm_jax.count_flops(small, x).macs == dpm_jax.spec_cost(spec, keep).macs == hand
  # One block by hand, layer by layer: the attention contractions follow the kept heads.
  heads = arch["num_heads"][0]
  layers = [(l.name, l.macs) for l in dpm_jax.spec_cost(spec, keep).layers]
  block0 = layers[1:8]
  assert block0 == [
      ("blocks/0/attention/query/kernel", TOKENS * DIM * heads * HEAD_DIM),
      ("blocks/0/attention/key/kernel", TOKENS * DIM * heads * HEAD_DIM),
      ("blocks/0/attention/value/kernel", TOKENS * DIM * heads * HEAD_DIM),
      ("dot_general", heads * TOKENS * TOKENS * HEAD_DIM),  # q.k
      ("dot_general", heads * TOKENS * TOKENS * HEAD_DIM),  # p.v
      ("blocks/0/attention/out/kernel", TOKENS * heads * HEAD_DIM * DIM),
      ("blocks/0/mlp_in/kernel", TOKENS * DIM * arch["mlp_widths"][0]),
  ]


@pytest.mark.parametrize("attention", FORMS)
def test_decoder_flops_of_the_small_model(attention):
  model, tokens = _lm(attention, 2), _tokens(1)
  spec = dpm_jax.trace_groups(model, tokens)
  assert dpm_jax.spec_cost(spec).macs == _lm_macs(list(LM_KV_HEADS), 2, list(MLP_WIDTHS))
  keep = _random_keep(spec, seed=3)
  small = dpm_jax.remove_channels(model, spec, keep)
  hand = _lm_macs(small.arch()["num_kv_heads"], 2, small.arch()["mlp_widths"])
  assert dpm_jax.count_flops(small, tokens).macs == dpm_jax.spec_cost(spec, keep).macs == hand


class _StaleHeads(nnx.Module):
  """Attention that reshapes with a head count it stores: surgery cannot know it."""

  def __init__(self, rngs: nnx.Rngs):
    self.num_heads = 4
    self.q, self.k, self.v = (nnx.Linear(8, 16, rngs=rngs) for _ in range(3))
    self.out = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    q, k, v = (layer(x).reshape(*x.shape[:-1], self.num_heads, -1)
               for layer in (self.q, self.k, self.v))
    return x + self.out(jax.nn.dot_product_attention(q, k, v).reshape(x.shape[:-1] + (-1,)))


def _merged_heads_attention(v: dict, x: jax.Array) -> jax.Array:
  """Heads merged with the batch axis, ``[B * H, T, d]``, as older code writes attention."""
  b, t, _ = x.shape
  heads = v["q"].shape[1] // HEAD_DIM

  def split(y):
    return y.reshape(b, t, heads, HEAD_DIM).transpose(0, 2, 1, 3).reshape(b * heads, t, -1)

  q, k, w = split(x @ v["q"]), split(x @ v["k"]), split(x @ v["v"])
  p = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / jnp.sqrt(HEAD_DIM), axis=-1)
  out = jnp.einsum("nts,nsd->ntd", p, w).reshape(b, heads, t, -1).transpose(0, 2, 1, 3)
  return (x + out.reshape(b, t, -1) @ v["o"]).mean(1)


def test_heads_merged_with_the_batch_axis_are_heads():
  rng = np.random.default_rng(0)
  v = {name: jnp.asarray(rng.normal(size=(DIM, 4 * HEAD_DIM)), jnp.float32) for name in "qkv"}
  v["o"] = jnp.asarray(rng.normal(size=(4 * HEAD_DIM, DIM)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 5, DIM)), jnp.float32)
  spec = dpm_jax.trace_groups_fn(_merged_heads_attention, v, x[:1])
  assert spec.sizes == (4,)
  keep = [np.array([True, False, True, False])]
  small = dpm_jax.remove_channels_fn(v, spec, keep)
  assert small["q"].shape == small["v"].shape == (DIM, 2 * HEAD_DIM)
  masked = dpm_jax.zero_channels(v, spec, keep)
  np.testing.assert_allclose(_merged_heads_attention(small, x),
                             _merged_heads_attention(masked, x), atol=1e-5, rtol=1e-5)


def test_heads_of_a_fused_qkv_projection_are_kept_whole_with_a_reason():
  def block(v, x):
    b, t, _ = x.shape
    q, k, w = (y.reshape(b, t, -1, HEAD_DIM) for y in jnp.split(x @ v["qkv"], 3, axis=-1))
    h = x + jax.nn.dot_product_attention(q, k, w).reshape(b, t, -1) @ v["o"]
    return jax.nn.relu(h @ v["up"]) @ v["down"]

  v = {"qkv": jnp.ones((DIM, 3 * 4 * HEAD_DIM)), "o": jnp.ones((4 * HEAD_DIM, DIM)),
       "up": jnp.ones((DIM, 12)), "down": jnp.ones((12, 3))}
  spec = dpm_jax.trace_groups_fn(block, v, jnp.zeros((1, 5, DIM)))
  assert spec.sizes == (12,)  # the MLP only
  assert (f"qkv axis 1 ({3 * 4 * HEAD_DIM} channels): one channel sits at several places of "
          "this axis") in str(spec)


def test_a_stored_head_count_is_refused():
  model = _StaleHeads(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  spec = dpm_jax.trace_groups(model, x)
  assert spec.sizes == (4,)  # the heads
  with pytest.raises(TypeError, match="_StaleHeads at the top holds num_heads"):
    dpm_jax.remove_channels(model, spec, [np.array([True, False, True, True])])


def test_a_resizer_makes_a_stored_head_count_right():
  def resize(module):
    module.num_heads = module.out.in_features // 4

  dpm_jax.register_module_resizer(_StaleHeads, resize)
  try:
    model = _StaleHeads(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    spec = dpm_jax.trace_groups(model, x)
    small = dpm_jax.remove_channels(model, spec, [np.array([True, False, True, True])],
                                    sample=x)
    assert small.num_heads == 3 and small.q.out_features == 12
  finally:
    del dpm_jax.surgery._RESIZERS[_StaleHeads]  # pylint: disable=protected-access


# ml_collections loads config files with the deprecated `load_module`.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_digits_vit_dpm_config_runs_end_to_end(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  # The config, shortened: 2 pretrain epochs, 4 prune epochs (3 events), 1 fine-tune epoch.
  argv = ["main", "--config=configs/digits_vit_dpm.py", "--config.num_epochs=2",
          "--config.pruning.epochs=4", "--config.pruning.end_epoch=2",
          "--config.pruning.num_events=3", "--config.pruning.decay_steps=20",
          "--config.pruning.cooldown=20", "--config.pruning.finetune_epochs=1",
          "--config.progress_bar=False", "--config.compilation_cache=",
          f"--config.data_dir={tmp_path / 'data'}", f"--workdir={workdir}"]
  compiled_ahead = []  # Every step compiled in the background, as the run makes them.
  init = loop.BackgroundCompiledStep.__init__

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    compiled_ahead.append(self)

  monkeypatch.setattr(loop.BackgroundCompiledStep, "__init__", recording_init)
  monkeypatch.setattr(sys, "argv", argv)  # Where config_flags reads `--config.*` overrides.
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    main_lib.main(main_lib.parse_flags(argv))

  # The prune step (the transform inside it) compiled once, ahead of its phase, and that
  # compile is what ran through every event, decay and release; so did the fine-tune step.
  assert len(compiled_ahead) == 2
  for step in compiled_ahead:
    assert step._compiled is not None and step._use is step._compiled  # pylint: disable=protected-access
  result = json.loads((workdir / "result.json").read_text())
  assert abs(result["flops_ratio"] - 0.5) <= 0.01
  assert result["surgery_max_abs_diff"] < 1e-4
  report = (workdir / "report.md").read_text()
  assert "| 0 | `blocks/0/attention/query/kernel` | 4 |" in report
  assert "| 1 | `blocks/0/mlp_in/kernel` | 64 |" in report
  # The exported model is the smaller transformer, its head counts as surgery left them.
  small = checkpoint.load_model(workdir / "export")
  arch = small.arch()
  assert sum(arch["num_heads"]) + sum(arch["mlp_widths"]) < 4 + 4 + 64 + 64
  assert [b.attention.num_heads for b in small.blocks] == arch["num_heads"]


# DepGraph + DPM: the command-line run above.
@pytest.mark.parametrize("method, options", [
    ("otov2", {"removal": "dpm", "decay_steps": 2, "min_decay_steps": 1, "cooldown": 2}),
    ("sfp", {}),
    ("psap", {}),
])
def test_every_method_prunes_heads_with_one_compile(method, options):
  model = models.create_model("digits_vit", num_classes=CLASSES, rngs=nnx.Rngs(0), dim=8,
                              num_heads=(4,), head_dim=HEAD_DIM, mlp_widths=(8,))
  x, y = _images(8), jnp.arange(8) % CLASSES
  spec = dpm_jax.trace_groups(model, x[:1])
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  recipe = dpm_jax.recipes.PRESETS[method](0.5, start_step=0, end_step=4, **options)
  tx = dpm_jax.prune(optax.adam(1e-2), spec, recipe)

  def loss(p):
    logits = nnx.merge(graphdef, p, copy=True)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  state = tx.init(params)
  for _ in range(recipe.last_step + 2):
    params, state = step(params, state)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  params, keep = dpm_jax.finalize(params, state, spec)
  assert dpm_jax.spec_cost(spec, keep).macs <= 0.5 * dpm_jax.spec_cost(spec).macs
  small = dpm_jax.remove_channels(nnx.merge(graphdef, params, copy=True), spec, keep, sample=x)
  assert small.arch()["num_heads"] == [int(keep[0].sum())]
