"""The plain convolutional network shared by the digits CNN and VGG: pooled conv stages,
a flatten and dense layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from dpm_jax.models.layers import ConvBN, in_width, out_width

# Every stage ends with a 2x2 max pool.
POOL_SIZE = 2


class PooledCNN(nnx.Module):
  """Stages of 3x3 conv + BN + relu, each closed by a 2x2 max pool; then a flatten (NHWC
  order) into dense layers + relu, and a dense head.

  Subclasses fix the registry name and the stage layout; their ``arch()`` is
  ``self._arch(name)``.
  """

  def __init__(
      self,
      num_classes: int,
      *,
      conv_widths: Sequence[int],
      dense_widths: Sequence[int],
      stage_depths: Sequence[int],
      in_channels: int,
      image_size: int,
      rngs: nnx.Rngs,
  ):
    self.image_size = image_size
    self.stage_depths = tuple(stage_depths)
    widths_in = (in_channels, *conv_widths[:-1])
    self.convs = nnx.List([
        ConvBN(w_in, w_out, 3, rngs=rngs)
        for w_in, w_out in zip(widths_in, conv_widths)
    ])
    pooled_size = image_size // POOL_SIZE ** len(self.stage_depths)
    flat_features = pooled_size * pooled_size * conv_widths[-1]
    widths_in = (flat_features, *dense_widths)
    self.dense = nnx.List([
        nnx.Linear(w_in, w_out, rngs=rngs)
        for w_in, w_out in zip(widths_in, dense_widths)
    ])
    self.head = nnx.Linear(widths_in[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    convs = iter(self.convs)
    for depth in self.stage_depths:
      for _ in range(depth):
        x = jax.nn.relu(next(convs)(x))
      x = nnx.max_pool(x, (POOL_SIZE, POOL_SIZE), strides=(POOL_SIZE, POOL_SIZE))
    x = x.reshape(x.shape[0], -1)
    for dense in self.dense:
      x = jax.nn.relu(dense(x))
    return self.head(x)

  def _arch(self, name: str) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return {
        "name": name,
        "num_classes": out_width(self.head),
        "conv_widths": [out_width(conv) for conv in self.convs],
        "dense_widths": [out_width(dense) for dense in self.dense],
        "in_channels": in_width(self.convs[0]),
        "image_size": self.image_size,
    }
