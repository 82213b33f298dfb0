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

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": functools.partial(CifarResNet, blocks_per_stage=1),
    "resnet20": functools.partial(CifarResNet, blocks_per_stage=3),
    "resnet32": functools.partial(CifarResNet, blocks_per_stage=5),
    "resnet56": functools.partial(CifarResNet, blocks_per_stage=9),
}


def get_model(name: str, *, num_classes: int, quant: QuantConfig | None = None, dtype: Any = jnp.float32,
              **kwargs) -> nn.Module:
  """Builds the model registered as ``name``; unknown names raise listing the choices."""
  try:
    factory = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; valid choices: {sorted(MODELS)}") from None
  return factory(num_classes=num_classes, quant=quant, dtype=dtype, **kwargs)
