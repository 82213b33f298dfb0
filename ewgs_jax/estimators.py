"""Discretizers: the uniform rounding of a latent value in [0, 1], with a choice of backward rule.

Every discretizer has the same forward pass (EWGS Eq. 2, PEGE Eq. 2)::

    x_q = round((2^b - 1) x) / (2^b - 1)          (round half to even, as torch.round)

and differs only in its backward rule, given the cotangent ``g = dL/dx_q``:

* :func:`ste`  -- straight-through estimator, ``dL/dx = g``.
* :func:`ewgs` -- element-wise gradient scaling, EWGS Eq. 4,
  ``dL/dx = g * (1 + delta * sign(g) * (x - x_q))``.
* :func:`pege` -- progressive element-wise gradient estimation, PEGE Eq. 5,
  ``dL/dx = g + mu * (x - x_q)``.
* :func:`pege_relative` -- PEGE Eq. 5 with ``mu`` measured in units of the cotangent's spread,
  ``dL/dx = g + mu * 3 sigma(g) * (x - x_q)``: exactly invariant to the loss scale, and measured
  against each tensor's own gradient spread, so the batch size and the layer's size no longer set its
  strength (the library's default for PEGE, see its docstring).

``x`` is the *latent* value: already normalised and clipped to [0, 1] by a forward method in
:mod:`ewgs_jax.quantizers`. ``bits`` is a static Python int in 1..16. ``delta`` and ``mu`` are
traced arrays (scalars, or anything that broadcasts against ``x``, e.g. per channel); they receive
no gradient (a zero cotangent), so they can be changed between steps without recompiling.

Design choices (see ``ARCHITECTURE.md``, "The rule contract"):

* The rule is computed in float32 and the result cast back to the input dtype. For bfloat16 inputs
  this keeps ``(2^b - 1) x`` exact enough to round correctly for every supported bit width (bf16
  has an 8-bit significand) and keeps the tiny rounding error ``x - x_q`` from being flushed.
* The forward rule never calls the decorated function, so forward-over-reverse differentiation
  (``jax.jvp(jax.grad(loss))``, used by the Hessian code) traces through it.
* Second-order terms through the rounding follow STE: the primal inside the forward rule is
  ``x + stop_gradient(x_q - x)``, and the saved rounding error ``x - x_q`` is a constant in the
  backward rule, as in the reference PyTorch ``EWGS_discretizer`` (its saved ``diff`` is a constant
  of the double-backward pass).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

#: A discretizer after its hyper-parameters are bound: ``discretizer(x, bits) -> x_q``.
Discretizer = Callable[[Array, int], Array]

MIN_BITS, MAX_BITS = 1, 16


def check_bits(bits: int) -> int:
  """Validates a static bit width and returns it.

  Args:
    bits: the bit width; must be a Python ``int`` (not ``bool``) in ``MIN_BITS..MAX_BITS``.

  Returns:
    ``bits`` unchanged; raises ``TypeError`` for a non-int and ``ValueError`` out of range.
  """
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f"bits must be a static Python int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
  return bits


def levels(bits: int) -> int:
  """Number of quantization steps ``2^b - 1`` (the number of levels minus one).

  Args:
    bits: the static bit width (checked by :func:`check_bits`).

  Returns:
    ``2 ** bits - 1``.
  """
  return 2 ** check_bits(bits) - 1


def round_to_grid(x: Array, bits: int) -> Array:
  """Plain forward of every discretizer, ``round((2^b - 1) x) / (2^b - 1)`` (EWGS Eq. 2).

  Has zero derivative almost everywhere; use a discretizer to train through it.

  Args:
    x: values in [0, 1].
    bits: the static bit width.

  Returns:
    The rounded values, computed in float32 and cast back to ``x.dtype``.
  """
  n = levels(bits)
  x32 = x.astype(jnp.float32)
  return (jnp.round(x32 * n) / n).astype(x.dtype)


def _forward(x: Array, bits: int) -> tuple[Array, Array]:
  """Shared primal of every rule: returns ``(x_q, x - x_q)``, both float32.

  ``x_q`` carries an STE derivative (``x + stop_gradient(q - x)``) so that a derivative taken
  *through* the forward rule (second order) is the straight-through one.
  """
  x32 = x.astype(jnp.float32)
  q = round_to_grid(x32, bits)
  error = lax.stop_gradient(x32 - q)
  return x32 - error, error


def rounding(x: Array, bits: int) -> tuple[Array, Array]:
  """The forward rule every discretizer shares, for user-defined rules (EWGS Eq. 2; README, "Adding a
  backward rule or a forward method").

  Args:
    x: the latent value in [0, 1].
    bits: the static bit width.

  Returns:
    ``(x_q, x - x_q)`` in float32: ``x_q`` carries an STE derivative (second-order terms through
    the rounding follow STE) and the error is a constant (``stop_gradient``), as ``ARCHITECTURE.md``'s
    contract asks; use it in the forward rule instead of calling the decorated function.
  """
  return _forward(x, check_bits(bits))


# --- STE ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste(x: Array, bits: int) -> Array:
  return _forward(x, bits)[0].astype(x.dtype)


def _ste_fwd(x, bits):
  return _forward(x, bits)[0].astype(x.dtype), None


def _ste_bwd(bits, _, g):
  del bits
  return (g,)


_ste.defvjp(_ste_fwd, _ste_bwd)


def ste(x: Array, bits: int) -> Array:
  """Rounds ``x`` in [0, 1] to ``2^bits`` levels; backward is the straight-through estimator.

  ``dL/dx = dL/dx_q`` (EWGS Sec. 3.1; Bengio et al. 2013).

  Args:
    x: the latent value in [0, 1].
    bits: the static bit width.

  Returns:
    ``x_q`` (EWGS Eq. 2) in ``x.dtype``.
  """
  return _ste(x, check_bits(bits))


# --- EWGS --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ewgs(x: Array, bits: int, delta: Array) -> Array:
  return _forward(x, bits)[0].astype(x.dtype)


def _ewgs_fwd(x, bits, delta):
  q, error = _forward(x, bits)
  return q.astype(x.dtype), (error, delta)


def _ewgs_bwd(bits, res, g):
  del bits
  error, delta = res
  g32 = g.astype(jnp.float32)
  scale = 1.0 + lax.stop_gradient(delta).astype(jnp.float32) * jnp.sign(g32) * error
  grad_x = (g32 * scale).astype(g.dtype)
  return grad_x, jnp.zeros_like(delta)


_ewgs.defvjp(_ewgs_fwd, _ewgs_bwd)


def ewgs(x: Array, bits: int, delta: Array | float) -> Array:
  """Rounds ``x`` in [0, 1]; backward is element-wise gradient scaling (EWGS Eq. 4).

  ``dL/dx = g (1 + delta * sign(g) * (x - x_q))`` with ``g = dL/dx_q``. ``delta >= 0`` is the
  scaling factor (EWGS Eq. 10; see :mod:`ewgs_jax.hessian`); ``delta = 0`` is exactly STE.
  ``delta`` may be a scalar or broadcast against ``x``; it gets a zero cotangent. As in the
  reference code, no clamping is applied to ``delta`` or to the scale inside the rule.

  Args:
    x: the latent value in [0, 1].
    bits: the static bit width.
    delta: the scaling factor, a scalar or an array broadcastable against ``x``.

  Returns:
    ``x_q`` (EWGS Eq. 2) in ``x.dtype``.
  """
  return _ewgs(x, check_bits(bits), jnp.asarray(delta, jnp.float32))


# --- PEGE --------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pege(x: Array, bits: int, mu: Array) -> Array:
  return _forward(x, bits)[0].astype(x.dtype)


def _pege_fwd(x, bits, mu):
  q, error = _forward(x, bits)
  return q.astype(x.dtype), (error, mu)


def _pege_bwd(bits, res, g):
  del bits
  error, mu = res
  grad_x = g.astype(jnp.float32) + lax.stop_gradient(mu).astype(jnp.float32) * error
  return grad_x.astype(g.dtype), jnp.zeros_like(mu)


_pege.defvjp(_pege_fwd, _pege_bwd)


def pege(x: Array, bits: int, mu: Array | float) -> Array:
  """Rounds ``x`` in [0, 1]; backward is PEGE's adaptive gradient estimate (PEGE Eq. 5).

  ``dL/dx_c = dL/dx_q + mu (x_c - x_q)``: the gradient of ``L + mu/2 ||x_c - sg(x_q)||^2``, so the
  latent value is also pulled towards its quantized value. ``x_c - x_q`` is measured in the
  normalised [0, 1] latent domain of the discretizer (for every forward method), which makes ``mu``
  independent of a layer's range. ``mu = 0`` is exactly STE. ``mu`` gets a zero cotangent.

  With progressive replacement (PEGE Eq. 3) the replacement happens after this discretizer, so the
  ``mu`` term is also added on elements that replacement kept at full precision (their ``g`` is 0
  here); the paper applies Eq. 5 to quantized elements only. ``mu`` is per-element and absolute,
  so its effect depends on the loss scale, batch size and layer size: see :func:`pege_relative`
  (the library's default).

  Args:
    x: the latent value ``x_c`` in [0, 1].
    bits: the static bit width.
    mu: the absolute pull strength, a scalar or an array broadcastable against ``x``.

  Returns:
    ``x_q`` (EWGS Eq. 2) in ``x.dtype``.
  """
  return _pege(x, check_bits(bits), jnp.asarray(mu, jnp.float32))


# --- PEGE, relative mu ---------------------------------------------------------------------------


def gradient_spread(g: Array) -> Array:
  """``3 sigma(g)`` over all elements, unbiased (the representative EWGS Eq. 10 divides by, as the
  reference code's ``3 * grad.std()``); float32, a constant of the backward pass.

  Args:
    g: the cotangent (any shape); gradients are stopped through it.

  Returns:
    A float32 scalar: ``3 * std(g)`` with ``ddof=1`` (``ddof=0`` for a single element).
  """
  g32 = lax.stop_gradient(g).astype(jnp.float32)
  return 3.0 * jnp.std(g32, ddof=1 if g32.size > 1 else 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pege_relative(x: Array, bits: int, mu: Array) -> Array:
  return _forward(x, bits)[0].astype(x.dtype)


def _pege_relative_bwd(bits, res, g):
  del bits
  error, mu = res
  g32 = g.astype(jnp.float32)
  scale = lax.stop_gradient(mu).astype(jnp.float32) * gradient_spread(g32)
  return (g32 + scale * error).astype(g.dtype), jnp.zeros_like(mu)


_pege_relative.defvjp(_pege_fwd, _pege_relative_bwd)


def pege_relative(x: Array, bits: int, mu: Array | float) -> Array:
  """Rounds ``x`` in [0, 1]; backward is PEGE Eq. 5 with a scale-free ``mu``.

  ``dL/dx_c = g + mu * 3 sigma(g) * (x_c - x_q)``, ``g = dL/dx_q``, ``sigma`` the unbiased standard
  deviation of ``g`` over the whole tensor (the EWGS Eq. 10 representative ``3 sigma(g)``).

  Why: in Eq. 5 the pull ``mu (x_c - x_q)`` is added to per-element gradients whose size depends on
  the loss scale, the batch size (a mean-reduced loss makes them ~1/B) and the layer's size, so one
  absolute ``mu`` means a different strength in every layer and setting (on Fashion-MNIST ResNet-20
  W2A2, ``mu = 1e-3`` swamped ``g`` and cost 18 points against STE). Measuring ``mu`` in units of
  ``3 sigma(g)`` makes the update direction invariant to scaling the loss (both terms scale with
  it) and puts ``mu`` on the scale of EWGS's ``delta``: at ``|g| = 3 sigma(g)`` the EWGS term
  ``delta |g| (x - x_q)`` equals this one with ``mu = delta``. ``mu = 0`` is exactly STE.

  Measured (README "Calibration", Fashion-MNIST, W2A2, 3 seeds): mu = 0.1, 1, 10 cost 1.9, 6.3 and
  17.4 points against STE; mu = 0.01 (the default ``pege.mu_kwargs.mu_max``) is indistinguishable
  from mu = 0; on weights only, mu = 0.1 still cost 1.0 point. So this normalisation fixes the
  scale dependence but does not make the mu term help at that scale.

  Args:
    x: the latent value ``x_c`` in [0, 1].
    bits: the static bit width.
    mu: the pull strength in units of ``3 sigma(g)``, a scalar or broadcastable against ``x``.

  Returns:
    ``x_q`` (EWGS Eq. 2) in ``x.dtype``.
  """
  return _pege_relative(x, check_bits(bits), jnp.asarray(mu, jnp.float32))
