"""Discretizers: forward rounding and each backward rule against its formula (EWGS Eq. 2, 4; PEGE Eq. 5).

The gradient-rule checks go through :mod:`ewgs_jax.testing`, the kit researchers use on their own rules.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import estimators, testing
from ewgs_jax.estimators import ewgs, pege, ste
from ewgs_jax.testing import latent_inputs, vjp

# The backward formulas of the library's rules, as the kit takes them: (x, g, error, factor) -> dL/dx.
STE_FORMULA = lambda x, g, error, factor: g
EWGS_FORMULA = lambda x, g, error, delta: g * (1 + delta * np.sign(g) * error)   # EWGS Eq. 4
PEGE_FORMULA = lambda x, g, error, mu: g + mu * error                              # PEGE Eq. 5
PEGE_RELATIVE_FORMULA = lambda x, g, error, mu: g + mu * 3.0 * np.std(np.asarray(g, np.float64), ddof=1) * error
RULES = [("ewgs", ewgs, "delta"), ("pege", pege, "mu"), ("pege_relative", estimators.pege_relative, "mu")]


@pytest.mark.parametrize("bits", range(1, 9))
def test_forward_is_round_half_to_even(bits):
  x = latent_inputs(bits)
  n = 2 ** bits - 1
  # float32 arithmetic, as torch.round((L - 1) * x) in the reference; numpy also rounds half to even
  expected = np.round(np.asarray(x) * np.float32(n)) / np.float32(n)
  for f in (ste, functools.partial(ewgs, delta=0.3), functools.partial(pege, mu=0.3)):
    np.testing.assert_allclose(f(x, bits), expected, atol=1e-7)
  # ties: (k + .5) goes to the even neighbour
  k = np.arange(n)
  ties = jnp.asarray(((k + 0.5) / n).astype(np.float32))
  tie_targets = np.where(k % 2 == 0, k, k + 1) / n
  np.testing.assert_allclose(ste(ties, bits), tie_targets, atol=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_vjps_equal_their_formulas(bits):
  # random inputs and the rounding ties, cotangents of both signs (the kit's assert_vjp_equals)
  testing.assert_vjp_equals(ste, STE_FORMULA, bits=bits, seed=bits, rtol=0, atol=0)   # bit for bit
  testing.assert_vjp_equals(ewgs, EWGS_FORMULA, bits=bits, factor=0.37, factor_name="delta", seed=bits, atol=0)
  testing.assert_vjp_equals(pege, PEGE_FORMULA, bits=bits, factor=2.5, factor_name="mu", seed=bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_zero_factor_is_exactly_ste(bits):
  x = latent_inputs(bits)
  g = jnp.asarray(np.random.default_rng(0).normal(size=x.shape).astype(np.float32))
  np.testing.assert_array_equal(vjp(lambda v: ste(v, bits), x, g), g)
  for _, rule, factor_name in RULES:
    testing.assert_zero_factor_is_ste(rule, bits=bits, factor_name=factor_name)


@pytest.mark.parametrize("name,rule,factor_name", RULES)
def test_forward_over_reverse_equals_reverse_over_reverse(name, rule, factor_name):
  for bits in (1, 2, 4):   # EWGS's backward is not a gradient: its J is not symmetric, only transposed
    testing.assert_second_order_modes_agree(functools.partial(rule, **{factor_name: 0.7}), bits=bits,
                                            symmetric=name != "ewgs")
  testing.assert_second_order_modes_agree(ste, bits=2)


@pytest.mark.parametrize("name,rule,factor_name", RULES)
def test_a_step_compiles_once_while_its_factor_changes(name, rule, factor_name):
  testing.assert_compiles_once(rule, bits=2, factor_name=factor_name, factors=[0.0, 0.3, 2.0])


class TestSTEVariants(testing.RuleTestCase):
  discretizer = staticmethod(ste)


class TestEWGSVariants(testing.RuleTestCase):
  discretizer = staticmethod(functools.partial(ewgs, delta=0.6))
  symmetric = False


class TestPEGEVariants(testing.RuleTestCase):
  discretizer = staticmethod(functools.partial(pege, mu=1.5))


class TestRelativePEGEVariants(testing.RuleTestCase):
  discretizer = staticmethod(functools.partial(estimators.pege_relative, mu=0.5))


def test_the_kit_catches_a_wrong_rule():
  with pytest.raises(AssertionError):   # PEGE's backward is not EWGS's formula
    testing.assert_vjp_equals(pege, EWGS_FORMULA, bits=2, factor=0.37, factor_name="mu")
  with pytest.raises(AssertionError):   # a rule that is not STE with its factor at 0
    testing.assert_zero_factor_is_ste(lambda x, bits, mu: ewgs(x, bits, mu + 1.0), bits=2, factor_name="mu")


# --- the kit catches broken rules, and passes correct ones at every bit width ----------------------


def _custom_rule(forward, backward):
  """A rule ``f(x, bits, factor)`` from ``forward(x, bits) -> (x_q, saved error)`` and ``backward(g, error, factor)``."""
  def rule(x, bits, factor):
    @jax.custom_vjp
    def f(x):
      return forward(x, bits)[0]

    def fwd(x):
      return forward(x, bits)

    f.defvjp(fwd, lambda error, g: (backward(g, error, factor),))
    return f(x)
  return rule


def _ties_away_from_zero(x, bits):   # floor(n x + 1/2): ties go up, away from zero for x >= 0
  n = 2 ** bits - 1
  error = jax.lax.stop_gradient(x - jnp.floor(x * n + 0.5) / n)
  return x - error, error


def _no_ste_derivative(x, bits):     # x_q from a plain round: its derivative is 0, not 1
  return estimators.round_to_grid(x, bits), jax.lax.stop_gradient(x - estimators.round_to_grid(x, bits))


def _error_moves_with_x(x, bits):    # the saved error is x - round(x): its derivative is 1, not 0
  error = x - estimators.round_to_grid(x, bits)
  return x - jax.lax.stop_gradient(error), error


def _error_in_other_float32_steps(x, bits):   # the same error as (n x - round(n x)) / n: correct, not bit-equal
  n = 2 ** bits - 1
  q, _ = estimators.rounding(x, bits)
  return q, jax.lax.stop_gradient((x * n - jnp.round(x * n)) / n)


EWGS_BACKWARD = lambda g, error, delta: g * (1 + delta * jnp.sign(g) * error)
STE_BACKWARD = lambda g, error, factor: g
PEGE_BACKWARD = lambda g, error, mu: g + mu * error


def _failing_rule_tests(rule, **attributes):
  """Runs the kit's RuleTestCase on ``rule``; returns the names of the tests that failed."""
  import unittest
  case = type("Case", (testing.RuleTestCase,), {"discretizer": staticmethod(rule), **attributes})
  result = unittest.TestResult()
  unittest.defaultTestLoader.loadTestsFromTestCase(case).run(result)
  assert result.testsRun >= 4
  return sorted({test.id().rsplit(".", 1)[1] for test, _ in result.failures + result.errors})


