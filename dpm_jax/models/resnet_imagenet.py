"""ResNet-50 for ImageNet, torchvision's layout (v1.5: the stride sits on the 3x3 conv).

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
  https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpm_jax.models.layers import ConvBN, check_widths, in_width, out_width

RESNET50_IN_CHANNELS = 3
RESNET50_STEM_WIDTH = 64
RESNET50_STEM_KERNEL = 7
RESNET50_POOL_WINDOW = 3
RESNET50_STAGE_DEPTHS = (3, 4, 6, 3)
RESNET50_STAGE_STRIDES = (1, 2, 2, 2)
RESNET50_INNER_WIDTHS = (64, 128, 256, 512)
RESNET50_EXPANSION = 4
# Residual stream width of each stage.
RESNET50_STAGE_WIDTHS = tuple(RESNET50_EXPANSION * w for w in RESNET50_INNER_WIDTHS)


def resnet50_block_widths() -> list[list[list[int]]]:
  """The standard inner widths: ``[w, w]`` for the 1x1 and 3x3 conv of every block.

  Example:
    >>> resnet50_block_widths()[0]
    [[64, 64], [64, 64], [64, 64]]
  """
  return [
      [[width, width] for _ in range(depth)]
      for width, depth in zip(RESNET50_INNER_WIDTHS, RESNET50_STAGE_DEPTHS)
  ]


class Bottleneck(nnx.Module):
  """1x1 + BN + relu, 3x3 (strided) + BN + relu, 1x1 + BN, residual add, relu.

  ``projection`` adds a strided 1x1 conv + BN on the shortcut.
  """

  def __init__(
      self,
      in_features: int,
      widths: Sequence[int],
      out_features: int,
      *,
      strides: int,
      projection: bool,
      rngs: nnx.Rngs,
  ):
    width1, width2 = widths
    self.conv1 = ConvBN(in_features, width1, 1, rngs=rngs)
    self.conv2 = ConvBN(width1, width2, 3, strides=strides, rngs=rngs)
    self.conv3 = ConvBN(width2, out_features, 1, rngs=rngs)
    self.shortcut = (
        ConvBN(in_features, out_features, 1, strides=strides, rngs=rngs)
        if projection
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x if self.shortcut is None else self.shortcut(x)
    y = jax.nn.relu(self.conv1(x))
    y = jax.nn.relu(self.conv2(y))
    return jax.nn.relu(self.conv3(y) + residual)


class ResNet50(nnx.Module):
  """ResNet-50: 7x7/2 stem + BN + relu + 3x3/2 max pool, bottleneck stages [3, 4, 6, 3].

  Widths: ``stem_width``; ``stage_widths[s]``, the residual stream of stage ``s``;
  ``block_widths[s][b] = [w1, w2]``, the outputs of the 1x1 and 3x3 convs of block ``b``.
  The first block of every stage has a projection shortcut. 25.56M parameters with 1000
  classes.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: ResNet50(num_classes=1000, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 224, 224, 3))).shape
    (1, 1000)
  """

  def __init__(
      self,
      num_classes: int = 1000,
      *,
      stem_width: int = RESNET50_STEM_WIDTH,
      stage_widths: Sequence[int] = RESNET50_STAGE_WIDTHS,
      block_widths: Sequence[Sequence[Sequence[int]]] | None = None,
      in_channels: int = RESNET50_IN_CHANNELS,
      rngs: nnx.Rngs,
  ):
    if block_widths is None:
      block_widths = resnet50_block_widths()
    num_stages = len(RESNET50_STAGE_DEPTHS)
    check_widths("stage_widths", stage_widths, num_stages)
    check_widths("block_widths", block_widths, num_stages)
    for s, depth in enumerate(RESNET50_STAGE_DEPTHS):
      check_widths(f"block_widths[{s}]", block_widths[s], depth)
      for b, widths in enumerate(block_widths[s]):
        check_widths(f"block_widths[{s}][{b}]", widths, 2)

    self.stem = ConvBN(
        in_channels, stem_width, RESNET50_STEM_KERNEL, strides=2, rngs=rngs
    )
    stages = []
    width_in = stem_width
    for width_out, stage_block_widths, stride in zip(
        stage_widths, block_widths, RESNET50_STAGE_STRIDES
    ):
      blocks = []
      for b, widths in enumerate(stage_block_widths):
        blocks.append(
            Bottleneck(
                width_in,
                widths,
                width_out,
                strides=stride if b == 0 else 1,
                # By position, never by comparing widths: pruning that happens to make
                # two widths equal must not drop a projection.
                projection=b == 0,
                rngs=rngs,
            )
        )
        width_in = width_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(width_in, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem(x))
    pad = RESNET50_POOL_WINDOW // 2
    x = nnx.max_pool(
        x,
        (RESNET50_POOL_WINDOW, RESNET50_POOL_WINDOW),
        strides=(2, 2),
        padding=((pad, pad), (pad, pad)),
    )
    for stage in self.stages:
      for block in stage:
        x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return {
        "name": "resnet50",
        "num_classes": out_width(self.head),
        "stem_width": out_width(self.stem),
        "stage_widths": [out_width(stage[0].conv3) for stage in self.stages],
        "block_widths": [
            [[out_width(block.conv1), out_width(block.conv2)] for block in stage]
            for stage in self.stages
        ],
        "in_channels": in_width(self.stem),
    }
