"""MobileNetV2 for 32x32 inputs (Sandler et al. 2018, CIFAR strides).

References:
  Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018. https://arxiv.org/abs/1801.04381
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpm_jax.models.layers import ConvBN, check_widths, in_width, out_width

MOBILENET_V2_IN_CHANNELS = 3
MOBILENET_V2_STEM_WIDTH = 32
# The CIFAR variant: the stem and the 24-wide stage run at stride 1 instead of 2 (the
# ImageNet network's first two downsamplings), so 32x32 inputs end at 4x4.
MOBILENET_V2_STEM_STRIDE = 1
MOBILENET_V2_STAGE_STRIDES = (1, 1, 2, 2, 1, 2, 1)
MOBILENET_V2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
# Expansion factor t of each stage; t == 1 means the block has no expand conv.
MOBILENET_V2_EXPANSIONS = (1, 6, 6, 6, 6, 6, 6)
MOBILENET_V2_STAGE_WIDTHS = (16, 24, 32, 64, 96, 160, 320)
MOBILENET_V2_LAST_WIDTH = 1280


def mobilenet_v2_hidden_widths(
    stem_width: int = MOBILENET_V2_STEM_WIDTH,
    stage_widths: Sequence[int] = MOBILENET_V2_STAGE_WIDTHS,
) -> list[list[int]]:
  """The standard hidden widths: each block's input width times its stage's expansion.

  Example:
    >>> mobilenet_v2_hidden_widths()[:3]
    [[32], [96, 144], [144, 192, 192]]
  """
  hidden_widths = []
  width_in = stem_width
  for width_out, depth, expansion in zip(
      stage_widths, MOBILENET_V2_STAGE_DEPTHS, MOBILENET_V2_EXPANSIONS
  ):
    hidden_widths.append(
        [(width_in if b == 0 else width_out) * expansion for b in range(depth)]
    )
    width_in = width_out
  return hidden_widths


class InvertedResidual(nnx.Module):
  """1x1 expand + BN + relu6, 3x3 depthwise + BN + relu6, 1x1 linear project + BN.

  Without the expand conv (``expand=False``) the depthwise conv runs on the input, so
  ``hidden_features`` must equal ``in_features``.
  """

  def __init__(
      self,
      in_features: int,
      hidden_features: int,
      out_features: int,
      *,
      strides: int,
      expand: bool,
      residual: bool,
      rngs: nnx.Rngs,
  ):
    if not expand and hidden_features != in_features:
      raise ValueError(
          "a block without expand conv has hidden width == input width, got "
          f"{hidden_features} != {in_features}"
      )
    self.expand = ConvBN(in_features, hidden_features, 1, rngs=rngs) if expand else None
    self.depthwise = ConvBN(
        hidden_features,
        hidden_features,
        3,
        strides=strides,
        feature_group_count=hidden_features,
        rngs=rngs,
    )
    self.project = ConvBN(hidden_features, out_features, 1, rngs=rngs)
    self.residual = residual

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x if self.expand is None else jax.nn.relu6(self.expand(x))
    y = self.project(jax.nn.relu6(self.depthwise(y)))
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):
  """MobileNetV2, CIFAR variant: stem and second stage at stride 1 (32x32 -> 4x4).

  Stem 3x3 conv + BN + relu6, seven stages of inverted residual blocks, 1x1 conv to
  ``last_width`` + BN + relu6, global average pool, dense. As in torchvision, a block adds
  its input only when it keeps stride 1 and width, i.e. every block but the first of a
  stage. 2.24M parameters with 10 classes.

  Widths: ``stem_width``; ``hidden_widths[s][b]``, the expanded (depthwise) width of block
  ``b`` of stage ``s``; ``stage_widths[s]``, the output width of stage ``s``;
  ``last_width``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: MobileNetV2(num_classes=10, rngs=nnx.Rngs(0)))
    >>> nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(
      self,
      num_classes: int = 10,
      *,
      stem_width: int = MOBILENET_V2_STEM_WIDTH,
      hidden_widths: Sequence[Sequence[int]] | None = None,
      stage_widths: Sequence[int] = MOBILENET_V2_STAGE_WIDTHS,
      last_width: int = MOBILENET_V2_LAST_WIDTH,
      in_channels: int = MOBILENET_V2_IN_CHANNELS,
      rngs: nnx.Rngs,
  ):
    if hidden_widths is None:
      hidden_widths = mobilenet_v2_hidden_widths(stem_width, stage_widths)
    num_stages = len(MOBILENET_V2_STAGE_DEPTHS)
    check_widths("stage_widths", stage_widths, num_stages)
    check_widths("hidden_widths", hidden_widths, num_stages)
    for s, depth in enumerate(MOBILENET_V2_STAGE_DEPTHS):
      check_widths(f"hidden_widths[{s}]", hidden_widths[s], depth)

    self.stem = ConvBN(
        in_channels, stem_width, 3, strides=MOBILENET_V2_STEM_STRIDE, rngs=rngs
    )
    stages = []
    width_in = stem_width
    for width_out, stage_hidden_widths, stride, expansion in zip(
        stage_widths,
        hidden_widths,
        MOBILENET_V2_STAGE_STRIDES,
        MOBILENET_V2_EXPANSIONS,
    ):
      blocks = []
      for b, hidden in enumerate(stage_hidden_widths):
        blocks.append(
            InvertedResidual(
                width_in,
                hidden,
                width_out,
                strides=stride if b == 0 else 1,
                expand=expansion != 1,
                # By position, never by comparing widths: pruning that happens to make
                # two widths equal must not add a residual.
                residual=b > 0,
                rngs=rngs,
            )
        )
        width_in = width_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.last = ConvBN(width_in, last_width, 1, rngs=rngs)
    self.head = nnx.Linear(last_width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu6(self.stem(x))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    x = jax.nn.relu6(self.last(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x)

  def arch(self) -> dict[str, Any]:
    """The architecture as constructor arguments, read from the current arrays."""
    return {
        "name": "mobilenet_v2",
        "num_classes": out_width(self.head),
        "stem_width": out_width(self.stem),
        "hidden_widths": [
            [out_width(block.depthwise) for block in stage] for stage in self.stages
        ],
        "stage_widths": [out_width(stage[0].project) for stage in self.stages],
        "last_width": out_width(self.last),
        "in_channels": in_width(self.stem),
    }
