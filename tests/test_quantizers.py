"""Forward methods: outputs on their grids and parameter gradients equal to their papers' formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewgs_jax as ej
from ewgs_jax import estimators, quantizers, rules, testing
from ewgs_jax.quantizers import lsq_range


def identity_discretizer(x, bits):
  """The STE surrogate: rounding replaced by the identity (for finite differences)."""
  del bits
  return x


def test_interval_outputs_and_maps():
  x = jnp.linspace(-2, 2, 41)
  w = ej.interval(x, -1.0, 1.0, bits=2, weight=True)
  a = ej.interval(x, -1.0, 1.0, bits=2, weight=False)
  k = np.asarray(a) * 3
  np.testing.assert_allclose(k, np.round(k), atol=1e-5)           # on the grid {0, 1/3, 2/3, 1}
  np.testing.assert_array_equal(np.unique(np.round(k)), [0, 1, 2, 3])
  np.testing.assert_allclose(w, 2 * (np.asarray(a) - 0.5), atol=1e-6)  # EWGS Eq. 3


def test_interval_gradient_at_exact_bounds_is_one():
  lower, upper = jnp.float32(-1.0), jnp.float32(1.0)
  x = jnp.asarray([-1.0, 1.0, -1.5, 1.5, 0.2])
  g = jax.grad(lambda v: jnp.sum(ej.interval(v, lower, upper, bits=3, weight=False)))(x)
  # d x_q / d x = 1 / (u - l) = 0.5 inside and at the bounds (torch.clamp), 0 outside.
  np.testing.assert_allclose(g, [0.5, 0.5, 0.0, 0.0, 0.5])


@pytest.mark.parametrize("weight", [True, False])
def test_interval_bound_gradients_match_finite_differences(weight):
  x = jax.random.normal(jax.random.key(0), (200,)) * 0.8
  coef = jax.random.normal(jax.random.key(1), (200,))

  def loss(lower, upper, discretizer):
    return jnp.sum(coef * ej.interval(x, lower, upper, bits=2, weight=weight, discretizer=discretizer))

  l, u = jnp.float32(-1.1), jnp.float32(1.3)
  grads = jax.grad(loss, argnums=(0, 1))(l, u, ej.ste)
  eps = 1e-3
  for i, (dl, du) in enumerate([(eps, 0.0), (0.0, eps)]):
    fd = (loss(l + dl, u + du, identity_discretizer) - loss(l - dl, u - du, identity_discretizer)) / (2 * eps)
    np.testing.assert_allclose(grads[i], fd, rtol=2e-3, atol=1e-3)


def test_interval_clipped_elements_give_bounds_no_gradient():
  x = jnp.asarray([-5.0, 5.0])  # both clipped
  grads = jax.grad(lambda l, u: jnp.sum(ej.interval(x, l, u, bits=2, weight=True)), argnums=(0, 1))(-1.0, 1.0)
  assert grads == (0.0, 0.0)


def test_interval_per_channel_bounds_gradients_in_their_shape():
  w = jax.random.normal(jax.random.key(2), (3, 3, 4, 8))
  lower, upper = -jnp.ones(8), jnp.ones(8) * 1.5
  gl, gu = jax.grad(lambda l, u: jnp.sum(ej.interval(w, l, u, bits=2, weight=True) ** 2), argnums=(0, 1))(lower, upper)
  assert gl.shape == (8,) and gu.shape == (8,)
  # channel 0 alone: same as a scalar quantizer on that slice
  g0 = jax.grad(lambda u: jnp.sum(ej.interval(w[..., 0], -1.0, u, bits=2, weight=True) ** 2))(1.5)
  np.testing.assert_allclose(gu[0], g0, rtol=1e-5)


def test_pact_clip_gradient_is_pacts():
  x = jnp.asarray([-1.0, 0.0, 0.5, 2.0, 3.0, 4.0])
  m = jnp.float32(3.0)
  y = ej.pact(x, m, bits=2)
  np.testing.assert_allclose(y, [0, 0, 0.0, 2.0, 3.0, 3.0], atol=1e-6)  # levels 0, 1, 2, 3
  dm = jax.grad(lambda m: jnp.sum(ej.pact(x, m, bits=2)), argnums=0)(m)
  assert float(dm) == 2.0  # x >= m: 3.0 (tie) and 4.0
  per_element = jax.jacobian(lambda m: ej.pact(x, m, bits=2))(m)
  np.testing.assert_array_equal(per_element, [0, 0, 0, 0, 1, 1])
  signed = jax.jacobian(lambda m: ej.pact(jnp.asarray([-4.0, -1.0, 1.0, 4.0]), m, bits=2, signed=True))(m)
  np.testing.assert_array_equal(signed, [-1, 0, 0, 1])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_step_gradient_is_lsqs(signed, bits):
  x = jax.random.normal(jax.random.key(3), (64,)) * 2.0
  s = jnp.float32(0.4)
  q_neg, q_pos = lsq_range(bits, signed)
  per_element = jax.jacobian(lambda s: ej.lsq(x, s, bits=bits, signed=signed))(s)
  v = np.asarray(x) / 0.4
  expected = np.where(v <= -q_neg, -q_neg, np.where(v >= q_pos, q_pos, -v + np.round(v)))
  expected = expected / np.sqrt(x.size * q_pos)  # LSQ gradient scale
  np.testing.assert_allclose(per_element, expected, rtol=1e-4, atol=1e-6)
  out = ej.lsq(x, s, bits=bits, signed=signed)
  np.testing.assert_allclose(out, np.clip(np.round(v), -q_neg, q_pos) * 0.4, atol=1e-6)


def test_lsq_per_channel_uses_per_channel_count():
  x = jax.random.normal(jax.random.key(4), (10, 4))
  steps = jnp.full((4,), 0.5)
  g = jax.grad(lambda s: jnp.sum(ej.lsq(x, s, bits=3, signed=True)))(steps)
  q_neg, q_pos = lsq_range(3, True)
  v = np.asarray(x) / 0.5
  raw = np.where(v <= -q_neg, -q_neg, np.where(v >= q_pos, q_pos, -v + np.round(v))).sum(0)
  np.testing.assert_allclose(g, raw / np.sqrt(10 * q_pos), rtol=1e-4, atol=1e-6)


def test_dorefa_outputs_on_grid():
  w = jax.random.normal(jax.random.key(5), (100,))
  for bits in (1, 2, 3):
    n = 2 ** bits - 1
    out = np.asarray(ej.dorefa(w, bits=bits, weight=True))
    k = (out + 1) / 2 * n
    np.testing.assert_allclose(k, np.round(k), atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1
  a = ej.dorefa(jnp.asarray([-1.0, 0.4, 2.0]), bits=1, weight=False)
  np.testing.assert_allclose(a, [0, 0, 1])


@pytest.mark.parametrize("method", ["interval", "pact", "lsq", "dorefa"])
def test_any_forward_method_takes_any_backward_rule(method):
  x = jax.random.normal(jax.random.key(6), (32,))
  fn = {
      "interval": lambda x, d: ej.interval(x, -1.0, 1.0, bits=2, weight=True, discretizer=d),
      "pact": lambda x, d: ej.pact(x, 1.5, bits=2, discretizer=d),
      "lsq": lambda x, d: ej.lsq(x, 0.5, bits=2, signed=True, discretizer=d),
      "dorefa": lambda x, d: ej.dorefa(x, bits=2, weight=True, discretizer=d),
  }[method]
  coef = jnp.linspace(-1, 1, 32)
  g_ste = jax.grad(lambda v: jnp.sum(coef * fn(v, ej.ste)))(x)
  g_ewgs = jax.grad(lambda v: jnp.sum(coef * fn(v, functools.partial(ej.ewgs, delta=1.0))))(x)
  g_pege = jax.grad(lambda v: jnp.sum(coef * fn(v, functools.partial(ej.pege, mu=1.0))))(x)
  np.testing.assert_allclose(fn(x, ej.ste), fn(x, functools.partial(ej.ewgs, delta=1.0)))
  assert not np.allclose(g_ste, g_ewgs) and not np.allclose(g_ste, g_pege)


@pytest.mark.parametrize("method", sorted(quantizers.METHODS))
@pytest.mark.parametrize("rule", sorted(rules.RULES))
def test_every_registered_method_and_rule_through_the_kit(method, rule):
  """Each registered forward method on each registered rule: the gradient is the same eagerly, under jit
  and under vmap; the two second-order modes agree; a step compiles once while the factor changes."""
  forward = quantizers.get_method(method)
  backward = rules.get(rule)
  x = jax.random.normal(jax.random.key(6), (4, 8)) * 0.7
  params = {suffix: init(x, 2, True) for suffix, init in forward.params.items()}

  def quantize(v, factor=0.4):
    return forward.apply(v, params, bits=2, weight=True, discretizer=backward.bind(factor))

  coef = jnp.linspace(-1, 1, 8)
  testing.assert_variants_agree(jax.grad(lambda v: jnp.sum(coef * quantize(v))), x)
  # the discretizer seen through the method: x in [0, 1] -> the method's output of a rescaled input
  through = lambda v, bits: quantize(4.0 * v - 2.0)
  testing.assert_second_order_modes_agree(through, bits=2, symmetric=rule != "ewgs")
  if backward.factor is not None:
    testing.assert_compiles_once(lambda v, bits, f: quantize(v, f), bits=2, factor_name="f", factors=[0.0, 0.7])


def test_hook_sees_latent_and_discrete_values():
  seen = {}

  def hook(x_c, x_q):
    seen["x_c"], seen["x_q"] = x_c, x_q
    return x_c  # replace everything by the latent value

  x = jnp.asarray([0.1, 0.45, 0.9])
  out = ej.interval(x, 0.0, 1.0, bits=1, weight=False, hook=hook)
  np.testing.assert_allclose(seen["x_c"], x)
  np.testing.assert_allclose(seen["x_q"], [0, 0, 1])
  np.testing.assert_allclose(out, x)


def test_clip_passes_gradient_one_at_exact_bounds_unlike_jnp_clip():
  x = jnp.asarray([0.0, 1.0, 0.5, -0.5, 1.5])
  g = jax.grad(lambda v: jnp.sum(ej.clip(v, 0.0, 1.0)))(x)
  np.testing.assert_array_equal(g, [1, 1, 1, 0, 0])
  assert float(jax.grad(lambda v: jnp.clip(v, 0.0, 1.0))(1.0)) == 0.5  # the trap the where-clip avoids
  # interval with u - l = 1: d out / d x is exactly 1 at both bounds (activation map)
  gi = jax.grad(lambda v: jnp.sum(ej.interval(v, 2.0, 3.0, bits=2, weight=False)))(jnp.asarray([2.0, 3.0, 3.5]))
  np.testing.assert_array_equal(gi, [1, 1, 0])
  # bounds get gradient through elements sitting exactly on them (clip gradient 1 there)
  gl, gu = jax.grad(lambda l, u: jnp.sum(ej.interval(jnp.asarray([2.0, 3.0]), l, u, bits=2, weight=False)),
                    argnums=(0, 1))(2.0, 3.0)
  # x = l: d x_n/dl = (x - u)/(u - l)^2 = -1, d x_n/du = 0; x = u: d/dl = 0, d/du = -(x - l)/(u - l)^2 = -1.
  # A jnp.clip would halve both (and a strict clip would give 0).
  np.testing.assert_allclose([gl, gu], [-1.0, -1.0])


@pytest.mark.parametrize("signed,bits", [(True, 1), (False, 1), (True, 8)])
def test_lsq_extreme_bits_finite(signed, bits):
  x = jax.random.normal(jax.random.key(9), (32,))
  g = jax.grad(lambda s: jnp.sum(ej.lsq(x, s, bits=bits, signed=signed)))(jnp.float32(0.3))
  assert np.isfinite(float(g))