@pytest.mark.parametrize("bits", range(1, 17))
def test_the_kits_rounding_ties_are_exact_in_float32(bits):
  n = 2 ** bits - 1
  ties = np.asarray(latent_inputs(bits))[-n:]
  np.testing.assert_array_equal(ties * np.float32(n), np.arange(n, dtype=np.float32) + np.float32(0.5))


@pytest.mark.parametrize("backward, formula", [(STE_BACKWARD, STE_FORMULA), (EWGS_BACKWARD, EWGS_FORMULA)])
def test_the_kit_catches_a_forward_that_rounds_ties_away_from_zero(backward, formula):
  away = _custom_rule(_ties_away_from_zero, backward)
  for bits in (1, 2, 8):   # STE's backward does not see the forward: the VJP check checks the forward too
    with pytest.raises(AssertionError, match="round half to even"):
      testing.assert_vjp_equals(away, formula, bits=bits, factor=0.37, factor_name="factor")
  failing = _failing_rule_tests(functools.partial(away, factor=0.37), symmetric=backward is STE_BACKWARD)
  assert failing == ["test_forward_rounds_half_to_even"]
  half_to_even = _custom_rule(lambda x, bits: estimators.rounding(x, bits), backward)
  testing.assert_vjp_equals(half_to_even, formula, bits=8, factor=0.37, factor_name="factor")


