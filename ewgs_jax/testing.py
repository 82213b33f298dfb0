"""A chex test kit for gradient rules: check your own backward rule the way the library checks its own.

Plain assertion functions (usable from any test runner) and :class:`RuleTestCase`, a ``chex.TestCase``
to subclass, which adds the jit / no-jit / device variants through ``chex.all_variants``::

    from ewgs_jax import estimators, testing

    def my_formula(x, g, error, factor):          # numpy: the cotangent your rule should return
      return g * (1 + factor * error ** 2)

    testing.assert_vjp_equals(my_rule, my_formula, bits=2, factor=0.5, factor_name="lam")   # random inputs and ties
    testing.assert_zero_factor_is_ste(my_rule, bits=2, factor_name="lam")
    testing.assert_second_order_modes_agree(functools.partial(my_rule, lam=0.5), bits=2)
    testing.assert_second_order_follows_ste(functools.partial(my_rule, lam=0.5), bits=2)
    testing.assert_compiles_once(my_rule, bits=2, factor_name="lam", factors=[0.0, 0.1, 1.0])

    class MyRuleTest(testing.RuleTestCase):    # runs under pytest and absltest
      discretizer = staticmethod(functools.partial(my_rule, lam=0.5))

A *discretizer* here is ``f(x, bits, **{factor_name: value})`` (the ``discretizer`` of an
:class:`ewgs_jax.rules.Rule`); ``x`` is the latent value in [0, 1]. The rounding error
passed to formulas is ``x - x_q`` in float32, as the library's rules save it.

What the kit checks, and what it catches:

* the forward rounds half to even (EWGS Eq. 2, as ``torch.round``) at every rounding tie, exact in
  float32: a forward that rounds ties away from zero fails, whatever its backward
  (:func:`assert_forward_rounds_half_to_even`, also part of :func:`assert_vjp_equals`);
* the backward equals the formula on random inputs and at the ties (:func:`assert_vjp_equals`);
* second-order terms through the rounding follow STE, as ARCHITECTURE.md's rule contract asks: ``x_q``
  carries the derivative 1 and the saved rounding error is a constant
  (:func:`assert_second_order_follows_ste`): a forward built on a plain ``jnp.round`` fails;
* forward-over-reverse agrees with reverse-over-reverse, a step compiles once while the factor
  changes, and the gradient is the same under jit / vmap / devices (:class:`RuleTestCase`).

Tolerances follow float32 and the grid, and every check takes its own (:func:`tolerances`): the
rounding error ``x - x_q`` is a difference of numbers of the input's size, so float32 knows it only
to a few ulps of the input, which is ``ulps * eps * (2^b - 1)`` grid steps: a correct rule that
computes it in another (equally exact) way differs from the formula by that much, more at 8 bits
than at 2, and more for a larger factor.
"""

from __future__ import annotations

import functools
import unittest
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ewgs_jax import estimators

#: ``formula(x, g, error, factor) -> expected dL/dx`` in numpy (evaluated in float64).
Formula = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], np.ndarray]

#: The float32 machine epsilon (one ulp of 1.0).
EPS32 = float(np.finfo(np.float32).eps)


def tolerances(bits: int, *, scale: float = 1.0, ulps: float = 4.0) -> tuple[float, float]:
  """Default ``(rtol, atol)`` for comparing two float32 computations of a rule's gradient.

  ``rtol = 2 ulps eps`` covers the rule's own arithmetic on the cotangent. ``atol`` covers the
  rounding error: ``x - x_q`` is a difference of numbers of size ~1 (the latent input), so float32
  knows it only to ``ulps * eps`` absolute, i.e. ``ulps * eps * (2^b - 1)`` grid steps; a backward
  term of the cotangent's size per grid step (``scale``) moves by that much. Hence the tolerance
  grows with the bit width and the cotangent's size.

  Args:
    bits: the bit width.
    scale: the size of the compared gradients (the cotangent's scale).
    ulps: float32 ulps of the rounding error to allow.

  Returns:
    ``(rtol, atol)``.
  """
  return 2 * ulps * EPS32, ulps * EPS32 * scale * estimators.levels(bits)


