"""The plain convolutional network shared by the digits CNN, VGG and the MNIST-1D CNN:
pooled conv stages, a flatten and dense layers, on images or (``spatial_dims=1``)
sequences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from dpm_jax.models.layers import ConvBN, in_width, out_width

# Every stage ends with a max pool of 2 along each spatial axis.
POOL_SIZE = 2


class PooledCNN(nnx.Module):
  """Stages of conv (3x3 by default) + BN + relu, each closed by a 2x2 max pool; then a
  flatten (NHWC order) into dense layers + relu, and a dense head.

  With ``spatial_dims=1`` the same network runs on sequences ``[B, L, C]`` (``image_size``
  is then the length L): 1D convs of ``kernel_size``, max pools of 2, a flatten in NLC
  order.

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
      kernel_size: int = 3,
      spatial_dims: int = 2,
      rngs: nnx.Rngs,
  ):
    self.image_size = image_size
    self.stage_depths = tuple(stage_depths)
    self.spatial_dims = spatial_dims
    widths_in = (in_channels, *conv_widths[:-1])
    self.convs = nnx.List([
        ConvBN(w_in, w_out, kernel_size, spatial_dims=spatial_dims, rngs=rngs)
        for w_in, w_out in zip(widths_in, conv_widths)
    ])
    pooled_size = image_size // POOL_SIZE ** len(self.stage_depths)
    flat_features = pooled_size ** spatial_dims * conv_widths[-1]
    widths_in = (flat_features, *dense_widths)
    self.dense = nnx.List([
        nnx.Linear(w_in, w_out, rngs=rngs)
        for w_in, w_out in zip(widths_in, dense_widths)
    ])
    self.head = nnx.Linear(widths_in[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    convs = iter(self.convs)
    window = (POOL_SIZE,) * self.spatial_dims
    for depth in self.stage_depths:
      for _ in range(depth):
        x = jax.nn.relu(next(convs)(x))
      x = nnx.max_pool(x, window, strides=window)
    x = x.reshape(x.shape[0], -1)
    for dense in self.dense:
      x = jax.nn.relu(dense(x))
    return self.head(x)

  def _arch(self, name: str, size_name: str = "image_size") -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays; the
    subclass's constructor takes ``image_size`` as ``size_name``."""
    return {
        "name": name,
        "num_classes": out_width(self.head),
        "conv_widths": [out_width(conv) for conv in self.convs],
        "dense_widths": [out_width(dense) for dense in self.dense],
        "in_channels": in_width(self.convs[0]),
        size_name: self.image_size,
    }