@pytest.mark.parametrize("forward", [_no_ste_derivative, _error_moves_with_x])
def test_the_kit_catches_second_order_terms_that_do_not_follow_ste(forward):
  broken = _custom_rule(forward, EWGS_BACKWARD)
  testing.assert_vjp_equals(broken, EWGS_FORMULA, bits=2, factor=0.6, factor_name="factor")   # first order: fine
  with pytest.raises(AssertionError, match="do not follow STE"):
    testing.assert_second_order_follows_ste(functools.partial(broken, factor=0.6), bits=2)
  assert "test_second_order_follows_ste" in _failing_rule_tests(functools.partial(broken, factor=0.6))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mu", [1.0, 10.0, 100.0])
def test_a_correct_rule_passes_at_every_bit_width_and_tolerances_can_be_overridden(bits, mu):
  # its rounding error is exact to a few float32 ulps of x: relative to the grid step, 2^b - 1 times more
  rule = _custom_rule(_error_in_other_float32_steps, PEGE_BACKWARD)
  testing.assert_vjp_equals(rule, PEGE_FORMULA, bits=bits, factor=mu, factor_name="factor")
  if mu == 100.0:
    with pytest.raises(AssertionError, match="the VJP"):   # bit for bit, it is not
      testing.assert_vjp_equals(rule, PEGE_FORMULA, bits=bits, factor=mu, factor_name="factor", rtol=0, atol=0,
                                error_ulps=0)


def test_rule_test_case_tolerances_grow_with_the_bits_and_can_be_set():
  assert testing.tolerances(8)[1] == pytest.approx(255 / 3 * testing.tolerances(2)[1])
  assert testing.tolerances(2, scale=10.0)[1] == pytest.approx(10 * testing.tolerances(2)[1])
  rule = functools.partial(_custom_rule(_error_in_other_float32_steps, PEGE_BACKWARD), factor=10.0)
  assert _failing_rule_tests(rule) == []
  # a tolerance of 0 is taken as given: the two second-order modes differ in the last bits
  assert "test_second_order_modes_agree" in _failing_rule_tests(rule, rtol=0.0, atol=0.0)


def test_rule_scales_down_when_latent_is_ahead():
  # EWGS Fig. 2: x_n below x_q and a negative gradient (update pushes x up): scale > 1; positive: < 1.
  x = jnp.asarray([0.30])  # 2 bits: x_q = 1/3, x_n - x_q < 0
  assert vjp(lambda v: ewgs(v, 2, 1.0), x, jnp.asarray([-1.0]))[0] < -1.0
  assert vjp(lambda v: ewgs(v, 2, 1.0), x, jnp.asarray([1.0]))[0] < 1.0


def test_broadcast_factor_per_channel_and_no_gradient_to_it():
  x = jax.random.uniform(jax.random.key(0), (4, 3))
  delta = jnp.asarray([0.0, 1.0, 2.0])
  g = jnp.ones_like(x)
  error = np.asarray(x - ste(x, 2))
  np.testing.assert_allclose(vjp(lambda v: ewgs(v, 2, delta), x, g), 1 + np.asarray(delta) * error, rtol=1e-6)
  d_delta = jax.grad(lambda d: jnp.sum(ewgs(x, 2, d) ** 2))(delta)
  d_mu = jax.grad(lambda m: jnp.sum(pege(x, 2, m) ** 2))(jnp.float32(0.5))
  np.testing.assert_array_equal(d_delta, np.zeros(3))
  assert d_mu.shape == () and float(d_mu) == 0.0


def test_jit_vmap_and_traced_factor():
  x = jax.random.uniform(jax.random.key(1), (5, 16))
  deltas = jnp.linspace(0.0, 1.0, 5)

  def grad_row(row, d):
    return jax.grad(lambda v: jnp.sum(ewgs(v, 4, d) * jnp.arange(16.0)))(row)

  batched = jax.jit(jax.vmap(grad_row))(x, deltas)
  for i in range(5):
    np.testing.assert_allclose(batched[i], grad_row(x[i], deltas[i]), rtol=1e-6)