def latent_inputs(bits: int, n: int = 257, seed: int = 0) -> jax.Array:
  """Latent test values: random ones in [0, 1], the endpoints, and every rounding tie.

  Each tie is exact in float32: ``float32(x) * (2^b - 1)`` is exactly ``k + 1/2``, so a forward that
  rounds ties away from zero (or up) gives another ``x_q`` than half to even.

  Args:
    bits: the bit width (the ties are ``(k + 0.5) / (2^bits - 1)``, the last ``2^bits - 1`` values).
    n: how many random values.
    seed: the random seed.

  Returns:
    A float32 vector.
  """
  levels = 2 ** bits - 1
  rng = np.random.default_rng(seed + bits)
  ties = ((np.arange(levels) + 0.5) / levels).astype(np.float32)
  return jnp.asarray(np.concatenate([rng.uniform(0, 1, n).astype(np.float32), [0.0, 1.0], ties]).astype(np.float32))


def rounding_error(x, bits: int) -> np.ndarray:
  """``x - round((2^b - 1) x) / (2^b - 1)`` in float32 (round half to even), as the rules save it.

  Args:
    x: latent values.
    bits: the bit width.

  Returns:
    The error, a numpy array.
  """
  return np.asarray(x, np.float32) - np.asarray(estimators.round_to_grid(jnp.asarray(x, jnp.float32), bits))


def vjp(f: Callable, x, g):
  """``dL/dx`` of ``f`` at ``x`` for the cotangent ``g``.

  Args:
    f: a function of one array.
    x: the primal.
    g: the cotangent.

  Returns:
    The pulled-back cotangent.
  """
  return jax.vjp(f, x)[1](g)[0]


def _bind(discretizer: Callable, factor_name: str | None, factor) -> Callable:
  return discretizer if factor_name is None else functools.partial(discretizer, **{factor_name: factor})


