"""ewgs_jax.quantize: an unmodified Linen model run with quantized nn.Conv / nn.Dense, against the
hand-built model whose layers are QuantConv / QuantDense."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewgs_jax as ej
from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, QuantizerSpec


class Plain(nn.Module):
  """A model written for full precision: it knows nothing of quantization nor of a context."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, use_bias=False)(x))
    return nn.Dense(3)(jnp.mean(x, (1, 2)))


class HandBuilt(nn.Module):
  """The same network written with the quantized layers (nn.Conv's defaults passed explicitly) and
  the context threaded through by hand."""
  quant: QuantConfig

  @nn.compact
  def __call__(self, x, ctx=None):
    lecun = nn.initializers.lecun_normal()
    x = nn.relu(QuantConv(6, (3, 3), use_bias=True, kernel_init=lecun, dtype=None, quant=self.quant, name="Conv_0")(x, ctx))
    x = nn.relu(QuantConv(6, (3, 3), strides=2, kernel_init=lecun, dtype=None, quant=self.quant, name="Conv_1")(x, ctx))
    return QuantDense(3, kernel_init=lecun, dtype=None, quant=self.quant, name="Dense_0")(jnp.mean(x, (1, 2)), ctx)


PEGE = QuantConfig(weight=QuantizerSpec("interval", "pege", 2), act=QuantizerSpec("interval", "pege", 2))


@pytest.fixture(scope="module")
def images():
  return jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 8, 8, 2)))


@pytest.mark.parametrize("quant", [
    PEGE,
    QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("pact", "ste", 3),
                rules=(("Dense_0", {"method": "none"}), ("Conv_1", {"backward": "pege"}))),
], ids=["pege", "mixed-rules"])
def test_quantized_plain_model_equals_the_hand_built_one(images, quant):
  quantized, hand = ej.quantize(Plain(), quant), HandBuilt(quant)
  ctx = QuantContext(mu=jnp.float32(0.05), rate=jnp.float32(0.5), key=jax.random.key(7))
  v = quantized.init(jax.random.key(1), images)
  v_hand = hand.init(jax.random.key(1), images)
  assert jax.tree.structure(v) == jax.tree.structure(v_hand)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), v, v_hand)
  # the plain model's own layout, plus the quantizer parameters beside each kernel
  plain = Plain().init(jax.random.key(1), images)["params"]
  np.testing.assert_array_equal(plain["Conv_0"]["kernel"], v["params"]["Conv_0"]["kernel"])
  assert ("q_w_lower" in v["params"]["Dense_0"]) == quant.resolve("Dense_0").weight.active

  def loss(params, model, **kw):
    logits = model.apply({**v, "params": params}, images, **kw)
    return jnp.sum(logits ** 2), logits

  (value, out), grads = jax.value_and_grad(loss, has_aux=True)(v["params"], quantized, ctx=ctx)
  (value_hand, out_hand), grads_hand = jax.value_and_grad(loss, has_aux=True)(v["params"], hand, ctx=ctx)
  np.testing.assert_allclose(out, out_hand, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_hand)
  # the context reached the layers (a PEGE user's model need not pass it on): without it, STE's gradient
  _, grads_ste = jax.value_and_grad(loss, has_aux=True)(v["params"], quantized)
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(jnp.abs(a - b) > 1e-7)), grads, grads_ste))
  assert any(differs)


def test_quantized_plain_model_trains_its_quantizer_parameters_and_warm_starts(images):
  quantized = ej.quantize(Plain(), PEGE)
  fp = Plain().init(jax.random.key(3), images)
  v = quantized.apply(fp, images, rngs={"params": jax.random.key(0)}, mutable=True)[1]   # warm start: FP weights, data-driven quantizers
  np.testing.assert_array_equal(v["params"]["Conv_1"]["kernel"], fp["params"]["Conv_1"]["kernel"])
  grads = jax.grad(lambda p: jnp.sum(quantized.apply({**v, "params": p}, images) ** 2))(v["params"])
  for layer in ("Conv_0", "Conv_1", "Dense_0"):
    assert float(jnp.abs(grads[layer]["q_a_upper"])) > 0 and float(jnp.abs(grads[layer]["q_w_upper"])) > 0
  with pytest.raises(ValueError, match="representative batch"):
    quantized.init(jax.random.key(0), jnp.zeros_like(images))


def test_quantized_layers_carry_the_hessian_probes(images):
  v = ej.quantize(Plain(), PEGE).init(jax.random.key(1), images)
  assert set(v["perturbations"]) == {"Conv_0", "Conv_1", "Dense_0"}
  assert set(v["quant_state"]["Conv_0"]) == {"delta_w", "delta_a"}


def test_the_context_manager_quantizes_any_call(images):
  variables = Plain().init(jax.random.key(1), images)
  plain = Plain().apply(variables, images)
  with ej.quantizing(PEGE):
    v = Plain().init(jax.random.key(1), images)
    quantized = Plain().apply(v, images)
  assert not np.allclose(plain, quantized)
  np.testing.assert_allclose(Plain().apply(variables, images), plain)   # outside: untouched
