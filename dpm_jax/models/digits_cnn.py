"""A small CNN for scikit-learn's 8x8 handwritten digits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from dpm_jax.models.layers import ConvBN, in_width, out_width

DIGITS_IMAGE_SIZE = 8
DIGITS_IN_CHANNELS = 1
DIGITS_CONV_WIDTHS = (32, 64)
DIGITS_DENSE_WIDTHS = (128,)
# One 2x2 max pool after the last conv.
POOL_SIZE = 2


class DigitsCNN(nnx.Module):
  """Convs (3x3 + BN + relu), a 2x2 max pool, a flatten and dense layers.

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
    self.image_size = image_size
    widths_in = (in_channels, *conv_widths[:-1])
    self.convs = nnx.List([
        ConvBN(w_in, w_out, 3, rngs=rngs)
        for w_in, w_out in zip(widths_in, conv_widths)
    ])
    pooled_size = image_size // POOL_SIZE
    flat_features = pooled_size * pooled_size * conv_widths[-1]
    widths_in = (flat_features, *dense_widths)
    self.dense = nnx.List([
        nnx.Linear(w_in, w_out, rngs=rngs)
        for w_in, w_out in zip(widths_in, dense_widths)
    ])
    self.head = nnx.Linear(widths_in[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    x = nnx.max_pool(x, (POOL_SIZE, POOL_SIZE), strides=(POOL_SIZE, POOL_SIZE))
    x = x.reshape(x.shape[0], -1)
    for dense in self.dense:
      x = jax.nn.relu(dense(x))
    return self.head(x)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return {
        "name": "digits_cnn",
        "num_classes": out_width(self.head),
        "conv_widths": [out_width(conv) for conv in self.convs],
        "dense_widths": [out_width(dense) for dense in self.dense],
        "in_channels": in_width(self.convs[0]),
        "image_size": self.image_size,
    }
