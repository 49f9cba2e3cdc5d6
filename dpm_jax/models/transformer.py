"""Transformers whose attention heads and MLP units are prunable: a ViT and a decoder LM.

Attention comes in three forms, chosen by ``attention``: ``'einsum'`` (written by hand:
``einsum``, ``softmax``), ``'jax'`` (``jax.nn.dot_product_attention``) and ``'flax'``
(``nnx.MultiHeadAttention``). The first two split their projections into heads with a
reshape to ``(..., heads, head_dim)``; the third holds the head axis in its kernels. Either
way ``dpm_jax.trace_groups`` finds one channel per head (per key/value head and the query
heads that share it, under grouped-query attention) and one per MLP unit. The residual
stream stays whole: LayerNorm's statistics mix its channels.

Head counts are read from the projections' kernels, so a model whose heads were removed
describes itself (``arch()``) and runs as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpm_jax.models.layers import check_widths, out_width

ATTENTION_FORMS = ("einsum", "jax", "flax")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
  """Scaled dot-product attention written by hand, grouped-query aware.

  ``q`` is ``[B, T, H, d]``; ``k`` and ``v`` are ``[B, S, K, d]`` with ``H`` a multiple of
  ``K``: query heads ``g * (H // K)`` to ``(g + 1) * (H // K) - 1`` share key/value head
  ``g`` (as in ``jax.nn.dot_product_attention``). Returns ``[B, T, H, d]``.

  Example:
    >>> q = jnp.ones((1, 3, 4, 8)); kv = jnp.ones((1, 3, 2, 8))
    >>> attend(q, kv, kv, causal=True).shape
    (1, 3, 4, 8)
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / jnp.sqrt(d).astype(q.dtype)
  if causal:
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, h, d)


class Attention(nnx.Module):
  """Multi-head self-attention whose projections are split into heads by a reshape.

  The head counts are not stored: they are read from the kernels (``num_heads``,
  ``num_kv_heads``), so surgery that removes heads leaves nothing stale.

  Example:
    >>> layer = Attention(16, num_heads=4, head_dim=8, num_kv_heads=2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 5, 16))).shape, layer.num_heads, layer.num_kv_heads
    ((2, 5, 16), 4, 2)
  """

  def __init__(self, dim: int, *, num_heads: int, head_dim: int,
               num_kv_heads: int | None = None, causal: bool = False,
               fused: bool = False, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads "
                       f"({num_kv_heads})")
    self.head_dim = head_dim
    self.causal = causal
    self.fused = fused  # jax.nn.dot_product_attention instead of `attend`
    self.query = nnx.Linear(dim, num_heads * head_dim, rngs=rngs)
    self.key = nnx.Linear(dim, num_kv_heads * head_dim, rngs=rngs)
    self.value = nnx.Linear(dim, num_kv_heads * head_dim, rngs=rngs)
    self.out = nnx.Linear(num_heads * head_dim, dim, rngs=rngs)

  @property
  def num_heads(self) -> int:
    return out_width(self.query) // self.head_dim

  @property
  def num_kv_heads(self) -> int:
    return out_width(self.key) // self.head_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    split = lambda t: t.reshape(*t.shape[:-1], -1, self.head_dim)  # [B, T, heads, head_dim]
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    if self.fused:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
    else:
      out = attend(q, k, v, causal=self.causal)
    return self.out(out.reshape(*out.shape[:-2], -1))


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attention(ln(x))``, then ``x + mlp(ln(x))``.

  ``attention`` is one of ``ATTENTION_FORMS``. The MLP is ``Linear(dim, mlp_width)``, GELU,
  ``Linear(mlp_width, dim)``.
  """

  def __init__(self, dim: int, *, num_heads: int, head_dim: int, mlp_width: int,
               num_kv_heads: int | None = None, causal: bool = False,
               attention: str = "einsum", rngs: nnx.Rngs):
    if attention not in ATTENTION_FORMS:
      raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    self.causal = causal
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    if attention == "flax":
      self.attention = nnx.MultiHeadAttention(
          num_heads, dim, qkv_features=num_heads * head_dim, num_kv_heads=num_kv_heads,
          decode=False, rngs=rngs)
    else:
      self.attention = Attention(dim, num_heads=num_heads, head_dim=head_dim,
                                 num_kv_heads=num_kv_heads, causal=causal,
                                 fused=attention == "jax", rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_width, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_width, dim, rngs=rngs)

  @property
  def form(self) -> str:
    if isinstance(self.attention, nnx.MultiHeadAttention):
      return "flax"
    return "jax" if self.attention.fused else "einsum"

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.norm1(x)
    if isinstance(self.attention, nnx.MultiHeadAttention):
      x = x + self.attention(h, is_causal=self.causal)
    else:
      x = x + self.attention(h)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))

  def widths(self) -> dict[str, int]:
    """The block's prunable widths, read from its arrays."""
    return {"num_heads": int(self.attention.num_heads),
            "num_kv_heads": int(self.attention.num_kv_heads),
            "mlp_width": out_width(self.mlp_in)}