def test_bfloat16_inputs():
  x = jnp.asarray([0.0, 0.26, 0.5, 0.74, 1.0], jnp.bfloat16)
  for f in (ste, functools.partial(ewgs, delta=0.5), functools.partial(pege, mu=0.5)):
    y = f(x, 2)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), [0, 1 / 3, 2 / 3, 2 / 3, 1], atol=4e-3)
    g = jax.grad(lambda v: jnp.sum(f(v, 2).astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16


@pytest.mark.parametrize("bits", [0, 17, 2.0, True, -1])
def test_invalid_bits_raise(bits):
  with pytest.raises((ValueError, TypeError), match="bits"):
    ste(jnp.zeros(3), bits)


def test_rule_lookup_lists_choices():
  from ewgs_jax import rules
  assert rules.get("pege").discretizer is pege
  with pytest.raises(ValueError, match=r"unknown rule 'ewg' \(did you mean ewgs\?\); valid choices: \['ewgs', 'pege', 'ste'\]"):
    rules.get("ewg")


def test_ste_forward_is_bitwise_round_to_grid():
  # x + stop_gradient(q - x) must not perturb q by a float32 ulp: the forward is the grid value itself.
  for bits in (1, 2, 5, 8):
    x = latent_inputs(bits, n=2000)
    np.testing.assert_array_equal(ste(x, bits), estimators.round_to_grid(x, bits))
    np.testing.assert_array_equal(ewgs(x, bits, 0.5), estimators.round_to_grid(x, bits))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bfloat16_rounding_is_exact_over_every_bf16_value(bits):
  """Every bfloat16 in [0, 1] rounds like float32 round-half-even, then cast (the documented rule)."""
  import ml_dtypes
  raw = np.arange(0, 0x3F81, dtype=np.uint16)  # bf16 bit patterns 0 .. 1.0
  x = raw.view(ml_dtypes.bfloat16)
  n = np.float32(2 ** bits - 1)
  expected = (np.round(x.astype(np.float32) * n) / n).astype(ml_dtypes.bfloat16)
  for f in (ste, functools.partial(ewgs, delta=0.5), functools.partial(pege, mu=0.5)):
    y = f(jnp.asarray(x), bits)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16), expected.view(np.uint16))


def test_bfloat16_backward_uses_float32_error():
  import ml_dtypes
  x = jnp.asarray([0.3, 0.45, 0.9], jnp.bfloat16)
  g = jnp.asarray([1.0, -2.0, 0.5], jnp.bfloat16)
  x32 = np.asarray(x, np.float32)
  error = x32 - np.round(x32 * 3) / 3
  expected = (np.asarray(g, np.float32) * (1 + 0.8 * np.sign(np.asarray(g, np.float32)) * error))
  out = vjp(lambda v: ewgs(v, 2, 0.8), x, g)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out), expected.astype(ml_dtypes.bfloat16))
  out = vjp(lambda v: pege(v, 2, 3.0), x, g)
  np.testing.assert_array_equal(np.asarray(out), (np.asarray(g, np.float32) + 3.0 * error).astype(ml_dtypes.bfloat16))


def test_per_channel_mu_broadcasts():
  x = jax.random.uniform(jax.random.key(7), (6, 4))
  mu = jnp.asarray([0.0, 0.5, 1.0, 4.0])
  g = jax.random.normal(jax.random.key(8), (6, 4))
  error = np.asarray(x) - np.asarray(ste(x, 3))
  np.testing.assert_allclose(vjp(lambda v: pege(v, 3, mu), x, g), np.asarray(g) + np.asarray(mu) * error,
                             rtol=1e-6, atol=1e-7)
  d_mu = jax.grad(lambda m: jnp.sum(pege(x, 3, m) ** 2))(mu)
  np.testing.assert_array_equal(d_mu, np.zeros(4))
  d_delta = jax.grad(lambda d: jnp.sum(ewgs(x, 3, d) ** 2))(jnp.float32(0.4))
  assert float(d_delta) == 0.0


def test_grad_under_jit_with_traced_factors_matches_formula():
  x = latent_inputs(3)
  g = jnp.asarray(np.random.default_rng(3).normal(size=x.shape).astype(np.float32))
  error = np.asarray(x) - np.asarray(ste(x, 3))

  @jax.jit
  def grads(d, m):
    return (jax.grad(lambda v: jnp.vdot(g, ewgs(v, 3, d)))(x), jax.grad(lambda v: jnp.vdot(g, pege(v, 3, m)))(x))

  for d, m in [(0.0, 0.0), (0.5, 2.0), (3.0, 0.1)]:   # one compilation, changing factors
    ge, gp = grads(jnp.float32(d), jnp.float32(m))
    np.testing.assert_allclose(ge, EWGS_FORMULA(x, np.asarray(g), error, d), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gp, PEGE_FORMULA(x, np.asarray(g), error, m), rtol=1e-6, atol=1e-7)
  assert grads._cache_size() == 1


