"""The quantized layers in a Flax NNX model (through flax.nnx.bridge.ToNNX): the README's NNX example,
checked against the Linen layers applied to the same variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, QuantizerSpec  # noqa: E402

PEGE = QuantConfig(weight=QuantizerSpec("interval", "pege", 2), act=QuantizerSpec("interval", "pege", 2))


class Net(nnx.Module):
  """An NNX model with a quantized convolution and a quantized dense layer (the README example)."""

  def __init__(self, quant, *, rngs):
    self.conv = nnx.bridge.ToNNX(QuantConv(6, (3, 3), quant=quant), rngs=rngs)
    self.fc = nnx.bridge.ToNNX(QuantDense(3, quant=quant), rngs=rngs)

  def __call__(self, x, ctx=None):
    x = nnx.relu(self.conv(x, ctx))
    return self.fc(jnp.mean(x, (1, 2)), ctx)


def linen_variables(layer):
  flat = dict(nnx.to_flat_state(nnx.state(layer)))
  params = {k[0]: v.get_value() for k, v in flat.items() if isinstance(v, nnx.Param)}
  deltas = {k[0]: v.get_value() for k, v in flat.items() if k[0].startswith("delta_")}
  return {"params": params, "quant_state": deltas}


def test_nnx_model_with_quantized_layers_matches_linen():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 8, 8, 2)))
  model = Net(PEGE, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)                  # data-driven initialisation: a real batch
  conv_vars, fc_vars = linen_variables(model.conv), linen_variables(model.fc)
  fresh = QuantConv(6, (3, 3), quant=PEGE).init(jax.random.key(5), x)["params"]
  np.testing.assert_allclose(conv_vars["params"]["q_a_upper"], fresh["q_a_upper"], rtol=1e-6)   # from the batch

  ctx = QuantContext(factors={"pege": {"mu": jnp.float32(0.05), "rate": jnp.float32(0.5)}}, key=jax.random.key(7))

  def linen_loss(params):
    h = jax.nn.relu(QuantConv(6, (3, 3), quant=PEGE).apply({**conv_vars, "params": params[0]}, x, ctx))
    return jnp.sum(QuantDense(3, quant=PEGE).apply({**fc_vars, "params": params[1]}, jnp.mean(h, (1, 2)), ctx) ** 2)

  loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x, ctx) ** 2))(model)
  linen_value, (g_conv, g_fc) = jax.value_and_grad(linen_loss)((conv_vars["params"], fc_vars["params"]))
  np.testing.assert_allclose(loss, linen_value, rtol=1e-5)
  nnx_grads = {k: v.get_value() for k, v in nnx.to_flat_state(grads["conv"])}
  for name, value in g_conv.items():
    np.testing.assert_allclose(nnx_grads[(name,)], value, rtol=1e-4, atol=1e-7)
  assert float(jnp.abs(g_fc["q_a_upper"])) > 0

  # one SGD step on the NNX model changes its quantizer parameters
  before = float(model.conv.q_a_upper.get_value())
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(model, nnx.Param), grads))
  assert float(model.conv.q_a_upper.get_value()) != before


EWGS = QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("interval", "ewgs", 2),
                   settings={"ewgs": {"every_epochs": 1, "num_batches": 1, "max_samples": 4}})


def test_nnx_model_initialised_at_batch_8_trains_and_refreshes_delta_at_batch_32():
  """The QAT API on an NNX model: any batch size, and the delta refresh writes into the model in place."""
  import optax
  import ewgs_jax as ej
  small = jax.nn.relu(jax.random.normal(jax.random.key(0), (8, 8, 8, 2)))
  big = {"pixels": jax.nn.relu(jax.random.normal(jax.random.key(1), (32, 8, 8, 2))),
         "targets": jax.random.randint(jax.random.key(2), (32,), 0, 3)}
  model = Net(EWGS, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, small)

  def loss(m, batch, ctx=None):
    return optax.softmax_cross_entropy_with_integer_labels(m(batch["pixels"], ctx), batch["targets"]).mean()

  qat = ej.QAT(EWGS, total_steps=4, steps_per_epoch=2)
  grads = nnx.grad(lambda m: loss(m, big, qat.context(0)))(model)        # a gradient at batch 32
  assert float(jnp.abs(dict(nnx.to_flat_state(grads["conv"]))[("q_a_upper",)].get_value())) > 0
  assert float(model.conv.delta_w.get_value()) == 0.0
  same, metrics = qat.run_due(2, model, loss, [big])                      # the refresh at batch 32
  assert same is model and metrics["ewgs/delta_refresh"] == 1.0
  deltas = [float(layer.delta_w.get_value()) for layer in (model.conv, model.fc)] + \
           [float(layer.delta_a.get_value()) for layer in (model.conv, model.fc)]
  assert all(d >= 0 for d in deltas) and any(d > 0 for d in deltas)
  assert np.isfinite(float(loss(model, big)))
