"""A 1D CNN for MNIST-1D, in the manner of the benchmark's reference CNN.

References:
  Greydanus, Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024.
  https://arxiv.org/abs/2011.14439
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from dpm_jax.models.pooled_cnn import PooledCNN

MNIST1D_LENGTH = 40
MNIST1D_IN_CHANNELS = 1
MNIST1D_KERNEL_SIZE = 5
MNIST1D_CONV_WIDTHS = (32, 64, 64)
MNIST1D_DENSE_WIDTHS = ()


class Mnist1DCNN(PooledCNN):
  """Conv1D (kernel 5) + BN + relu layers, each followed by a max pool of 2, then a flatten
  and a dense head.

  With the defaults: conv 1->32, pool to length 20, conv 32->64, pool to 10, conv 64->64,
  pool to 5, flatten (NLC order, 5 x 64 = 320) into dense 320->num_classes; 34,410
  parameters and 419,200 MACs per sequence. It follows the benchmark's reference CNN (three
  Conv1D + relu layers of 25 channels, each with stride 2, flattened into one dense layer);
  the widths, BatchNorm and max pooling instead of strides are ours.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = Mnist1DCNN(num_classes=10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((4, 40, 1))).shape
    (4, 10)
    >>> model.arch()["conv_widths"], model.arch()["length"]
    ([32, 64, 64], 40)
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      conv_widths: Sequence[int] = MNIST1D_CONV_WIDTHS,
      dense_widths: Sequence[int] = MNIST1D_DENSE_WIDTHS,
      in_channels: int = MNIST1D_IN_CHANNELS,
      length: int = MNIST1D_LENGTH,
      rngs: nnx.Rngs,
  ):
    if not conv_widths:
      raise ValueError("conv_widths needs at least one entry")
    super().__init__(num_classes, conv_widths=conv_widths, dense_widths=dense_widths,
                     stage_depths=(1,) * len(conv_widths), in_channels=in_channels,
                     image_size=length, kernel_size=MNIST1D_KERNEL_SIZE, spatial_dims=1,
                     rngs=rngs)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return self._arch("mnist1d_cnn", size_name="length")