try:
  from hypothesis import given, settings, strategies as st
  from hypothesis.extra.numpy import arrays
except ImportError:  # pragma: no cover - hypothesis is in the test extra
  given = None

if given is not None:
  _UNIT = st.floats(0.0, 1.0, width=32)
  _COT = st.floats(-4.0, 4.0, width=32)

  @settings(max_examples=30, deadline=None)
  @given(bits=st.integers(1, 8), x=arrays(np.float32, 8, elements=_UNIT), g=arrays(np.float32, 8, elements=_COT),
         delta=st.floats(0.0, 5.0, width=32), mu=st.floats(0.0, 5.0, width=32))
  def test_property_vjps_equal_formulas(bits, x, g, delta, mu):
    n = np.float32(2 ** bits - 1)
    q = np.round(x * n) / n
    error = x - q
    np.testing.assert_array_equal(vjp(lambda v: ste(v, bits), jnp.asarray(x), jnp.asarray(g)), g)
    np.testing.assert_allclose(vjp(lambda v: ewgs(v, bits, delta), jnp.asarray(x), jnp.asarray(g)),
                               g * (1 + np.float32(delta) * np.sign(g) * error), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vjp(lambda v: pege(v, bits, mu), jnp.asarray(x), jnp.asarray(g)),
                               g + np.float32(mu) * error, rtol=1e-6, atol=1e-6)
    # XLA:CPU turns the division by 2^b - 1 into a reciprocal multiply under jit: allow 1 ulp.
    np.testing.assert_allclose(ste(jnp.asarray(x), bits), q, rtol=2.5e-7, atol=0)


# --- PEGE with mu relative to the spread of g_q -------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_relative_pege_vjp_equals_its_formula(bits):
  x = latent_inputs(bits)
  rng = np.random.default_rng(bits + 11)
  g = jnp.asarray(rng.normal(0.0, 0.01, x.shape).astype(np.float32))
  error = np.asarray(x) - np.asarray(ste(x, bits))
  mu = 0.7
  spread = 3.0 * np.std(np.asarray(g, np.float64), ddof=1)
  np.testing.assert_allclose(vjp(lambda v: estimators.pege_relative(v, bits, mu), x, g),
                             np.asarray(g) + mu * spread * error, rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(vjp(lambda v: estimators.pege_relative(v, bits, 0.0), x, g), g)
  testing.assert_vjp_equals(estimators.pege_relative, PEGE_RELATIVE_FORMULA, bits=bits, factor=mu,
                            factor_name="mu", cotangent_scale=0.01, rtol=1e-5, atol=1e-9)


def _quantized_conv_loss(rule, mu):
  """A conv with interval-quantized weights and activations whose backward is ``rule(mu)``."""
  from ewgs_jax import quantizers
  disc = functools.partial(rule, mu=mu)

  def loss(params, x, scale):
    w_q = quantizers.interval(params["w"], params["lw"], params["uw"], bits=2, weight=True, discretizer=disc)
    x_q = quantizers.interval(x, params["la"], params["ua"], bits=2, weight=False, discretizer=disc)
    y = jax.lax.conv_general_dilated(x_q, w_q, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return scale * jnp.mean((y - 0.3) ** 2)

  return loss


def test_relative_pege_update_direction_is_invariant_to_the_loss_scale():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(0, 0.3, (3, 3, 4, 4)), jnp.float32), "lw": jnp.float32(-0.5),
            "uw": jnp.float32(0.5), "la": jnp.float32(0.0), "ua": jnp.float32(1.5)}
  x = jnp.asarray(rng.uniform(0, 2, (8, 6, 6, 4)), jnp.float32)
  for rule, invariant in ((estimators.pege_relative, True), (pege, False)):
    grad = jax.jit(jax.grad(_quantized_conv_loss(rule, 0.5)))
    base = grad(params, x, 1.0)
    for c in (1e-3, 1e3):
      scaled = jax.tree.map(lambda a: a / c, grad(params, x, c))
      close = [np.allclose(s, b, rtol=1e-4, atol=1e-9) for s, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(base))]
      # relative mu: every gradient scales exactly with the loss; absolute mu (PEGE Eq. 5 as written): it does not
      assert all(close) if invariant else not all(close), (rule, c, close)
