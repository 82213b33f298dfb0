"""Export of trained interval-quantized layers to integer codes, and an integer reference forward.

For a layer quantized with the EWGS interval method (EWGS Eq. 1-3):

* weights become codes ``k_w = round((2^b - 1) clip((w - l) / (u - l), 0, 1))`` in ``[0, 2^b - 1]``
  with ``w_q = s_w k_w + o_w``, ``s_w = 2 / (2^b - 1)``, ``o_w = -1`` (Eq. 3's ``2(x_q - 0.5)``);
* activations become codes ``k_a`` in ``[0, 2^b - 1]`` with ``a_q = s_a k_a``, ``s_a = 1 / (2^b - 1)``;
* the layer output is ``|alpha| conv(a_q, w_q) = |alpha| s_a (s_w conv(k_a, k_w) + o_w conv(k_a, 1))``,
  where both convolutions run on integers with int32 accumulation.

The integer convolution is written as integer patches (pad + strided slices, no arithmetic) times
the kernel codes in one ``dot_general`` with an int32 accumulator, not as ``conv_general_dilated``
on integers: integer-typed convolutions are UNIMPLEMENTED on XLA's GPU backend, integer dots run on
CPU, GPU and TPU. The result is exact (no float rounding before the final scaling).

:func:`export_model` returns a plain pytree of numpy arrays (saveable with ``np.savez`` or orbax).
Layers using other forward methods (PACT, LSQ, DoReFa) are not exported yet.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from ewgs_jax import ops
from ewgs_jax.layers import QuantConfig


def _codes(x, lower, upper, bits: int) -> np.ndarray:
  n = 2 ** bits - 1
  latent = np.clip((np.asarray(x, np.float64) - lower) / (upper - lower), 0.0, 1.0)
  # float32 as in training (EWGS Eq. 2 rounds (2^b - 1) x_n computed in float32), half to even
  codes = np.round(latent.astype(np.float32) * np.float32(n))
  return codes.astype(np.uint8 if bits <= 8 else np.uint16)


def export_layer(params: dict, weight_bits: int, act_bits: int) -> dict:
  """Integer weight codes, scales and offsets, and the activation quantizer of one layer.

  Args:
    params: one interval-quantized layer's parameters (``kernel``, ``q_w_lower``, ``q_w_upper``,
      ``q_a_lower``, ``q_a_upper``, ``q_alpha``).
    weight_bits: the layer's weight bit width.
    act_bits: the layer's activation bit width.

  Returns:
    A dict: ``weight_codes`` (integers in ``0..2^b-1``), ``weight_scale`` and ``weight_offset``
    (weight ``= code * scale + offset``, before ``alpha``), ``weight_bits``, ``act_lower``,
    ``act_upper``, ``act_scale``, ``act_bits`` and ``alpha`` (its absolute value).
  """
  n_w, n_a = 2 ** weight_bits - 1, 2 ** act_bits - 1
  return {
      "weight_codes": _codes(params["kernel"], float(params["q_w_lower"]), float(params["q_w_upper"]), weight_bits),
      "weight_scale": np.float32(2.0 / n_w), "weight_offset": np.float32(-1.0), "weight_bits": weight_bits,
      "act_lower": np.float32(params["q_a_lower"]), "act_upper": np.float32(params["q_a_upper"]),
      "act_scale": np.float32(1.0 / n_a), "act_bits": act_bits,
      "alpha": np.float32(abs(float(params["q_alpha"]))),
  }


def export_model(quant: QuantConfig, params: dict) -> dict[str, dict]:
  """Every interval-quantized conv/dense layer of ``params`` (paths as in ``quant.resolve``).

  Args:
    quant: the model's quantization config, which resolves each layer's setting.
    params: the model's parameters.

  Returns:
    ``{path: export_layer(...)}`` for every layer with interval weight and activation quantizers.
  """
  exported = {}

  def visit(tree, path):
    if "q_w_lower" in tree and "q_a_lower" in tree:
      setting = quant.resolve(path)
      if setting.weight.method == setting.act.method == "interval":
        exported[path] = export_layer(tree, setting.weight.bits, setting.act.bits)
      return
    for name, child in tree.items():
      if isinstance(child, dict):
        visit(child, f"{path}/{name}" if path else name)

  visit(params, "")
  return exported


def integer_conv_codes(a_codes, w_codes, strides=(1, 1), padding="SAME", feature_group_count: int = 1):
  """``(conv(k_a, k_w), conv(k_a, 1))`` of integer codes, int32-accumulated, on every backend.

  Args:
    a_codes: NHWC activation codes (any integer dtype).
    w_codes: HWIO weight codes (any integer dtype), ``I = C / feature_group_count``.
    strides, padding, feature_group_count: as ``lax.conv_general_dilated``.

  Returns:
    Two int32 NHWC arrays: the code convolution and the sum of activation codes under each window
    (per output channel), the two integer terms of the exported layer's output.
  """
  kh, kw, per_group, out = w_codes.shape
  groups = feature_group_count
  patches = jnp.stack(ops.tap_windows(jnp.asarray(a_codes, jnp.int32), (kh, kw), tuple(strides), padding), axis=3)
  n, h, w = patches.shape[:3]
  patches = patches.reshape(n, h, w, kh * kw, groups, per_group)
  kernel = jnp.asarray(w_codes, jnp.int32).reshape(kh * kw, per_group, groups, out // groups)
  acc = jnp.einsum("nhwkgc,kcgo->nhwgo", patches, kernel, preferred_element_type=jnp.int32)
  count = jnp.sum(patches, axis=(3, 5), dtype=jnp.int32)[..., None]          # (n, h, w, groups, 1)
  count = jnp.broadcast_to(count, acc.shape)
  return acc.reshape(n, h, w, out), count.reshape(n, h, w, out)


def integer_conv(x, layer: dict, strides=(1, 1), padding="SAME", feature_group_count: int = 1):
  """Reference forward of an exported conv layer with integer arithmetic (NHWC float input).

  Args:
    x: the layer's float input.
    layer: an entry of :func:`export_model` (or :func:`export_layer`'s result).
    strides, padding, feature_group_count: the layer's convolution settings.

  Returns:
    The layer output ``|alpha| s_a (s_w conv(k_a, k_w) + o_w conv(k_a, 1))`` (float32), with both
    convolutions computed exactly on integers (:func:`integer_conv_codes`).
  """
  a_codes = _codes(x, float(layer["act_lower"]), float(layer["act_upper"]), int(layer["act_bits"]))
  acc, count = integer_conv_codes(a_codes, layer["weight_codes"], strides, padding, feature_group_count)
  out = layer["act_scale"] * (layer["weight_scale"] * acc.astype(jnp.float32)
                              + layer["weight_offset"] * count.astype(jnp.float32))
  return layer["alpha"] * out
