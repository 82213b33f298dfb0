"""A convolution whose weight gradient is fast on XLA:CPU.

XLA:CPU computes convolution *weight* gradients slowly: several times its forward convolution and
slower than PyTorch's oneDNN (figures: ``benchmarks/README.md``, section "Figures cited by module
docstrings", ``ops``). :func:`conv_general_dilated`
has the signature of ``jax.lax.conv_general_dilated``; for NHWC/HWIO convolutions without
dilation it uses a ``jax.custom_vjp`` whose

* forward is ``lax.conv_general_dilated`` itself,
* input gradient is the transposed convolution written as a canonical forward convolution
  (flipped kernel, channels swapped, output gradient dilated by the strides),
* weight gradient is a sum over the kernel taps: for tap ``(i, j)``, the strided slice of the
  padded input that the tap sees, contracted with the output gradient over batch and space
  (one matmul per tap; grouped convolutions contract per group; depthwise ones, with one input
  channel per group, use an elementwise multiply-reduce, which XLA:CPU runs far faster).

The backward rule is built from differentiable operations and the forward rule does not call
the decorated function, so ``jax.jvp(jax.grad(...))`` (the Hessian code) works through it and
gives the second derivatives of ``lax.conv_general_dilated``. Everything else (other layouts,
dilation, ``batch_group_count``) falls back to ``lax.conv_general_dilated``.

Selection: the ``impl`` argument, ``"auto" | "xla" | "fast"`` (``config.conv_impl``, which the
models pass to every ``QuantConv`` as its ``conv_impl`` attribute); ``auto`` uses the custom rule on
the CPU backend only, since cuDNN and TPU convolutions are already fast (:func:`selected_impl` gives
the measurements). It is an explicit argument, not a module global: a function traced (and cached
by ``jax.jit``) under one setting could otherwise keep it after the setting changed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "fast")
NHWC = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str) -> str:
  """Validates a convolution implementation name.

  Args:
    impl: ``"auto"``, ``"xla"`` or ``"fast"``.

  Returns:
    ``impl``.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; valid choices: {list(IMPLS)}")
  return impl


def selected_impl(impl: str = "auto") -> str:
  """The implementation a supported convolution traced now with ``impl`` uses: ``"fast"`` or ``"xla"``.

  ``auto`` picks the custom rule on the CPU backend, XLA's convolution elsewhere (cuDNN and TPU
  convolutions are already fast): on CPU the custom weight gradient is faster than XLA's for
  every 3x3 layer shape of ResNet-20 (or ties it), much faster for depthwise ones; and inside a
  loop body (``while_loop``, ``fori_loop``, ``scan``: the Hessian estimate's samples, a scanned
  model) XLA:CPU does not rewrite gradient convolutions into its fast kernels at all and they run
  as naive loop nests, orders of magnitude slower, while the custom rule, built from forward
  convolutions and matmuls, stays fast (figures: ``benchmarks/README.md``, section "Figures cited
  by module docstrings", ``ops``).

  Args:
    impl: ``"auto"``, ``"xla"`` or ``"fast"``.

  Returns:
    ``"fast"`` or ``"xla"``.
  """
  if check_impl(impl) == "auto":
    return "fast" if jax.default_backend() == "cpu" else "xla"
  return impl


