"""A small CNN for scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from dpm_jax.models.pooled_cnn import PooledCNN

DIGITS_IMAGE_SIZE = 8
DIGITS_IN_CHANNELS = 1
DIGITS_CONV_WIDTHS = (32, 64)
DIGITS_DENSE_WIDTHS = (128,)


class DigitsCNN(PooledCNN):
  """Convs (3x3 + BN + relu) in one stage, a 2x2 max pool, a flatten and dense layers.

  With the defaults: conv 1->32, conv 32->64, max pool to 4x4x64, flatten (NHWC order) into
  dense 1024->128 + relu, dense 128->num_classes; 0.15M parameters. The flatten into a dense
  layer is deliberate: it is the case where one channel maps to several dense rows.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = DigitsCNN(num_classes=10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 8, 8, 1))).shape
    (4, 10)
    >>> model.arch()["conv_widths"]
    [32, 64]
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      conv_widths: Sequence[int] = DIGITS_CONV_WIDTHS,
      dense_widths: Sequence[int] = DIGITS_DENSE_WIDTHS,
      in_channels: int = DIGITS_IN_CHANNELS,
      image_size: int = DIGITS_IMAGE_SIZE,
      rngs: nnx.Rngs,
  ):
    if not conv_widths:
      raise ValueError("conv_widths needs at least one entry")
    super().__init__(num_classes, conv_widths=conv_widths, dense_widths=dense_widths,
                     stage_depths=(len(conv_widths),), in_channels=in_channels,
                     image_size=image_size, rngs=rngs)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return self._arch("digits_cnn")
