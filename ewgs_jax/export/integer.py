"""The integer arithmetic of one quantized layer: codes, integer levels, int32 accumulation, requantization.

Every forward method (:data:`ewgs_jax.quantizers.METHODS`) maps a tensor to a code
``k = round((2^b - 1) x_c)`` in ``0 .. 2^b - 1`` (PEGE Eq. 1-2, EWGS Eq. 1-2) and the code to an
output that is affine in it, ``A + B k / (2^b - 1)`` (EWGS Eq. 3, PACT, LSQ, DoReFa). Both are read
off the registered method itself, not re-written here: :func:`codes` runs the method with a hook
that records ``x_q`` (so the codes are exactly the fake-quantized model's), :func:`output_values`
runs it with ``x_q`` replaced by 0, 1/2 and 1. A registered method therefore exports with no edit here.

A quantized layer ``y = |alpha| op(Q_A(x), Q_W(w))`` (``op`` a convolution or a matmul) becomes

* weight *levels* ``v = s k_w + o``, small signed integers (``s`` 1 or 2, ``o`` an integer offset,
  e.g. ``2 k - (2^b - 1)`` for the interval method's ``2 x_q - 1``), with a float scale per output
  channel (or per tensor) ``c_w``: ``Q_W(w) = c_w v``;
* activation codes ``k_a`` with ``Q_A(x) = c_a k_a`` (every shipped method maps code 0 to 0, so the
  convolution's zero padding is code 0);
* ``y = M acc + B`` with ``acc = op(k_a, v)`` accumulated exactly in int32 and the requantization
  scale ``M = |alpha| c_a c_w`` (BatchNorm, when it follows, folded into ``M`` and ``B``).

The integer convolution is integer patches (:func:`ewgs_jax.ops.tap_windows`: pad and strided
slices, no arithmetic) times the weight levels in one int32-accumulating ``dot_general``, not
``conv_general_dilated`` on integers: integer convolutions are UNIMPLEMENTED on XLA's GPU backend,
integer dots run on CPU, GPU and TPU. The operands are the narrowest integer type that holds them
(``int8`` up to 7 bits). No float rounding happens before the final scaling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ewgs_jax import estimators, ops, quantizers

INT32_LIMIT = 2 ** 31 - 1


def codes(method: str, x, params: Mapping[str, Any], bits: int, weight: bool) -> jax.Array:
  """The codes ``0 .. 2^b - 1`` that the forward method gives ``x`` (EWGS Eq. 2's rounded latent).

  Runs the registered method with a hook that records its discrete output ``x_q``; the codes are
  ``round((2^b - 1) x_q)``, exact integers, equal to those of the fake-quantized layer on the same
  input (the forward rounding is the same for every backward rule).

  Args:
    method: a registered forward method's name.
    x: the tensor to quantize.
    params: the method's learned parameters by suffix (``{"lower": ..., "upper": ...}``).
    bits: the bit width.
    weight: whether ``x`` is a kernel (the weight variant of the method).

  Returns:
    ``int32`` codes of ``x``'s shape.
  """
  seen = []

  def record(x_c, x_q):
    del x_c
    seen.append(x_q)
    return x_q

  quantizers.get_method(method).apply(x, params, bits=bits, weight=weight, discretizer=estimators.ste, hook=record)
  return jnp.round(seen[0].astype(jnp.float32) * estimators.levels(bits)).astype(jnp.int32)


MAP_POINTS = (0.0, 0.5, 1.0)   # x_q values at which a method's output map is read (0.5 checks it is affine)


def output_values(method: str, x, params: Mapping[str, Any], bits: int, weight: bool) -> jax.Array:
  """The method's output with its discrete value ``x_q`` replaced by each of :data:`MAP_POINTS`.

  Traceable; :func:`output_map` turns the result into the affine map ``A + B x_q``.

  Args:
    method: a registered forward method's name.
    x: the tensor quantized (its shape sets the shape of the outputs; per-tensor statistics such as
      DoReFa's ``max |tanh w|`` do not enter the output map).
    params: the method's learned parameters by suffix.
    bits: the bit width.
    weight: whether ``x`` is a kernel.

  Returns:
    ``(len(MAP_POINTS), *x.shape)`` float32 outputs.
  """
  apply = quantizers.get_method(method).apply
  x = jnp.asarray(x, jnp.float32)
  return jnp.stack([apply(x, params, bits=bits, weight=weight, discretizer=estimators.ste,
                          hook=lambda x_c, x_q, v=value: jnp.full_like(x_q, v)).astype(jnp.float32)
                    for value in MAP_POINTS])


def output_map(method: str, values) -> tuple[np.ndarray, np.ndarray]:
  """``(A, B)`` with the method's output ``A + B x_q`` (e.g. EWGS Eq. 3: ``A = -1, B = 2`` for weights).

  Args:
    method: the method's name (for the error message).
    values: :func:`output_values`' result.

  Returns:
    ``A`` and ``B`` as float64 arrays.

  Raises:
    NotImplementedError: when the output is not affine in ``x_q`` (checked at ``x_q = 1/2``).
  """
  low, half, high = np.asarray(values, np.float64)
  a, b = low, high - low
  if not np.allclose(half, a + 0.5 * b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max(initial=0)))):
    raise NotImplementedError(f"the {method} method's output is not affine in its discrete value x_q, "
                              "so it has no integer form")
  return a, b


@dataclasses.dataclass(frozen=True)
class WeightLevels:
  """A kernel as integer levels: ``Q_W(w) = scale * levels``, ``levels = step * codes + offset``.

  Attributes:
    codes: the codes ``0 .. 2^b - 1`` (``uint8`` or ``uint16``), the kernel's shape.
    bits: their bit width.
    step: 1 or 2.
    offset: the integer offset (``-(2^b - 1)`` for ``2 x_q - 1``, ``-Q_N`` for LSQ, 0 if unsigned).
    scale: float32, per output channel (the kernel's last axis) or a scalar.
  """
  codes: np.ndarray
  bits: int
  step: int
  offset: int
  scale: np.ndarray

  def levels(self) -> np.ndarray:
    """The integer levels ``step * codes + offset`` (int32).

    Returns:
      An int32 array of the kernel's shape.
    """
    return self.step * self.codes.astype(np.int32) + self.offset


def _per_channel(values: np.ndarray, what: str) -> np.ndarray:
  """``values`` (kernel-shaped) as one value per output channel (last axis), or a scalar if all agree."""
  channels = values.reshape(-1, values.shape[-1])
  if not np.allclose(channels, channels[:1], rtol=1e-6, atol=0):
    raise NotImplementedError(f"the weight quantizer's {what} varies within an output channel; only per-tensor "
                              "and per-output-channel (last kernel axis) quantizers have an integer form")
  row = channels[0]
  return np.asarray(row[0]) if np.allclose(row, row[0], rtol=1e-6, atol=0) else row


def weight_quantities(method: str, kernel, params: Mapping[str, Any], bits: int) -> tuple[jax.Array, jax.Array]:
  """The traceable part of :func:`weight_levels`: the kernel's codes and its :func:`output_values`.

  Args:
    method: the weight quantizer's forward method.
    kernel: the float kernel.
    params: the quantizer's learned parameters by suffix.
    bits: its bit width.

  Returns:
    ``(codes, output values)``.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  return codes(method, kernel, params, bits, weight=True), output_values(method, kernel, params, bits, weight=True)


def weight_levels(method: str, kernel, params: Mapping[str, Any], bits: int, quantities=None) -> WeightLevels:
  """The kernel's codes and the integer levels they stand for, from the layer's weight quantizer.

  The output map ``A + B k / (2^b - 1)`` becomes ``(B / (s (2^b - 1))) (s k + o)`` with the smallest
  ``s`` in {1, 2} that makes ``o = s (2^b - 1) A / B`` an integer (EWGS Eq. 3's ``2 x_q - 1``: ``s = 2``,
  ``o = -(2^b - 1)``; LSQ: ``s = 1``, ``o = -Q_N``).

  Args:
    method: the weight quantizer's forward method.
    kernel: the float kernel (output channels on the last axis).
    params: the quantizer's learned parameters by suffix.
    bits: its bit width.
    quantities: :func:`weight_quantities`' result, if already computed (e.g. for many layers in one
      jitted call); computed here otherwise.

  Returns:
    The :class:`WeightLevels`.
  """
  if quantities is None:
    quantities = jax.jit(weight_quantities, static_argnums=(0, 3))(method, kernel, params, bits)
  k, values = (np.asarray(q) for q in quantities)
  n = estimators.levels(bits)
  a, b = output_map(method, values)
  a, b = _per_channel(a, "offset"), _per_channel(b, "scale")
  ratio = n * a / b                      # the offset in units of one code step
  for step in (1, 2):
    offset = np.round(step * ratio)
    if np.allclose(step * ratio, offset, rtol=0, atol=1e-3) and np.all(offset == offset.reshape(-1)[0]):
      break
  else:
    raise NotImplementedError(f"the {method} weight quantizer's levels are not an integer grid with a shared offset")
  return WeightLevels(codes=k.astype(np.uint8 if bits <= 8 else np.uint16), bits=bits, step=step,
                      offset=int(offset.reshape(-1)[0]), scale=np.asarray(b / (n * step), np.float32))


def activation_quantities(method: str, params: Mapping[str, Any], bits: int) -> jax.Array:
  """The traceable part of :func:`activation_scale`: the method's output values on one element.

  Args:
    method: the activation quantizer's forward method.
    params: its learned parameters by suffix.
    bits: its bit width.

  Returns:
    :func:`output_values` on a one-element input.
  """
  return output_values(method, jnp.zeros((1,), jnp.float32), params, bits, weight=False)


def activation_scale(method: str, params: Mapping[str, Any], bits: int, quantities=None) -> float:
  """``c_a`` with ``Q_A(x) = c_a k_a``: the activation quantizer's value per code.

  Args:
    method: the activation quantizer's forward method.
    params: its learned parameters by suffix (scalars).
    bits: its bit width.
    quantities: :func:`activation_quantities`' result, if already computed.

  Returns:
    The scale (float).

  Raises:
    NotImplementedError: for per-channel activation parameters or a method that maps code 0 to a
      non-zero value (zero padding would then not be code 0).
  """
  if any(np.size(v) != 1 for v in params.values()):
    raise NotImplementedError(f"the {method} activation quantizer has per-channel parameters; only per-tensor "
                              "activation quantizers have an integer form")
  if quantities is None:
    quantities = jax.jit(activation_quantities, static_argnums=(0, 2))(method, params, bits)
  a, b = output_map(method, quantities)
  if abs(float(a[0])) > 1e-12 * max(1.0, abs(float(b[0]))):
    raise NotImplementedError(f"the {method} activation quantizer maps code 0 to {float(a[0])}, not 0")
  return float(b[0]) / estimators.levels(bits)


def accumulator_bound(contraction: int, act_bits: int | None, levels: np.ndarray) -> int:
  """The largest ``|acc|`` an integer layer can reach: contraction size x max code x max |level|.

  Args:
    contraction: how many products each output sums (``kh * kw * C / groups``, or the input size).
    act_bits: the activation codes' bit width (``None``: counted as 1).
    levels: the weight levels.

  Returns:
    The bound; the layer is exact in int32 when it is at most ``2^31 - 1``.
  """
  codes = 1 if act_bits is None else 2 ** act_bits - 1   # full-precision inputs: bounded by the caller
  return int(contraction) * codes * int(np.abs(levels).max(initial=0))


def operand_dtype(*max_abs: int):
  """The narrowest signed integer type holding operands up to ``max_abs`` in magnitude.

  XLA:CPU multiplies ``int8`` matrices several times faster than ``int32`` ones (int32 accumulation
  either way; figures: ``benchmarks/bench_export.py``), so the operands of an integer dot are
  stored as narrow as their values allow.

  Args:
    *max_abs: the largest magnitude of each operand.

  Returns:
    ``jnp.int8``, ``jnp.int16`` or ``jnp.int32``.
  """
  largest = max(int(m) for m in max_abs)
  return jnp.int8 if largest <= 127 else jnp.int16 if largest <= 32767 else jnp.int32


def integer_conv(a_codes, w_levels, strides, padding, feature_group_count: int = 1, dtype=jnp.int32) -> jax.Array:
  """``conv(k_a, v)`` of integer activation codes and weight levels, exact, int32-accumulated.

  The input windows of the kernel taps (:func:`ewgs_jax.ops.tap_windows`: zero padding, strided
  slices) are laid side by side, channels last, so that an ungrouped convolution is one 2-D integer
  matrix product with the HWIO kernel flattened to ``(kh kw C, out)``; a depthwise one is a
  multiply-add over the taps; other groupings are one batched product over the groups.

  Args:
    a_codes: NHWC integer activation codes.
    w_levels: HWIO integer weight levels, ``I = C / feature_group_count``.
    strides: ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"`` or ``((lo, hi), (lo, hi))`` (zero padding: code 0).
    feature_group_count: the number of groups (``C`` for a depthwise convolution).
    dtype: the integer type the operands are multiplied in (:func:`operand_dtype`); products and
      sums are int32 whatever it is.

  Returns:
    The int32 NHWC convolution (no convolution op: integer ones are UNIMPLEMENTED on XLA:GPU).
  """
  kh, kw, per_group, out = w_levels.shape
  groups = feature_group_count
  taps = ops.tap_windows(jnp.asarray(a_codes).astype(dtype), (kh, kw), tuple(strides), padding)
  w_levels = jnp.asarray(w_levels).astype(dtype)
  n, h, w = taps[0].shape[:3]
  if groups == 1:
    patches = jnp.concatenate(taps, axis=-1).reshape(n * h * w, kh * kw * per_group)
    acc = lax.dot_general(patches, w_levels.reshape(kh * kw * per_group, out), (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return acc.reshape(n, h, w, out)
  if per_group == 1 and out == groups:   # depthwise: one multiply-add per tap
    kernel = w_levels.reshape(kh * kw, out).astype(jnp.int32)
    return sum(tap.astype(jnp.int32) * kernel[t] for t, tap in enumerate(taps))
  patches = jnp.stack(taps, axis=3).reshape(n, h, w, kh * kw, groups, per_group)
  kernel = w_levels.reshape(kh * kw, per_group, groups, out // groups)
  acc = jnp.einsum("nhwkgc,kcgo->nhwgo", patches, kernel, preferred_element_type=jnp.int32)
  return acc.reshape(n, h, w, out)


def integer_dot(a_codes, w_levels, dimension_numbers, dtype=jnp.int32) -> jax.Array:
  """``dot_general(k_a, v)`` with an int32 accumulator (the integer form of a dense layer).

  Args:
    a_codes: integer activation codes.
    w_levels: integer weight levels.
    dimension_numbers: as ``lax.dot_general``.
    dtype: the integer type the operands are multiplied in (:func:`operand_dtype`).

  Returns:
    The exact int32 product.
  """
  return lax.dot_general(jnp.asarray(a_codes).astype(dtype), jnp.asarray(w_levels).astype(dtype), dimension_numbers,
                         preferred_element_type=jnp.int32)


def contraction_size(kernel_shape, op: str, params: Mapping[str, Any]) -> int:
  """How many products each output of the layer's ``op`` sums.

  Args:
    kernel_shape: the kernel's shape.
    op: ``"conv"`` (HWIO kernel) or ``"dot"``.
    params: the op's parameters (``dimension_numbers`` for ``"dot"``).

  Returns:
    The contraction size.
  """
  if op == "conv":
    return math.prod(kernel_shape[:-1])
  (_, rhs_contract), _ = params["dimension_numbers"]
  return math.prod(kernel_shape[d] for d in rhs_contract)