def _explicit_padding(padding, in_spatial, kernel_spatial, strides) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_spatial, kernel_spatial, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def tap_windows(x, kernel_spatial, strides, padding) -> list:
  """The input window of every kernel tap of a stride-``strides`` convolution over NHWC ``x``.

  Args:
    x: an NHWC array (any dtype).
    kernel_spatial: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), (lo, hi))``; zeros are padded.

  Returns:
    ``kh * kw`` arrays of shape ``(N, H_out, W_out, C)``, taps in row-major order: tap ``(i, j)``
    holds the padded input at ``(i + sh * h, j + sw * w)``, the values kernel element ``(i, j)``
    multiplies (slices only, no arithmetic).
  """
  (kh, kw), (sh, sw) = kernel_spatial, strides
  (pt, pb), (pl, pr) = _explicit_padding(padding, x.shape[1:3], kernel_spatial, strides)
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, hp, wp, c = x.shape
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  return [lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def _replicated_like(x):
  """A replicated output sharding when ``x`` is explicitly sharded (``AxisType.Explicit`` mesh).

  Why: contracting a batch-sharded axis is ambiguous under explicit sharding, and JAX asks for the
  output sharding; a weight gradient is replicated like the weights. ``None`` (JAX decides) otherwise.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _weight_gradient(x, g, kernel_shape, strides, padding, groups):
  """dL/dw as per-tap contractions of strided input slices with the output gradient.

  Why: XLA:CPU lowers the convolution weight gradient to a slow kernel; slices plus matmuls (or,
  for depthwise, multiply-reduce) use its fast dot/reduce paths and stay differentiable.
  """
  kh, kw, cin_group, cout = kernel_shape
  n, ho, wo, _ = g.shape
  g = g.reshape(n, ho, wo, groups, cout // groups)
  taps = []
  for patch in tap_windows(x, (kh, kw), strides, padding):
    patch = patch.reshape(n, ho, wo, groups, cin_group)
    if cin_group == 1:
      # Depthwise: an elementwise multiply-reduce; as a batched matmul with 1x1 matrices per
      # channel it was several times slower on XLA:CPU (figures: benchmarks/README.md, section
      # "Figures cited by module docstrings", ops).
      tap = jnp.sum(patch.astype(jnp.float32) * g.astype(jnp.float32), axis=(0, 1, 2))
    else:
      tap = jnp.einsum("nhwgc,nhwgd->cgd", patch, g, preferred_element_type=jnp.float32,
                       out_sharding=_replicated_like(x))
    taps.append(tap.reshape(cin_group, cout))
  return jnp.stack(taps).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, groups):
  return _forward(x, w, strides, padding, groups)


def _forward(x, w, strides, padding, groups):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, feature_group_count=groups)


def _conv_fwd(x, w, strides, padding, groups):
  return _forward(x, w, strides, padding, groups), (x, w)


def _input_gradient(g, w, input_spatial, strides, padding, groups):
  """dL/dx as a forward convolution in the canonical NHWC/HWIO form: the output gradient, dilated
  by the strides, convolved with the spatially flipped kernel whose in/out channels are swapped
  within each group.

  Why not ``jax.vjp`` of the forward: JAX's transpose rule emits a convolution with a reversed,
  ``01oi`` kernel that XLA:CPU rewrites into its fast kernel only at the top level of a program;
  inside a ``while`` body (the Hessian estimate's sample loop) it stays a naive loop nest, an
  order of magnitude slower (figures: ``benchmarks/README.md``, section "Figures cited by module
  docstrings", ``ops``). Built from a convolution, the rule stays
  differentiable (its JVP is again a canonical convolution).
  """
  kh, kw, cin_group, cout = w.shape
  w = jnp.flip(w, (0, 1)).reshape(kh, kw, cin_group, groups, cout // groups)
  w = w.transpose(0, 1, 4, 3, 2).reshape(kh, kw, cout // groups, groups * cin_group)
  pads = []
  for size, k, s, (lo, _), out in zip(input_spatial, (kh, kw), strides, padding, g.shape[1:3]):
    lo_t = k - 1 - lo
    pads.append((lo_t, size + k - 1 - lo_t - ((out - 1) * s + 1)))
  return lax.conv_general_dilated(g, w, (1, 1), pads, lhs_dilation=strides, dimension_numbers=NHWC,
                                  feature_group_count=groups)


def _conv_bwd(strides, padding, groups, residuals, g):
  x, w = residuals
  dx = _input_gradient(g, w, x.shape[1:3], strides, padding, groups).astype(x.dtype)
  dw = _weight_gradient(x, g, w.shape, strides, padding, groups).astype(w.dtype)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *, impl: str = "auto"):
  """Drop-in for ``lax.conv_general_dilated`` with the fast weight gradient where it applies.

  Args:
    lhs: the input; each argument up to ``preferred_element_type`` as ``lax.conv_general_dilated``.
    rhs: the kernel.
    window_strides: the strides.
    padding: a padding string or ``(low, high)`` pairs per spatial dimension.
    lhs_dilation: the input dilation (the fast rule needs ``None`` or all ones).
    rhs_dilation: the kernel dilation (the fast rule needs ``None`` or all ones).
    dimension_numbers: the layouts (the fast rule needs NHWC/HWIO/NHWC on 4-D inputs).
    feature_group_count: the number of feature groups.
    batch_group_count: the number of batch groups (the fast rule needs 1).
    precision: the precision (the fast rule needs ``None``).
    preferred_element_type: the output dtype (the fast rule needs ``None``).
    impl: ``"auto"`` (the custom rule on CPU), ``"xla"`` or ``"fast"``; see :func:`selected_impl`.

  Returns:
    The convolution's output.
  """
  supported = (
      tuple(dimension_numbers or ()) == NHWC and lhs.ndim == 4
      and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and batch_group_count == 1 and precision is None and preferred_element_type is None)
  if not supported or selected_impl(impl) == "xla":
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  return _conv(lhs, rhs, strides, pads, int(feature_group_count))
