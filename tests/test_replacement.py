"""PEGE progressive replacement (PEGE Eq. 3): rates, granularities, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import replacement


def binomial_tolerance(p, n, sigmas=5.0):
  return sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_element_fraction_matches_rate(p):
  x_c, x_q = jnp.zeros(100_000), jnp.ones(100_000)
  mixed = replacement.replace(jax.random.key(0), x_c, x_q, p, granularity="element")
  assert abs(float(mixed.mean()) - p) < binomial_tolerance(p, 100_000)


@pytest.mark.parametrize("granularity", ["tensor", "network"])
@pytest.mark.parametrize("p", [0.25, 0.7])
def test_tensor_and_network_fraction_over_steps(granularity, p):
  draws = jax.vmap(lambda k: replacement.replace(k, jnp.zeros(8), jnp.ones(8), p, granularity=granularity))(
      jax.random.split(jax.random.key(1), 4000))
  rows = np.asarray(draws)
  assert np.all((rows == 0).all(1) | (rows == 1).all(1))   # one draw for the whole tensor
  assert abs(rows[:, 0].mean() - p) < binomial_tolerance(p, 4000)


def test_network_shares_one_draw_and_tensor_does_not():
  step_keys = jax.random.split(jax.random.key(2), 500)

  def draws(granularity):
    def one(k):
      a = replacement.replacement_mask(replacement.quantizer_key(k, "layer1/w", granularity), (), 0.5, granularity)
      b = replacement.replacement_mask(replacement.quantizer_key(k, "layer2/a", granularity), (), 0.5, granularity)
      return a, b
    return jax.vmap(one)(step_keys)

  a, b = draws("network")
  np.testing.assert_array_equal(a, b)
  a, b = draws("tensor")
  assert 0.3 < float(jnp.mean(a != b)) < 0.7   # independent: disagree about half the time


def test_rate_one_is_exactly_quantized():
  x_c = jax.random.normal(jax.random.key(3), (1000,))
  x_q = jnp.round(x_c)
  for granularity in replacement.GRANULARITIES:
    np.testing.assert_array_equal(replacement.replace(jax.random.key(4), x_c, x_q, 1.0, granularity=granularity), x_q)


def test_gradients_follow_the_mask():
  key = jax.random.key(5)
  x_c, x_q = jnp.zeros(1000), jnp.ones(1000)
  mask = replacement.replacement_mask(key, (1000,), 0.5, "element")
  g_c, g_q = jax.grad(lambda c, q: jnp.sum(replacement.replace(key, c, q, 0.5)), argnums=(0, 1))(x_c, x_q)
  np.testing.assert_array_equal(g_q, mask.astype(np.float32))
  np.testing.assert_array_equal(g_c, (~mask).astype(np.float32))


def test_traced_rate_under_jit():
  f = jax.jit(lambda p: replacement.replace(jax.random.key(6), jnp.zeros(50_000), jnp.ones(50_000), p).mean())
  assert abs(float(f(0.3)) - 0.3) < binomial_tolerance(0.3, 50_000)


def test_unknown_granularity():
  with pytest.raises(ValueError, match=r"valid choices: \['network', 'tensor', 'element'\]"):
    replacement.replace(jax.random.key(0), jnp.zeros(2), jnp.ones(2), 0.5, granularity="layer")
