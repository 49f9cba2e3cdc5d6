"""The model zoo: Flax NNX models whose every width is a constructor argument.

Each model's ``arch()`` returns a JSON-serialisable dict, ``{"name": ..., "num_classes": ...,
<width arguments>}``, read from its current arrays, so a model whose channels were removed
by surgery describes itself and `from_arch` rebuilds it (with fresh weights) from the JSON
saved beside a checkpoint.

Example:
  >>> import json
  >>> from flax import nnx
  >>> model = create_model("digits_cnn", num_classes=10, rngs=nnx.Rngs(0))
  >>> arch = json.loads(json.dumps(model_arch(model)))
  >>> arch["name"], arch["conv_widths"], arch["dense_widths"]
  ('digits_cnn', [32, 64], [128])
  >>> rebuilt = from_arch(arch, rngs=nnx.Rngs(1))
  >>> rebuilt.arch() == arch
  True
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from dpm_jax.models.digits_cnn import DigitsCNN as DigitsCNN
from dpm_jax.models.layers import ConvBN as ConvBN
from dpm_jax.models.mnist1d_cnn import Mnist1DCNN as Mnist1DCNN
from dpm_jax.models.mobilenet_v2 import MobileNetV2 as MobileNetV2
from dpm_jax.models.resnet_cifar import CifarResNet as CifarResNet
from dpm_jax.models.resnet_cifar import ResNet20 as ResNet20
from dpm_jax.models.resnet_cifar import ResNet56 as ResNet56
from dpm_jax.models.resnet_cifar import ResNet110 as ResNet110
from dpm_jax.models.resnet_imagenet import ResNet50 as ResNet50
from dpm_jax.models.transformer import DecoderLM as DecoderLM
from dpm_jax.models.transformer import DigitsViT as DigitsViT
from dpm_jax.models.vgg import VGG16BN as VGG16BN

MODELS: dict[str, type[nnx.Module]] = {
    "digits_cnn": DigitsCNN,
    "mnist1d_cnn": Mnist1DCNN,
    "resnet20": ResNet20,
    "resnet56": ResNet56,
    "resnet110": ResNet110,
    "vgg16_bn": VGG16BN,
    "mobilenet_v2": MobileNetV2,
    "resnet50": ResNet50,
    "digits_vit": DigitsViT,
    "decoder_lm": DecoderLM,
}


def create_model(
    name: str, *, num_classes: int, rngs: nnx.Rngs, **kwargs: Any
) -> nnx.Module:
  """Builds the registered model ``name``; ``kwargs`` are its width arguments.

  Args:
    name: a key of `MODELS`.
    num_classes: size of the output layer.
    rngs: initialisation randomness.
    **kwargs: further constructor arguments of the model (widths).

  Returns:
    The model, in training mode (BatchNorm uses batch statistics).

  Raises:
    ValueError: ``name`` is not registered.

  Example:
    >>> from flax import nnx
    >>> model = create_model("digits_cnn", num_classes=10, rngs=nnx.Rngs(0))
    >>> model.arch()["dense_widths"]
    [128]
  """
  if name not in MODELS:
    raise ValueError(
        f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}"
    )
  return MODELS[name](num_classes=num_classes, rngs=rngs, **kwargs)


def from_arch(arch: dict[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds a freshly initialised model from a description returned by ``arch()``.

  Args:
    arch: ``{"name": ..., "num_classes": ..., **width_arguments}``, e.g. read from JSON.
    rngs: initialisation randomness.

  Returns:
    A model whose ``nnx.state`` has the same tree structure and leaf shapes as the model
    that produced ``arch``; load trained weights into it (e.g. with orbax) to restore it.
  """
  kwargs = dict(arch)
  name = kwargs.pop("name")
  return create_model(name, rngs=rngs, **kwargs)


def model_arch(model: nnx.Module) -> dict[str, Any]:
  """The JSON-serialisable description of ``model``'s current architecture."""
  return model.arch()