def _assert_within(got, want, tolerance, what: str, x) -> None:
  """Element-wise ``|got - want| <= tolerance``; the message names the first offending input."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  tolerance = np.broadcast_to(np.asarray(tolerance, np.float64), got.shape)
  bad = ~(np.abs(got - want) <= tolerance)   # NaN fails too
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements differ; the first at x = {float(x[i])!r}: "
                         f"got {got[i]!r}, want {want[i]!r} (|difference| {abs(got[i] - want[i]):.3g} > "
                         f"tolerance {tolerance[i]:.3g})")


def assert_forward_rounds_half_to_even(discretizer: Callable, *, bits: int, factor=None,
                                       factor_name: str | None = None, seed: int = 0, atol: float | None = None) -> None:
  """Asserts the forward is ``round((2^b - 1) x) / (2^b - 1)``, half to even (EWGS Eq. 2), eagerly and under jit.

  The inputs include every rounding tie, exact in float32 (:func:`latent_inputs`), where rounding
  half away from zero (or half up) lands one grid step away.

  Args:
    discretizer: ``f(x, bits, **{factor_name: factor})``, or ``f(x, bits)`` if ``factor_name`` is None.
    bits: the bit width.
    factor: the rule's hyper-parameter.
    factor_name: its keyword; None when ``discretizer`` takes none or is bound.
    seed: the random seed.
    atol: the tolerance (default ``4 eps``: a rule may form ``x_q`` as ``x - (x - x_q)``).
  """
  f = _bind(discretizer, factor_name, factor)
  x = latent_inputs(bits, seed=seed)
  want = np.asarray(estimators.round_to_grid(x, bits), np.float64)
  for name, fn in (("eagerly", f), ("under jit", jax.jit(f, static_argnums=1))):
    _assert_within(np.asarray(fn(x, bits), np.float32), want, 4 * EPS32 if atol is None else atol,
                   f"the forward does not round half to even (EWGS Eq. 2) {name}, bits={bits}", np.asarray(x))


def assert_vjp_equals(discretizer: Callable, formula: Formula, *, bits: int, factor=None,
                      factor_name: str | None = None, seed: int = 0, rtol: float | None = None,
                      atol: float | None = None, cotangent_scale: float = 1.0, error_ulps: float = 4.0) -> None:
  """Asserts the discretizer rounds half to even and its VJP equals ``formula``, on random inputs and at the ties.

  Cotangents of both signs are used (within one vector and flipped as a whole). The forward is
  checked first (:func:`assert_forward_rounds_half_to_even`): a backward that ignores the rounding
  (STE) would not show a wrong forward. ``formula`` is evaluated in float64 on the float32 inputs.

  Each element may differ by ``rtol * |want| + atol`` plus how far the formula moves when the
  rounding error moves by ``error_ulps`` float32 ulps of the input (how well float32 knows it):
  that part grows with the bit width for a formula in grid steps, and with the factor.

  Args:
    discretizer: ``f(x, bits, **{factor_name: factor})``, or ``f(x, bits)`` if ``factor_name`` is None.
    formula: ``formula(x, g, error, factor)`` -> the expected cotangent.
    bits: the bit width.
    factor: the rule's hyper-parameter.
    factor_name: its keyword (``"delta"``, ``"mu"``); None when ``discretizer`` takes none or is bound.
    seed: the random seed.
    rtol, atol: tolerances (defaults ``8 eps`` and ``eps * cotangent_scale``; 0 and 0 with
      ``error_ulps=0`` for bit for bit).
    cotangent_scale: the size of the random cotangents.
    error_ulps: float32 ulps of the input by which a correct rule's rounding error may differ.
  """
  assert_forward_rounds_half_to_even(discretizer, bits=bits, factor=factor, factor_name=factor_name, seed=seed)
  rtol = 8 * EPS32 if rtol is None else rtol
  atol = EPS32 * cotangent_scale if atol is None else atol
  f = _bind(discretizer, factor_name, factor)
  x = latent_inputs(bits, seed=seed)
  x64 = np.asarray(x, np.float64)
  error = rounding_error(x, bits).astype(np.float64)
  shift = error_ulps * EPS32 * float(np.max(np.abs(x64)))
  rng = np.random.default_rng(seed + 100 * bits)
  ties = slice(len(x64) - (2 ** bits - 1), None)
  for sign in (1.0, -1.0):
    g = (sign * rng.uniform(0.1, 2.0, x.shape) * cotangent_scale).astype(np.float32)
    g[::7] *= -1.0
    got = np.asarray(vjp(lambda v: f(v, bits), x, jnp.asarray(g)))
    g64 = g.astype(np.float64)
    want = np.asarray(formula(x64, g64, error, factor), np.float64)
    moved = np.maximum(np.abs(np.asarray(formula(x64, g64, error + shift, factor)) - want),
                       np.abs(np.asarray(formula(x64, g64, error - shift, factor)) - want))
    tolerance = rtol * np.abs(want) + atol + moved
    _assert_within(got[ties], want[ties], tolerance[ties], f"the VJP at the rounding ties, bits={bits}, sign={sign}",
                   x64[ties])
    _assert_within(got, want, tolerance, f"the VJP, bits={bits}, sign={sign}", x64)


def assert_zero_factor_is_ste(discretizer: Callable, *, bits: int, factor_name: str, seed: int = 0) -> None:
  """Asserts the rule with its hyper-parameter at 0 is exactly STE: forward and backward, bit for bit.

  Args:
    discretizer: ``f(x, bits, **{factor_name: value})``.
    bits: the bit width.
    factor_name: the hyper-parameter's keyword.
    seed: the random seed.
  """
  f = _bind(discretizer, factor_name, 0.0)
  x = latent_inputs(bits, seed=seed)
  g = jnp.asarray(np.random.default_rng(seed).normal(size=x.shape).astype(np.float32))
  np.testing.assert_array_equal(f(x, bits), estimators.ste(x, bits))
  np.testing.assert_array_equal(vjp(lambda v: f(v, bits), x, g), vjp(lambda v: estimators.ste(v, bits), x, g))


def assert_second_order_follows_ste(discretizer: Callable, *, bits: int, seed: int = 0, rtol: float | None = None,
                                    atol: float | None = None) -> None:
  """Asserts derivatives taken through the rounding follow STE (ARCHITECTURE.md's rule contract).

  Forward-over-reverse (``jax.jvp(jax.grad(L))``, the Hessian code) differentiates the backward
  rule ``B(g, e)`` along ``x``. The contract: the forward's ``x_q`` carries the straight-through
  derivative 1 and the saved rounding error ``e`` is a constant. So for
  ``L = sum(c x_q^2 / 2 + d x_q)`` (``g = c x_q + d``), the product with ``v`` must be

      J v = dB/dg (g, e) [c v]

  (the rule's own backward, differentiated in its cotangent only). A forward built on a plain
  ``jnp.round`` (derivative 0) gives 0 there; a saved error that moves with ``x`` adds
  ``dB/de v``. Checked on random inputs and at every rounding tie.

  Args:
    discretizer: a bound discretizer ``f(x, bits)``.
    bits: the bit width.
    seed: the random seed.
    rtol, atol: tolerances (default :func:`tolerances` at the scale 2 of ``c v``).
  """
  default_rtol, default_atol = tolerances(bits, scale=2.0)
  rtol, atol = default_rtol if rtol is None else rtol, default_atol if atol is None else atol
  x = latent_inputs(bits, seed=seed)
  rng = np.random.default_rng(seed + 7 * bits)
  c = jnp.asarray(rng.uniform(0.5, 2.0, x.shape).astype(np.float32))
  d = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  v = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  f = lambda p: discretizer(p, bits)

  def loss(p):
    y = f(p)   # one call: a rule need not be linear in its cotangent (EWGS's sign(g))
    return jnp.sum(0.5 * c * y ** 2 + d * y)

  through_rounding = jax.jvp(jax.grad(loss), (x,), (v,))[1]
  x_q, pullback = jax.vjp(f, x)
  straight_through = jax.jvp(lambda g: pullback(g)[0], (c * x_q + d,), (c * v,))[1]
  want = np.asarray(straight_through, np.float64)
  _assert_within(through_rounding, want, rtol * np.abs(want) + atol,
                 f"second-order terms through the rounding do not follow STE, bits={bits} (the forward's x_q "
                 f"must carry the derivative 1 and the saved rounding error must be a constant)", np.asarray(x))


def assert_second_order_modes_agree(discretizer: Callable, *, bits: int, symmetric: bool = True, seed: int = 0,
                                    rtol: float | None = None, atol: float | None = None) -> None:
  """Asserts forward-over-reverse agrees with reverse-over-reverse through the discretizer.

  The Hessian code uses ``jax.jvp(jax.grad(loss))`` (``J v``, ``J`` the Jacobian of the gradient);
  reverse-over-reverse gives ``J^T u``. On a small smooth loss around the discretizer
  (``x = sigmoid(M theta)``, ``sum(tanh(f(x) R)^2) + 0.1 sum(x^3)``) this asserts
  ``u . (J v) = (J^T u) . v`` for random ``u, v`` (the two modes linearise the same map: the rule's
  forward is forward-differentiable, i.e. it does not call the decorated function), and, for rules
  whose backward is the gradient of a function (``symmetric``: STE, PEGE), ``J v = J^T v``. EWGS's
  backward ``g (1 + delta sign(g) (x - x_q))`` is not a gradient, so its ``J`` is not symmetric.

  Args:
    discretizer: a bound discretizer ``f(x, bits)``.
    bits: the bit width.
    symmetric: also assert ``J v = J^T v``.
    seed: the random seed.
    rtol, atol: tolerances (default ``1e-5`` and :func:`tolerances` at the scale 10 of ``J v``,
      at least ``1e-6``).
  """
  rtol = 1e-5 if rtol is None else rtol
  atol = max(1e-6, tolerances(bits, scale=10.0)[1]) if atol is None else atol
  keys = jax.random.split(jax.random.key(seed), 5)
  theta = jax.random.normal(keys[0], (16,))
  v = jax.random.normal(keys[1], (16,))
  u = jax.random.normal(keys[4], (16,))
  mix = jax.random.normal(keys[2], (16, 16)) * 0.5
  readout = jax.random.normal(keys[3], (16, 4))

  def loss(p):
    x = jax.nn.sigmoid(mix @ p)
    return jnp.sum(jnp.tanh(discretizer(x, bits) @ readout) ** 2) + 0.1 * jnp.sum(x ** 3)

  grad = jax.grad(loss)
  forward_over_reverse = lambda t: jax.jvp(grad, (theta,), (t,))[1]               # J t
  reverse_over_reverse = lambda t: jax.grad(lambda p: jnp.vdot(grad(p), t))(theta)  # J^T t
  np.testing.assert_allclose(jnp.vdot(u, forward_over_reverse(v)), jnp.vdot(reverse_over_reverse(u), v),
                             rtol=rtol, atol=atol)
  if symmetric:
    np.testing.assert_allclose(forward_over_reverse(v), reverse_over_reverse(v), rtol=rtol, atol=atol)


def assert_compiles_once(discretizer: Callable, *, bits: int, factor_name: str, factors: Sequence[float],
                         shape: tuple[int, ...] = (8, 16)) -> None:
  """Asserts a jitted gradient step through the rule traces once while its factor changes.

  The factor must be a traced argument (never hashed), so a per-step schedule (PEGE mu_T) or a
  Hessian refresh (EWGS delta) does not recompile the train step (``chex.assert_max_traces``).

  Args:
    discretizer: ``f(x, bits, **{factor_name: value})``.
    bits: the bit width.
    factor_name: the hyper-parameter's keyword.
    factors: the values to step through (at least two).
    shape: the latent tensor's shape.
  """
  chex.clear_trace_counter()
  x = jax.random.uniform(jax.random.key(0), shape)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, factor):
    return jax.grad(lambda v: jnp.sum(jnp.sin(discretizer(v, bits, **{factor_name: factor}))))(x)

  for factor in factors:
    jax.block_until_ready(step(x, jnp.float32(factor)))


def assert_variants_agree(fn: Callable, *args, variants: Sequence[Callable] | None = None,
                          rtol: float = 1e-6, atol: float = 1e-7) -> None:
  """Asserts ``fn(*args)`` is the same eagerly, under ``jax.jit`` and (batched) under ``jax.vmap``.

  For chex's own variants (jit, no-jit, with/without device) subclass :class:`RuleTestCase`.

  Args:
    fn: a function of arrays (e.g. the gradient of a loss through a rule).
    *args: its arguments; ``vmap`` maps over a new leading axis of size 2 added to each.
    variants: transformations to compare (default: identity, ``jax.jit``).
    rtol, atol: tolerances.
  """
  reference = fn(*args)
  for variant in variants or (lambda f: f, jax.jit):
    chex.assert_trees_all_close(variant(fn)(*args), reference, rtol=rtol, atol=atol)
  stacked = [jnp.stack([a, a]) for a in args]
  batched = jax.vmap(fn)(*stacked)
  chex.assert_trees_all_close(jax.tree.map(lambda b: b[1], batched), reference, rtol=rtol, atol=atol)


class RuleTestCase(chex.TestCase):
  """Subclass with ``discretizer = staticmethod(bound rule)`` (``f(x, bits)``) to get the rule's tests.

  ``chex.all_variants`` runs the gradient test under jit, without jit, with and without a device;
  the gradient of a loss through the rule must be the same in all of them and under ``jax.vmap``.
  The forward must round half to even at every tie, the two second-order modes must agree, and
  second-order terms through the rounding must follow STE. Tolerances default to
  :func:`tolerances` for each bit width (they grow with it); set ``rtol`` / ``atol`` to override.
  """
  discretizer: Callable | None = None
  bits: Sequence[int] = (1, 2, 4, 8)
  symmetric: bool = True   # see assert_second_order_modes_agree: False for rules that are not gradients
  rtol: float | None = None
  atol: float | None = None

  def _rule(self) -> Callable:
    if self.discretizer is None:
      raise unittest.SkipTest("RuleTestCase itself: set `discretizer` in a subclass")
    return self.discretizer

  def _tolerances(self, bits: int, scale: float) -> tuple[float, float]:
    rtol, atol = tolerances(bits, scale=scale)
    return (rtol if self.rtol is None else self.rtol), (atol if self.atol is None else self.atol)

  def _grad(self, bits):
    rule = self._rule()
    return jax.grad(lambda v: jnp.sum(jnp.sin(3.0 * rule(v, bits))))

  @chex.all_variants(with_pmap=False)
  def test_gradient_is_variant_invariant(self):
    self._rule()
    for bits in self.bits:
      rtol, atol = self._tolerances(bits, scale=3.0)   # the cotangent 3 cos(3 x_q)
      x = latent_inputs(bits)
      reference = self._grad(bits)(x)
      chex.assert_trees_all_close(self.variant(self._grad(bits))(x), reference, rtol=rtol, atol=atol)
      batched = jax.vmap(self._grad(bits))(jnp.stack([x, x[::-1]]))
      chex.assert_trees_all_close(batched[0], reference, rtol=rtol, atol=atol)

  def test_forward_rounds_half_to_even(self):
    rule = self._rule()
    for bits in self.bits:
      assert_forward_rounds_half_to_even(rule, bits=bits)

  def test_second_order_modes_agree(self):
    rule = self._rule()
    for bits in self.bits:
      assert_second_order_modes_agree(rule, bits=bits, symmetric=self.symmetric, rtol=self.rtol, atol=self.atol)

  def test_second_order_follows_ste(self):
    rule = self._rule()
    for bits in self.bits:
      assert_second_order_follows_ste(rule, bits=bits, rtol=self.rtol, atol=self.atol)
