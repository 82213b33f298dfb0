"""VGG-16 with BatchNorm for CIFAR (PEGE Table 1).

Thirteen 3x3 convolutions (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M), each followed
by BN and ReLU, then a full-precision linear classifier on the 512-d feature (the common CIFAR
variant). The first convolution and the classifier stay full precision unless
``quant.quantize_first_last``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, first_last_quant
from ewgs_jax.models.cifar_resnet import batch_norm

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
  layout: tuple = VGG16
  num_classes: int = 10
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool = False, ctx: QuantContext | None = None):
    edge_quant = first_last_quant(self.quant)
    x = x.astype(self.dtype)
    index = 0
    for item in self.layout:
      if item == "M":
        if x.shape[1] > 1:
          x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      quant = edge_quant if index == 0 else self.quant
      x = QuantConv(item, (3, 3), padding=[(1, 1), (1, 1)], quant=quant, dtype=self.dtype, conv_impl=self.conv_impl, name=f"conv{index}")(x, ctx)
      x = nn.relu(batch_norm(train, f"bn{index}", self.dtype)(x))
      index += 1
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, quant=edge_quant, dtype=self.dtype, name="fc")(x, ctx).astype(jnp.float32)
