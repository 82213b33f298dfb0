"""MobileNetV2 for ImageNet (EWGS Table 5), torchvision layout (width 1.0).

Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection) with ReLU6, the
(t, c, n, s) table of the paper, a 1x1 conv to 1280 features, global pooling, dropout-free
classifier. ``quant.quantize_first_last`` quantizes every layer including the stem and the
classifier (the EWGS/PROFIT MobileNetV2 setting).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, first_last_quant
from ewgs_jax.models.cifar_resnet import batch_norm

# expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUALS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  features: int
  stride: int
  expansion: int
  quant: QuantConfig | None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool, ctx: QuantContext | None = None):
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = QuantConv(hidden, (1, 1), quant=self.quant, dtype=self.dtype, conv_impl=self.conv_impl, name="expand")(y, ctx)
      y = nn.relu6(batch_norm(train, "expand_bn", self.dtype)(y))
    y = QuantConv(hidden, (3, 3), (self.stride, self.stride), padding=[(1, 1), (1, 1)], feature_group_count=hidden,
                  quant=self.quant, dtype=self.dtype, conv_impl=self.conv_impl, name="depthwise")(y, ctx)
    y = nn.relu6(batch_norm(train, "depthwise_bn", self.dtype)(y))
    y = QuantConv(self.features, (1, 1), quant=self.quant, dtype=self.dtype, conv_impl=self.conv_impl, name="project")(y, ctx)
    y = batch_norm(train, "project_bn", self.dtype)(y)
    return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
  num_classes: int = 1000
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool = False, ctx: QuantContext | None = None):
    edge_quant = first_last_quant(self.quant)
    x = x.astype(self.dtype)
    x = QuantConv(32, (3, 3), (2, 2), padding=[(1, 1), (1, 1)], quant=edge_quant, dtype=self.dtype, conv_impl=self.conv_impl, name="stem")(x, ctx)
    x = nn.relu6(batch_norm(train, "stem_bn", self.dtype)(x))
    for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUALS):
      for i in range(n):
        x = InvertedResidual(c, s if i == 0 else 1, t, self.quant, self.dtype, conv_impl=self.conv_impl, name=f"block{stage}_{i}")(x, train, ctx)
    x = QuantConv(1280, (1, 1), quant=self.quant, dtype=self.dtype, conv_impl=self.conv_impl, name="head")(x, ctx)
    x = nn.relu6(batch_norm(train, "head_bn", self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, quant=edge_quant, dtype=self.dtype, name="fc")(x, ctx).astype(jnp.float32)
