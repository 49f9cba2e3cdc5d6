"""VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman 2015, BN after every conv).

References:
  Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition", ICLR 2015. https://arxiv.org/abs/1409.1556
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from dpm_jax.models.layers import ConvBN, check_widths, in_width, out_width

VGG_IMAGE_SIZE = 32
VGG_IN_CHANNELS = 3
# Convs per stage; every stage ends with a 2x2 max pool.
VGG16_STAGE_DEPTHS = (2, 2, 3, 3, 3)
VGG16_CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_DENSE_WIDTHS = (512,)
POOL_SIZE = 2


class VGG16BN(nnx.Module):
  """VGG-16-BN: 13 conv 3x3 + BN + relu in five pooled stages, then dense layers.

  The classifier is flatten (1x1x512 at 32x32 input), dense 512->512 + relu, dense
  512->num_classes; with 10 classes that is 14.99M parameters. ``dense_widths=()`` gives
  the common single-dense-layer CIFAR variant (14.72M).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: VGG16BN(num_classes=10, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      conv_widths: Sequence[int] = VGG16_CONV_WIDTHS,
      dense_widths: Sequence[int] = VGG16_DENSE_WIDTHS,
      in_channels: int = VGG_IN_CHANNELS,
      image_size: int = VGG_IMAGE_SIZE,
      rngs: nnx.Rngs,
  ):
    check_widths("conv_widths", conv_widths, sum(VGG16_STAGE_DEPTHS))
    self.image_size = image_size
    widths_in = (in_channels, *conv_widths[:-1])
    self.convs = nnx.List([
        ConvBN(w_in, w_out, 3, rngs=rngs)
        for w_in, w_out in zip(widths_in, conv_widths)
    ])
    pooled_size = image_size // POOL_SIZE ** len(VGG16_STAGE_DEPTHS)
    flat_features = pooled_size * pooled_size * conv_widths[-1]
    widths_in = (flat_features, *dense_widths)
    self.dense = nnx.List([
        nnx.Linear(w_in, w_out, rngs=rngs)
        for w_in, w_out in zip(widths_in, dense_widths)
    ])
    self.head = nnx.Linear(widths_in[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    convs = iter(self.convs)
    for depth in VGG16_STAGE_DEPTHS:
      for _ in range(depth):
        x = jax.nn.relu(next(convs)(x))
      x = nnx.max_pool(x, (POOL_SIZE, POOL_SIZE), strides=(POOL_SIZE, POOL_SIZE))
    x = x.reshape(x.shape[0], -1)
    for dense in self.dense:
      x = jax.nn.relu(dense(x))
    return self.head(x)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return {
        "name": "vgg16_bn",
        "num_classes": out_width(self.head),
        "conv_widths": [out_width(conv) for conv in self.convs],
        "dense_widths": [out_width(dense) for dense in self.dense],
        "in_channels": in_width(self.convs[0]),
        "image_size": self.image_size,
    }
