"""Per-channel weight quantizers: each output channel quantized, initialised and differentiated exactly as
a per-tensor quantizer of that channel alone (EWGS Sec. 4.1's statistics, per channel)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import estimators, quantizers, testing

PER_CHANNEL_METHODS = ("interval", "pact", "lsq")   # DoReFa has no learned parameter to make per channel
DISCRETIZERS = {   # elementwise backward rules (PEGE's mu scales with the whole tensor's gradient spread)
    "ste": estimators.ste,
    "ewgs": functools.partial(estimators.ewgs, delta=0.3),
}


def kernel(seed=0, shape=(3, 3, 4, 5)):
  scales = np.linspace(0.2, 2.0, shape[-1], dtype=np.float32)   # channels of very different spread
  return jax.random.normal(jax.random.key(seed), shape) * scales


def per_channel_params(method, w, bits):
  inits = quantizers.get_method(method).params
  return {suffix: quantizers.per_channel(init)(w, bits, True) for suffix, init in inits.items()}


@pytest.mark.parametrize("method", PER_CHANNEL_METHODS)
def test_per_channel_initialisation_is_the_per_tensor_one_on_each_channel(method):
  w = kernel()
  params = per_channel_params(method, w, 2)
  for suffix, init in quantizers.get_method(method).params.items():
    assert params[suffix].shape == (w.shape[-1],)
    expected = [init(w[..., c], 2, True) for c in range(w.shape[-1])]
    np.testing.assert_allclose(params[suffix], expected, rtol=1e-6)
  if method == "interval":   # EWGS Sec. 4.1 per channel: -+3 sigma(w_c), unbiased
    sigma = np.std(np.asarray(w).reshape(-1, w.shape[-1]), axis=0, ddof=1)
    np.testing.assert_allclose(params["upper"], 3 * sigma, rtol=1e-5)
    np.testing.assert_allclose(params["lower"], -3 * sigma, rtol=1e-5)


def loss_and_grads(method, bits, discretizer):
  apply = quantizers.get_method(method).apply
  coef = jax.random.normal(jax.random.key(7), (3, 3, 4))

  def loss(w, params):
    return jnp.sum(coef[..., None] * jnp.sin(3.0 * apply(w, params, bits=bits, weight=True, discretizer=discretizer)))

  return jax.value_and_grad(loss, argnums=(0, 1))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rule", sorted(DISCRETIZERS))
@pytest.mark.parametrize("method", PER_CHANNEL_METHODS)
def test_per_channel_forward_and_gradients_are_those_of_each_channel_alone(method, rule, bits):
  w = kernel(bits)
  params = per_channel_params(method, w, bits)
  f = loss_and_grads(method, bits, DISCRETIZERS[rule])
  value, (dw, dparams) = f(w, params)
  total, slices = 0.0, []
  for c in range(w.shape[-1]):
    one = {k: v[c] for k, v in params.items()}
    v_c, (dw_c, dp_c) = f(w[..., c:c + 1], one)
    total += v_c
    slices.append((dw_c, dp_c))
  np.testing.assert_allclose(value, total, rtol=1e-5)
  np.testing.assert_allclose(dw, jnp.concatenate([s[0] for s in slices], axis=-1), rtol=1e-5, atol=1e-6)
  for suffix in params:
    assert dparams[suffix].shape == params[suffix].shape
    np.testing.assert_allclose(dparams[suffix], [s[1][suffix] for s in slices], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", PER_CHANNEL_METHODS)
def test_per_channel_gradients_agree_eagerly_jitted_and_vmapped(method):
  w = kernel(3)
  params = per_channel_params(method, w, 2)
  grad = lambda w, *values: loss_and_grads(method, 2, estimators.ste)(w, dict(zip(params, values)))[1]
  testing.assert_variants_agree(grad, w, *params.values(), rtol=1e-5, atol=1e-6)


class PerChannelIntervalVariants(chex.TestCase):
  """The chex kit's variants (jit, no jit, with and without a device) on a per-channel interval quantizer."""

  @chex.all_variants(with_pmap=False)
  def test_gradient_is_variant_invariant(self):
    w = kernel(5)
    params = per_channel_params("interval", w, 2)
    f = lambda w, lower, upper: loss_and_grads("interval", 2, DISCRETIZERS["ewgs"])(
        w, {"lower": lower, "upper": upper})[1]
    reference = f(w, params["lower"], params["upper"])
    chex.assert_trees_all_close(self.variant(f)(w, params["lower"], params["upper"]), reference, rtol=1e-5,
                                atol=1e-6)
