"""ResNet-20/56/110 for CIFAR (He et al. 2016, section 4.2), projection shortcuts.

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.
  https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from dpm_jax.models.layers import ConvBN, check_widths, in_width, out_width

CIFAR_IN_CHANNELS = 3
# Residual stream width of each stage; the stem conv writes stage 1's stream.
CIFAR_STAGE_WIDTHS = (16, 32, 64)
CIFAR_STAGE_STRIDES = (1, 2, 2)


def cifar_blocks_per_stage(depth: int) -> int:
  """n = (depth - 2) / 6: each stage has n basic blocks of two convs."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
  return (depth - 2) // 6


def cifar_block_widths(
    depth: int, stage_widths: Sequence[int] = CIFAR_STAGE_WIDTHS
) -> list[list[int]]:
  """The standard inner widths: every block as wide as its stage.

  Example:
    >>> cifar_block_widths(20)
    [[16, 16, 16], [32, 32, 32], [64, 64, 64]]
  """
  return [[width] * cifar_blocks_per_stage(depth) for width in stage_widths]


class BasicBlock(nnx.Module):
  """Two 3x3 conv + BN with a residual add; relu after the first conv and after the add.

  The shortcut is a strided 1x1 conv + BN (option B) where the block downsamples, the
  identity otherwise; the stream width does not change inside a stage.
  """

  def __init__(
      self,
      in_features: int,
      width: int,
      out_features: int,
      *,
      strides: int,
      rngs: nnx.Rngs,
  ):
    self.conv1 = ConvBN(in_features, width, 3, strides=strides, rngs=rngs)
    self.conv2 = ConvBN(width, out_features, 3, rngs=rngs)
    # Decided by the stride, never by comparing widths: pruning that happens to make two
    # widths equal must not change the topology.
    self.shortcut = (
        ConvBN(in_features, out_features, 1, strides=strides, rngs=rngs)
        if strides != 1
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x if self.shortcut is None else self.shortcut(x)
    y = jax.nn.relu(self.conv1(x))
    return jax.nn.relu(self.conv2(y) + residual)


class CifarResNet(nnx.Module):
  """ResNet for 32x32 inputs: 3x3 stem, three stages of basic blocks, global average pool.

  Every width is an argument: ``stage_widths[s]`` is the residual stream of stage ``s``
  (the stem writes the first stage's stream) and ``block_widths[s][b]`` the inner width
  of block ``b`` (the output of its first conv). The second and third stages start with
  stride 2 and a projection shortcut (option B: ResNet-56 has 0.856M parameters with 10
  classes, option A's zero-padding shortcut 0.853M).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: CifarResNet(depth=20, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    >>> model.arch()["name"], model.arch()["block_widths"][1]
    ('resnet20', [32, 32, 32])
  """

  default_depth: ClassVar[int] = 20

  def __init__(
      self,
      num_classes: int = 10,
      *,
      depth: int | None = None,
      stage_widths: Sequence[int] = CIFAR_STAGE_WIDTHS,
      block_widths: Sequence[Sequence[int]] | None = None,
      in_channels: int = CIFAR_IN_CHANNELS,
      rngs: nnx.Rngs,
  ):
    depth = self.default_depth if depth is None else depth
    blocks_per_stage = cifar_blocks_per_stage(depth)
    if block_widths is None:
      block_widths = cifar_block_widths(depth, stage_widths)
    check_widths("stage_widths", stage_widths, len(CIFAR_STAGE_STRIDES))
    check_widths("block_widths", block_widths, len(CIFAR_STAGE_STRIDES))
    for s, stage_block_widths in enumerate(block_widths):
      check_widths(
          f"block_widths[{s}] of resnet{depth}", stage_block_widths, blocks_per_stage
      )

    self.stem = ConvBN(in_channels, stage_widths[0], 3, rngs=rngs)
    stages = []
    stream_width = stage_widths[0]
    for stage_width, stage_block_widths, stride in zip(
        stage_widths, block_widths, CIFAR_STAGE_STRIDES
    ):
      blocks = []
      for b, width in enumerate(stage_block_widths):
        blocks.append(
            BasicBlock(
                stream_width,
                width,
                stage_width,
                strides=stride if b == 0 else 1,
                rngs=rngs,
            )
        )
        stream_width = stage_width
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(stream_width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem(x))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    num_blocks = sum(len(stage) for stage in self.stages)
    return {
        "name": f"resnet{2 * num_blocks + 2}",
        "num_classes": out_width(self.head),
        "stage_widths": [out_width(stage[0].conv2) for stage in self.stages],
        "block_widths": [
            [out_width(block.conv1) for block in stage] for stage in self.stages
        ],
        "in_channels": in_width(self.stem),
    }


class ResNet20(CifarResNet):
  """ResNet-20 for CIFAR: `CifarResNet` with depth 20 (0.27M parameters)."""

  default_depth = 20


class ResNet56(CifarResNet):
  """ResNet-56 for CIFAR: `CifarResNet` with depth 56 (0.86M parameters)."""

  default_depth = 56


class ResNet110(CifarResNet):
  """ResNet-110 for CIFAR: `CifarResNet` with depth 110 (1.7M parameters)."""

  default_depth = 110
