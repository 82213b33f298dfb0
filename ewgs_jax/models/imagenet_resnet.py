"""ImageNet ResNet-18/34/50 in the torchvision layout (EWGS Sec. 4.1; PEGE Sec. 4).

7x7/2 stem + BN + ReLU + 3x3/2 max pool (full precision), four stages of basic (18/34) or
bottleneck (50) blocks with the stride on the 3x3 conv (v1.5, as torchvision), 1x1 projection
shortcuts where the shape changes (quantized too, as in the reference code), global average
pooling and a full-precision classifier. First and last layers are quantized only with
``quant.quantize_first_last``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, first_last_quant
from ewgs_jax.models.cifar_resnet import batch_norm


class ResidualBlock(nn.Module):
  planes: int
  stride: int
  bottleneck: bool
  quant: QuantConfig | None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool, ctx: QuantContext | None = None):
    def conv(features, kernel, stride, name):
      pad = kernel // 2
      return QuantConv(features, (kernel, kernel), (stride, stride), padding=[(pad, pad), (pad, pad)],
                       quant=self.quant, dtype=self.dtype, conv_impl=self.conv_impl, name=name)

    expansion = 4 if self.bottleneck else 1
    if self.bottleneck:
      y = nn.relu(batch_norm(train, "bn1", self.dtype)(conv(self.planes, 1, 1, "conv1")(x, ctx)))
      y = nn.relu(batch_norm(train, "bn2", self.dtype)(conv(self.planes, 3, self.stride, "conv2")(y, ctx)))
      y = batch_norm(train, "bn3", self.dtype)(conv(self.planes * 4, 1, 1, "conv3")(y, ctx))
    else:
      y = nn.relu(batch_norm(train, "bn1", self.dtype)(conv(self.planes, 3, self.stride, "conv1")(x, ctx)))
      y = batch_norm(train, "bn2", self.dtype)(conv(self.planes, 3, 1, "conv2")(y, ctx))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes * expansion:
      shortcut = conv(self.planes * expansion, 1, self.stride, "downsample_conv")(x, ctx)
      shortcut = batch_norm(train, "downsample_bn", self.dtype)(shortcut)
    return nn.relu(y + shortcut)


class ImageNetResNet(nn.Module):
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  num_classes: int = 1000
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool = False, ctx: QuantContext | None = None):
    edge_quant = first_last_quant(self.quant)
    x = x.astype(self.dtype)
    x = QuantConv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], quant=edge_quant, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(x, ctx)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(64 * 2 ** stage, stride, self.bottleneck, self.quant, self.dtype, conv_impl=self.conv_impl,
                          name=f"layer{stage + 1}_block{block}")(x, train, ctx)
    x = jnp.mean(x, axis=(1, 2))
    return QuantDense(self.num_classes, quant=edge_quant, dtype=self.dtype, name="fc")(x, ctx).astype(jnp.float32)
