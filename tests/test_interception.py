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


PEGE = QuantConfig(weight=QuantizerSpec("interval", "pege", 2), act=QuantizerSpec("interval", "pege", 2),
                   quantize_first_last=True)   # every layer, as the hand-built model


def pege_context(mu, rate, key):
  return QuantContext(factors={"pege": {"mu": jnp.float32(mu), "rate": jnp.float32(rate)}}, key=key)


@pytest.fixture(scope="module")
def images():
  return jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 8, 8, 2)))


@pytest.mark.parametrize("quant", [
    PEGE,
    QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("pact", "ste", 3),
                quantize_first_last=True, overrides=(("Dense_0", {"method": "none"}), ("Conv_1", {"rule": "pege"}))),
], ids=["pege", "mixed-rules"])
def test_quantized_plain_model_equals_the_hand_built_one(images, quant):
  quantized, hand = ej.quantize(Plain(), quant), HandBuilt(quant)
  ctx = pege_context(0.05, 0.5, jax.random.key(7))
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


def test_quantized_layers_carry_their_rule_state_and_no_batch_sized_variables(images):
  v = ej.quantize(Plain(), PEGE).init(jax.random.key(1), images)
  assert set(v) == {"params", "quant_state"}
  assert set(v["quant_state"]["Conv_0"]) == {"delta_w", "delta_a"}


def test_first_and_last_layers_stay_full_precision_unless_asked_and_init_says_what_it_did(images, caplog):
  default = QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("interval", "ewgs", 2))
  quantized = ej.quantize(Plain(), default)
  with caplog.at_level("INFO", logger="ewgs_jax"):
    v = quantized.init(jax.random.key(1), images)
  assert "q_w_lower" not in v["params"]["Conv_0"] and "q_w_lower" not in v["params"]["Dense_0"]
  assert "q_w_lower" in v["params"]["Conv_1"]
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantize: ")]
  assert lines == [
      "quantize: Conv_0 (QuantConv): full precision (first/last layer; QuantConfig.quantize_first_last=False)",
      "quantize: Conv_1 (QuantConv): weights interval/ewgs/2b, inputs interval/ewgs/2b",
      "quantize: Dense_0 (QuantDense): full precision (first/last layer; QuantConfig.quantize_first_last=False)"]
  logits = jax.jit(lambda v, x: quantized.apply(v, x))(v, images)   # apply finds the same layers (under jit too)
  assert logits.shape == (4, 3) and bool(jnp.all(jnp.isfinite(logits)))
  with pytest.raises(ValueError, match=r"overrides \['Conv_9'\] match no quantizable layer"):
    ej.quantize(Plain(), QuantConfig(overrides=(("Conv_9", {"bits": 4}),))).init(jax.random.key(1), images)


def test_a_constant_init_batch_raises_under_jit_too(images):
  quantized = ej.quantize(Plain(), PEGE)
  with pytest.raises(Exception, match="representative batch"):
    jax.block_until_ready(jax.jit(quantized.init)(jax.random.key(0), jnp.zeros_like(images)))


class Transformer(nn.Module):
  """A transformer block as Flax writes it: attention (DenseGeneral projections), an Einsum, a Dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
    x = x + nn.Einsum((8, 8), "btd,de->bte")(nn.LayerNorm()(x))
    return nn.Dense(3)(x.mean(1))


def test_transformer_blocks_are_quantized_and_attention_products_are_named(caplog):
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  quant = QuantConfig(weight=QuantizerSpec("interval", "pege", 4), act=QuantizerSpec("interval", "pege", 4))
  quantized = ej.quantize(Transformer(), quant)
  with caplog.at_level("INFO", logger="ewgs_jax"):
    v = quantized.init(jax.random.key(1), x)
  attention = v["params"]["MultiHeadDotProductAttention_0"]
  assert {"query", "key", "value", "out"} <= set(attention)
  assert all("q_w_lower" in attention[p] for p in ("query", "key", "value", "out"))
  assert "q_a_upper" in v["params"]["Einsum_0"]
  text = caplog.text
  assert "MultiHeadDotProductAttention_0/query (QuantDenseGeneral): weights interval/pege/4b" in text
  assert "MultiHeadDotProductAttention_0 (MultiHeadDotProductAttention): full precision (its projections are " \
         "quantized; its query-key and attention-value products multiply two activations" in text
  qat = ej.QAT(quant, total_steps=10)
  ctx = qat.context(3, jax.random.key(2))
  grads = jax.grad(lambda p: jnp.sum(quantized.apply({**v, "params": p}, x, ctx=ctx) ** 2))(v["params"])
  assert float(jnp.abs(grads["Einsum_0"]["q_w_upper"])) > 0
  assert float(jnp.abs(grads["MultiHeadDotProductAttention_0"]["value"]["q_a_upper"])) > 0


def test_the_context_manager_quantizes_any_call(images):
  variables = Plain().init(jax.random.key(1), images)
  plain = Plain().apply(variables, images)
  with ej.quantizing(PEGE):
    v = Plain().init(jax.random.key(1), images)
    quantized = Plain().apply(v, images)
  assert not np.allclose(plain, quantized)
  np.testing.assert_allclose(Plain().apply(variables, images), plain)   # outside: untouched


def test_the_delta_refresh_works_before_the_model_was_ever_applied(images):
  """ej.quantize finds the first and last layers with an inner trace of its own; inside the Hessian's
  record pass that trace must not count as the caller's quantizers (it read no delta from the state)."""
  ewgs = QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("interval", "ewgs", 2),
                     settings={"ewgs": {"every_epochs": 1, "num_batches": 1, "max_samples": 3}})

  class Deeper(nn.Module):
    @nn.compact
    def __call__(self, x):
      for features in (4, 6, 6):
        x = nn.relu(nn.Conv(features, (3, 3))(x))
      return nn.Dense(3)(jnp.mean(x, (1, 2)))

  model = ej.quantize(Deeper(), ewgs)
  v = model.init(jax.random.key(0), images)
  fresh = ej.quantize(Deeper(), ewgs)           # a new object: no call of it has been traced yet
  batch = (images, jnp.asarray([0, 1, 2, 1]))
  loss = lambda variables, b: jnp.mean(fresh.apply(variables, b[0]) ** 2 * (1 + b[1][:, None]))
  new, metrics = ej.QAT(ewgs, total_steps=4, steps_per_epoch=2).run_due(2, v, loss, [batch])
  assert metrics["ewgs/delta_refresh"] == 1.0
  assert set(new["quant_state"]) == {"Conv_1", "Conv_2"}      # the first and last layers stay full precision