DIGITS_VIT_DIM = 32
DIGITS_VIT_HEADS = (4, 4)
DIGITS_VIT_HEAD_DIM = 8
DIGITS_VIT_MLP_WIDTHS = (64, 64)


class DigitsViT(nnx.Module):
  """A small vision transformer for the 8x8 digits: patches, pre-norm blocks, mean pool.

  With the defaults: 2x2 patches (16 tokens) embedded to 32 by a strided conv, learned
  position embeddings, two blocks of 4 heads of size 8 and an MLP of 64 units, a final
  LayerNorm, the mean over tokens and a linear head; 26k parameters. ``num_heads`` and
  ``mlp_widths`` give one entry per block.

  Example:
    >>> model = DigitsViT(num_classes=10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    >>> model.arch()["num_heads"], model.arch()["mlp_widths"]
    ([4, 4], [64, 64])
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      dim: int = DIGITS_VIT_DIM,
      num_heads: Sequence[int] = DIGITS_VIT_HEADS,
      head_dim: int = DIGITS_VIT_HEAD_DIM,
      mlp_widths: Sequence[int] = DIGITS_VIT_MLP_WIDTHS,
      attention: str = "einsum",
      patch_size: int = 2,
      image_size: int = 8,
      in_channels: int = 1,
      rngs: nnx.Rngs,
  ):
    check_widths("mlp_widths", mlp_widths, len(num_heads))
    if image_size % patch_size:
      raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
    self.num_classes = num_classes
    self.patch_size = patch_size
    self.image_size = image_size
    self.in_channels = in_channels
    self.head_dim = head_dim
    self.patches = nnx.Conv(in_channels, dim, (patch_size, patch_size),
                            strides=patch_size, padding="VALID", rngs=rngs)
    tokens = (image_size // patch_size) ** 2
    self.position = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([
        Block(dim, num_heads=h, head_dim=head_dim, mlp_width=w, attention=attention,
              rngs=rngs) for h, w in zip(num_heads, mlp_widths)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.patches(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...]
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(self.norm(x), axis=1))

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    widths = [b.widths() for b in self.blocks]
    return {"name": "digits_vit", "num_classes": self.num_classes,
            "dim": out_width(self.patches), "num_heads": [w["num_heads"] for w in widths],
            "head_dim": self.head_dim, "mlp_widths": [w["mlp_width"] for w in widths],
            "attention": self.blocks[0].form, "patch_size": self.patch_size,
            "image_size": self.image_size, "in_channels": self.in_channels}


class DecoderLM(nnx.Module):
  """A small decoder-only language model: causal pre-norm blocks, optional grouped queries.

  ``num_classes`` is the vocabulary size. Block ``i`` has ``num_kv_heads[i]`` key/value
  heads, each shared by ``queries_per_kv`` query heads (1: multi-head attention; more:
  grouped-query attention; ``num_kv_heads = 1``: multi-query). Pruning removes a key/value
  head together with its query heads, so ``queries_per_kv`` never changes. Token and
  learned position embeddings in, a final LayerNorm and a linear read-out to logits
  ``[B, T, vocab]``.

  Example:
    >>> model = DecoderLM(num_classes=64, queries_per_kv=2, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 64)
    >>> model.arch()["num_kv_heads"]
    [2, 2]
  """

  def __init__(
      self,
      num_classes: int = 64,
      *,
      dim: int = 32,
      num_kv_heads: Sequence[int] = (2, 2),
      queries_per_kv: int = 1,
      head_dim: int = 8,
      mlp_widths: Sequence[int] = (64, 64),
      attention: str = "einsum",
      max_length: int = 16,
      rngs: nnx.Rngs,
  ):
    check_widths("mlp_widths", mlp_widths, len(num_kv_heads))
    self.num_classes = num_classes
    self.queries_per_kv = queries_per_kv
    self.head_dim = head_dim
    self.max_length = max_length
    self.embed = nnx.Embed(num_classes, dim, rngs=rngs)
    self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_length, dim)))
    self.blocks = nnx.List([
        Block(dim, num_heads=kv * queries_per_kv, head_dim=head_dim, mlp_width=w,
              num_kv_heads=kv, causal=True, attention=attention, rngs=rngs)
        for kv, w in zip(num_kv_heads, mlp_widths)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[:tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    widths = [b.widths() for b in self.blocks]
    return {"name": "decoder_lm", "num_classes": self.num_classes,
            "dim": int(self.embed.embedding.shape[-1]),
            "num_kv_heads": [w["num_kv_heads"] for w in widths],
            "queries_per_kv": self.queries_per_kv, "head_dim": self.head_dim,
            "mlp_widths": [w["mlp_width"] for w in widths],
            "attention": self.blocks[0].form, "max_length": self.max_length}
