"""CIFAR ResNet-20/32/56 exactly as the reference EWGS code (``CIFAR10/custom_models.py``).

Post-activation basic blocks ``relu(bn(conv)) -> bn(conv) -> + shortcut -> relu``; option-A
shortcut (parameter-free: stride-2 subsampling and zero channel padding, ``planes // 4`` on each
side); a full-precision 3x3 stem with BN and ReLU; stages of 16/32/64 channels with strides 1/2/2;
global average pooling, then an extra BatchNorm before the full-precision classifier (inherited
from IR-Net). Depth ``6n + 2``: ResNet-20 has n = 3 (0.27 M parameters); ``resnet8`` (n = 1) is
a small member of the family for tests and the offline quickstart. ``stage_widths`` changes the
number and width of the stages (tests use a single narrow stage).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, first_last_quant


def batch_norm(train: bool, name: str | None = None, dtype: Any = jnp.float32) -> nn.BatchNorm:
  """PyTorch-equivalent BatchNorm (momentum 0.1 there = 0.9 here, eps 1e-5), global over the batch.

  Args:
    train: use the batch's statistics (and update the running ones) instead of the running ones.
    name: the module's name, or ``None``.
    dtype: the computation dtype.

  Returns:
    The ``nn.BatchNorm`` module.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Post-activation basic block with an option-A shortcut."""
  planes: int
  stride: int
  quant: QuantConfig | None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool, ctx: QuantContext | None = None):
    conv = lambda stride, name: QuantConv(self.planes, (3, 3), (stride, stride), padding=[(1, 1), (1, 1)],
                                          quant=self.quant, dtype=self.dtype, conv_impl=self.conv_impl, name=name)
    y = nn.relu(batch_norm(train, "bn1", self.dtype)(conv(self.stride, "conv1")(x, ctx)))
    y = batch_norm(train, "bn2", self.dtype)(conv(1, "conv2")(y, ctx))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.planes:
      pad = self.planes // 4
      shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs (works on any spatial size >= 4, e.g. 8x8 digits)."""
  blocks_per_stage: int = 3
  num_classes: int = 10
  stage_widths: tuple = (16, 32, 64)
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"   # ops.IMPLS, passed to every QuantConv

  @nn.compact
  def __call__(self, x, train: bool = False, ctx: QuantContext | None = None):
    edge_quant = first_last_quant(self.quant)
    x = x.astype(self.dtype)
    x = QuantConv(self.stage_widths[0], (3, 3), padding=[(1, 1), (1, 1)], quant=edge_quant, dtype=self.dtype, conv_impl=self.conv_impl,
                  name="conv1")(x, ctx)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    for stage, planes in enumerate(self.stage_widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(planes, stride, self.quant, self.dtype, conv_impl=self.conv_impl, name=f"stage{stage + 1}_block{block}")(x, train, ctx)
    x = jnp.mean(x, axis=(1, 2))
    x = batch_norm(train, "bn2", self.dtype)(x)
    x = QuantDense(self.num_classes, quant=edge_quant, dtype=self.dtype, name="fc")(x, ctx)
    return x.astype(jnp.float32)
