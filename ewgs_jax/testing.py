"""A chex test kit for gradient rules: check your own backward rule the way the library checks its own.

Plain assertion functions (usable from any test runner) and :class:`RuleTestCase`, a ``chex.TestCase``
to subclass, which adds the jit / no-jit / device variants through ``chex.all_variants``::

    from ewgs_jax import estimators, testing

    def my_formula(x, g, error, factor):          # numpy: the cotangent your rule should return
      return g * (1 + factor * error ** 2)

    testing.assert_vjp_equals(my_rule, my_formula, bits=2, factor=0.5)   # random inputs and ties
    testing.assert_zero_factor_is_ste(my_rule, bits=2, factor_name="lam")
    testing.assert_second_order_modes_agree(functools.partial(my_rule, lam=0.5), bits=2)
    testing.assert_compiles_once(my_rule, bits=2, factor_name="lam", factors=[0.0, 0.1, 1.0])

    class MyRuleTest(testing.RuleTestCase):    # runs under pytest and absltest
      discretizer = staticmethod(functools.partial(my_rule, lam=0.5))

A *discretizer* here is ``f(x, bits, **{factor_name: value})`` (the ``discretizer`` of an
:class:`ewgs_jax.estimators.BackwardRule`); ``x`` is the latent value in [0, 1]. The rounding error
passed to formulas is ``x - x_q`` in float32, as the library's rules save it.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ewgs_jax import estimators

#: ``formula(x, g, error, factor) -> expected dL/dx`` in numpy (float32 or float64 arrays).
Formula = Callable[[np.ndarray, np.ndarray, np.ndarray, float | None], np.ndarray]


def latent_inputs(bits: int, n: int = 257, seed: int = 0) -> jax.Array:
  """Latent test values: random ones in [0, 1], the endpoints, and every rounding tie.

  Args:
    bits: the bit width (the ties are ``(k + 0.5) / (2^bits - 1)``).
    n: how many random values.
    seed: the random seed.

  Returns:
    A float32 vector.
  """
  levels = 2 ** bits - 1
  rng = np.random.default_rng(seed + bits)
  ties = (np.arange(levels) + 0.5) / levels
  return jnp.asarray(np.concatenate([rng.uniform(0, 1, n), [0.0, 1.0], ties]).astype(np.float32))


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


def assert_vjp_equals(discretizer: Callable, formula: Formula, *, bits: int, factor=None,
                      factor_name: str | None = None, seed: int = 0, rtol: float = 1e-6, atol: float = 1e-7,
                      cotangent_scale: float = 1.0) -> None:
  """Asserts the discretizer's VJP equals ``formula`` on random inputs and at the rounding ties.

  Cotangents of both signs are used (within one vector and flipped as a whole).

  Args:
    discretizer: ``f(x, bits, **{factor_name: factor})``, or ``f(x, bits)`` if ``factor_name`` is None.
    formula: ``formula(x, g, error, factor)`` -> the expected cotangent.
    bits: the bit width.
    factor: the rule's hyper-parameter.
    factor_name: its keyword (``"delta"``, ``"mu"``); None when ``discretizer`` takes none or is bound.
    seed: the random seed.
    rtol, atol: tolerances.
    cotangent_scale: the size of the random cotangents.
  """
  f = _bind(discretizer, factor_name, factor)
  x = latent_inputs(bits, seed=seed)
  error = rounding_error(x, bits)
  rng = np.random.default_rng(seed + 100 * bits)
  for sign in (1.0, -1.0):
    g = (sign * rng.uniform(0.1, 2.0, x.shape) * cotangent_scale).astype(np.float32)
    g[::7] *= -1.0
    got = np.asarray(vjp(lambda v: f(v, bits), x, jnp.asarray(g)))
    want = formula(np.asarray(x), g, error, factor)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"bits={bits}, sign={sign}")
    ties = slice(len(x) - (2 ** bits - 1), None)
    np.testing.assert_allclose(got[ties], np.asarray(want)[ties], rtol=rtol, atol=atol,
                               err_msg=f"at the rounding ties, bits={bits}")


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


def assert_second_order_modes_agree(discretizer: Callable, *, bits: int, symmetric: bool = True, seed: int = 0,
                                    rtol: float = 1e-5, atol: float = 1e-6) -> None:
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
    rtol, atol: tolerances.
  """
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
  """Subclass with ``discretizer = staticmethod(bound rule)`` (``f(x, bits)``) to get the variant tests.

  ``chex.all_variants`` runs each test under jit, without jit, with and without a device; the
  gradient of a loss through the rule must be the same in all of them and under ``jax.vmap``.
  """
  discretizer: Callable | None = None
  bits: Sequence[int] = (1, 2, 4, 8)
  symmetric: bool = True   # see assert_second_order_modes_agree: False for rules that are not gradients

  def _grad(self, bits):
    return jax.grad(lambda v: jnp.sum(jnp.sin(3.0 * self.discretizer(v, bits))))

  @chex.all_variants(with_pmap=False)
  def test_gradient_is_variant_invariant(self):
    if self.discretizer is None:
      self.skipTest("RuleTestCase itself: set `discretizer` in a subclass")
    for bits in self.bits:
      x = latent_inputs(bits)
      reference = self._grad(bits)(x)
      chex.assert_trees_all_close(self.variant(self._grad(bits))(x), reference, rtol=1e-6, atol=1e-7)
      batched = jax.vmap(self._grad(bits))(jnp.stack([x, x[::-1]]))
      chex.assert_trees_all_close(batched[0], reference, rtol=1e-6, atol=1e-7)

  def test_second_order_modes_agree(self):
    if self.discretizer is None:
      self.skipTest("RuleTestCase itself: set `discretizer` in a subclass")
    for bits in self.bits:
      assert_second_order_modes_agree(self.discretizer, bits=bits, symmetric=self.symmetric)
