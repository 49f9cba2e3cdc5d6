"""Building blocks shared by the model zoo: conv + BatchNorm and width read-back.

All models initialise like torchvision: conv kernels He-normal with fan-out, BatchNorm
scale 1 and bias 0, PyTorch's BatchNorm momentum 0.1 and epsilon 1e-5. Dense layers keep
flax's default (LeCun normal) initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

# NNX's `momentum` weighs the old running average: 0.9 here is PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out),
# fan_out = kh * kw * out_channels (k * out_channels in 1D); a depthwise kernel (kh, kw, 1, C)
# gets kh * kw * C in both frameworks.
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBN(nnx.Module):
  """A bias-free square (cubic, ...) convolution followed by BatchNorm; no activation.

  Padding is ``kernel_size // 2`` on every side (PyTorch's convention), not ``'SAME'``,
  so strided convolutions see the same pixels as in torchvision. ``spatial_dims`` is 2 for
  images ``[B, H, W, C]`` and 1 for sequences ``[B, L, C]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = nnx.eval_shape(lambda: ConvBN(3, 8, 3, strides=2, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x), layer, jnp.ones((2, 32, 32, 3))).shape
    (2, 16, 16, 8)
    >>> layer = nnx.eval_shape(lambda: ConvBN(1, 8, 5, spatial_dims=1, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x), layer, jnp.ones((2, 40, 1))).shape
    (2, 40, 8)
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      *,
      strides: int = 1,
      feature_group_count: int = 1,
      spatial_dims: int = 2,
      rngs: nnx.Rngs,
  ):
    pad = kernel_size // 2
    self.conv = nnx.Conv(
        in_features,
        out_features,
        (kernel_size,) * spatial_dims,
        strides=strides,
        padding=((pad, pad),) * spatial_dims,
        feature_group_count=feature_group_count,
        use_bias=False,
        kernel_init=conv_kernel_init,
        rngs=rngs,
    )
    self.bn = nnx.BatchNorm(
        out_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


def out_width(layer: nnx.Conv | nnx.Linear | ConvBN) -> int:
  """Output features of a layer, read from its kernel's current shape.

  Architectures are read back from the arrays, which surgery slices, so ``arch()`` always
  describes the model as it is now.
  """
  if isinstance(layer, ConvBN):
    layer = layer.conv
  return int(layer.kernel.shape[-1])


def in_width(layer: nnx.Conv | nnx.Linear | ConvBN) -> int:
  """Input features of a dense or ungrouped conv layer, read from its kernel's shape."""
  if isinstance(layer, ConvBN):
    layer = layer.conv
  return int(layer.kernel.shape[-2])


def check_widths(name: str, widths: Sequence, expected_len: int) -> None:
  """Raises a ValueError unless ``widths`` has ``expected_len`` entries."""
  if len(widths) != expected_len:
    raise ValueError(
        f"{name} needs {expected_len} entries, got {len(widths)}: {widths}"
    )
