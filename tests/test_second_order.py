"""Forward-over-reverse (``jax.jvp(jax.grad(f))``) through every discretizer and quantizer."""

import functools

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

import ewgs_jax as ej

DISCRETIZERS = {
    "ste": ej.ste,
    "ewgs": functools.partial(ej.ewgs, delta=0.7),
    "pege": functools.partial(ej.pege, mu=0.3),
}
QUANTIZERS = {
    "interval_w": lambda x, d: ej.interval(x, -1.0, 1.2, bits=2, weight=True, discretizer=d),
    "interval_a": lambda x, d: ej.interval(x, 0.0, 1.5, bits=3, weight=False, discretizer=d),
    "pact": lambda x, d: ej.pact(x, 1.5, bits=2, discretizer=d),
    "pact_signed": lambda x, d: ej.pact(x, 1.5, bits=2, signed=True, discretizer=d),
    "lsq_signed": lambda x, d: ej.lsq(x, 0.4, bits=3, signed=True, discretizer=d),
    "lsq_unsigned": lambda x, d: ej.lsq(x, 0.4, bits=3, signed=False, discretizer=d),
    "dorefa_w": lambda x, d: ej.dorefa(x, bits=2, weight=True, discretizer=d),
    "dorefa_a": lambda x, d: ej.dorefa(x, bits=2, weight=False, discretizer=d),
}


def hvp_forward_over_reverse(f, x, v):
  return jax.jvp(jax.grad(f), (x,), (v,))[1]


def hvp_reverse_over_reverse(f, x, v):
  return jax.grad(lambda y: jnp.vdot(jax.grad(f)(y), v))(x)


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("rule", sorted(DISCRETIZERS))
def test_jvp_of_grad_runs_and_matches_reverse_over_reverse_in_vhv(quantizer, rule):
  x = jax.random.normal(jax.random.key(0), (24,))
  coef = jax.random.normal(jax.random.key(1), (24,))
  q = QUANTIZERS[quantizer]

  def f(y):   # smooth outside the quantizer so the Hessian is non-trivial
    return jnp.sum(jnp.tanh(coef * q(jnp.sin(y), DISCRETIZERS[rule])) ** 2)

  v = jax.random.rademacher(jax.random.key(2), (24,), jnp.float32)
  fwd = hvp_forward_over_reverse(f, x, v)
  rev = hvp_reverse_over_reverse(f, x, v)
  assert np.all(np.isfinite(fwd))
  # EWGS's rule is not a conservative field, so J v and J^T v may differ, but v^T J v may not.
  np.testing.assert_allclose(jnp.vdot(v, fwd), jnp.vdot(v, rev), rtol=1e-4, atol=1e-5)
  if rule != "ewgs":
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-5)


def test_second_order_through_the_rounding_is_straight_through():
  # d/dx of the STE gradient of sum(q(x)^2) = 2 * (d q/dx)^2 = 2 with STE at second order too.
  x = jnp.asarray([0.1, 0.4, 0.8])
  h = hvp_forward_over_reverse(lambda y: jnp.sum(ej.ste(y, 2) ** 2), x, jnp.ones(3))
  np.testing.assert_allclose(h, [2.0, 2.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("rule", sorted(DISCRETIZERS))
def test_quantized_mlp_hutchinson_sample_is_mode_independent(rule):
  """Per-sample v^T H v over a small quantized MLP's parameters: forward-over-reverse == reverse-over-reverse."""
  k = jax.random.split(jax.random.key(3), 6)
  x = jax.random.normal(k[0], (16, 5))
  labels = jax.random.randint(k[1], (16,), 0, 3)
  params = {"w1": jax.random.normal(k[2], (5, 8)) * 0.5, "w2": jax.random.normal(k[3], (8, 3)) * 0.5,
            "l": jnp.float32(-1.0), "u": jnp.float32(1.0), "ua": jnp.float32(2.0)}
  d = DISCRETIZERS[rule]

  def loss(p):
    w1 = ej.interval(p["w1"], p["l"], p["u"], bits=2, weight=True, discretizer=d)
    h = jax.nn.relu(x @ w1)
    h = ej.interval(h, 0.0, p["ua"], bits=2, weight=False, discretizer=d)
    logits = h @ ej.interval(p["w2"], p["l"], p["u"], bits=2, weight=True, discretizer=d)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

  flat, unravel = ravel_pytree(params)
  f = lambda z: loss(unravel(z))
  # compiled once, reused for every probe vector
  vhv_fwd = jax.jit(lambda v: jnp.vdot(v, hvp_forward_over_reverse(f, flat, v)))
  vhv_rev = jax.jit(lambda v: jnp.vdot(v, hvp_reverse_over_reverse(f, flat, v)))
  for i in range(3):
    v = jax.random.rademacher(jax.random.fold_in(k[4], i), flat.shape, jnp.float32)
    fwd, rev = vhv_fwd(v), vhv_rev(v)
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-6)
    assert abs(float(fwd)) > 1e-6
