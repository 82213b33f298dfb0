"""Model registry: ``get_model(name, num_classes=..., quant=...)``.

Every model is a Flax Linen module called as ``model.apply(variables, images, train, ctx)`` with
NHWC float images; ``quant=None`` gives the full-precision network with identical parameter names.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from ewgs_jax.layers import QuantConfig
from ewgs_jax.models.cifar_resnet import CifarResNet
from ewgs_jax.models.imagenet_resnet import ImageNetResNet
from ewgs_jax.models.mobilenet_v2 import MobileNetV2
from ewgs_jax.models.vgg import VGG

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": functools.partial(CifarResNet, blocks_per_stage=1),
    "resnet20": functools.partial(CifarResNet, blocks_per_stage=3),
    "resnet32": functools.partial(CifarResNet, blocks_per_stage=5),
    "resnet56": functools.partial(CifarResNet, blocks_per_stage=9),
    "vgg16": VGG,
    "resnet18": functools.partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3)),
    "resnet50": functools.partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True),
    "mobilenet_v2": MobileNetV2,
}


def get_model(name: str, *, num_classes: int, quant: QuantConfig | None = None, dtype: Any = jnp.float32,
              **kwargs) -> nn.Module:
  """Builds the model registered as ``name``; unknown names raise listing the choices.

  Args:
    name: a key of :data:`MODELS`.
    num_classes: the number of output classes.
    quant: the quantization setting, or ``None`` for full precision.
    dtype: the computation dtype.
    **kwargs: further arguments of the model's factory (e.g. ``stage_sizes``).

  Returns:
    The (unbound) Flax module.
  """
  try:
    factory = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; valid choices: {sorted(MODELS)}") from None
  return factory(num_classes=num_classes, quant=quant, dtype=dtype, **kwargs)
