"""VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman 2015, BN after every conv).

References:
  Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition", ICLR 2015. https://arxiv.org/abs/1409.1556
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from dpm_jax.models.layers import check_widths
from dpm_jax.models.pooled_cnn import PooledCNN

VGG_IMAGE_SIZE = 32
VGG_IN_CHANNELS = 3
# Convs per stage; every stage ends with a 2x2 max pool.
VGG16_STAGE_DEPTHS = (2, 2, 3, 3, 3)
VGG16_CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_DENSE_WIDTHS = (512,)


class VGG16BN(PooledCNN):
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
    super().__init__(num_classes, conv_widths=conv_widths, dense_widths=dense_widths,
                     stage_depths=VGG16_STAGE_DEPTHS, in_channels=in_channels,
                     image_size=image_size, rngs=rngs)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return self._arch("vgg16_bn")
