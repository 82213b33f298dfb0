"""Per-channel weight quantizers: each output channel quantized, initialised and differentiated exactly as
a per-tensor quantizer of that channel alone (EWGS Sec. 4.1's statistics, per channel); in the layers
(alpha per output channel too), the settings that refuse it, and a short training run that exports."""

import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import actions, config as config_lib, estimators, layers, names, quantizers, reporting, testing, training
from ewgs_jax.export import __main__ as export_cli, runtime
from ewgs_jax.quantconfig import QuantConfig, QuantizerSpec
from tests.training_configs import small_config

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


# --- in the layers -------------------------------------------------------------------------------


def per_channel_quant(method="interval", bits=2, act="interval", rule="ste"):
  return QuantConfig(weight=QuantizerSpec(method, rule, bits, per_channel=True), act=QuantizerSpec(act, rule, bits))


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def spread_kernel(key, shape, dtype=jnp.float32):
  """A kernel whose output channels have spreads from 0.2 to 2 (what per-channel ranges are for)."""
  return (jax.random.normal(key, shape) * jnp.linspace(0.2, 2.0, shape[-1])).astype(dtype)


@pytest.fixture(scope="module")
def inputs():
  return jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 6, 6, 3)))


def test_layer_initialises_bounds_and_alpha_per_output_channel(inputs):
  """EWGS Sec. 4.1 per output channel: l_c, u_c = -+3 sigma(w_c); alpha_c = E_c|o + b| / E_c|o_q + b| (the
  official alpha formula over each channel's outputs); activations stay per tensor."""
  layer = layers.QuantConv(5, (3, 3), use_bias=True, bias_init=nn.initializers.constant(0.3), kernel_init=spread_kernel,
                           quant=per_channel_quant())
  v = layer.init(jax.random.key(1), inputs)
  p = v["params"]
  assert {k: p[k].shape for k in p if k.startswith("q_")} == {
      "q_w_lower": (5,), "q_w_upper": (5,), "q_alpha": (5,), "q_a_lower": (), "q_a_upper": ()}
  sigma = np.asarray(p["kernel"], np.float64).reshape(-1, 5).std(axis=0, ddof=1)
  np.testing.assert_allclose(p["q_w_upper"], 3 * sigma, rtol=1e-5)
  np.testing.assert_allclose(p["q_w_lower"], -3 * sigma, rtol=1e-5)
  x_q = quantizers.interval(inputs, p["q_a_lower"], p["q_a_upper"], bits=2, weight=False)
  w_q = quantizers.interval(p["kernel"], p["q_w_lower"], p["q_w_upper"], bits=2, weight=True)
  quantized = conv(x_q, w_q) + p["bias"]
  alpha = jnp.mean(jnp.abs(conv(inputs, p["kernel"]) + p["bias"]), axis=(0, 1, 2)) / jnp.mean(jnp.abs(quantized),
                                                                                             axis=(0, 1, 2))
  np.testing.assert_allclose(p["q_alpha"], alpha, rtol=1e-5)
  assert np.ptp(np.asarray(p["q_alpha"])) > 0.5 * np.asarray(p["q_alpha"]).mean()   # really one per channel
  np.testing.assert_allclose(layer.apply(v, inputs), quantized * jnp.abs(p["q_alpha"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda q: layers.QuantDense(4, quant=q),
    lambda q: layers.QuantDenseGeneral((2, 4), axis=(-2, -1), quant=q),
    lambda q: layers.QuantEinsum((3, 6, 4), "abcd,dce->abe", quant=q)])
@pytest.mark.parametrize("method", ["interval", "pact", "lsq"])
def test_every_layer_has_one_range_per_kernel_output_channel(make, method, inputs):
  quant = per_channel_quant(method, act="lsq")
  layer = make(quant)
  p = layer.init(jax.random.key(1), inputs)["params"]
  for suffix in quantizers.get_method(method).params:
    value = p[names.quantizer_param("w", suffix)]
    assert value.shape == (4,)
    expected = quantizers.per_channel(quantizers.get_method(method).params[suffix])(p["kernel"], 2, True)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert (names.OUTPUT_SCALE in p) == (method == "interval") and p["q_a_step"].shape == ()
  if method == "interval":
    assert p[names.OUTPUT_SCALE].shape == (4,)
  assert layer.apply({"params": p, "quant_state": {}}, inputs).shape[-1] == 4


def test_at_8_bits_a_per_channel_layer_reproduces_its_full_precision_twin(inputs):
  """Per-channel bounds with a per-channel alpha give each channel back its own scale, so the quantized
  layer of a freshly copied kernel stays within 2 % of the FP layer in every channel; per tensor, this
  kernel's widest channel is clipped at 3 sigma of the whole kernel and its narrowest gets few levels."""
  errors = {}
  for per_channel in (True, False):
    quant = QuantConfig(weight=QuantizerSpec("interval", "ste", 8, per_channel=per_channel),
                        act=QuantizerSpec("none"))
    layer = layers.QuantConv(6, (3, 3), kernel_init=spread_kernel, quant=quant)
    v = layer.init(jax.random.key(2), inputs)
    fp = np.asarray(layers.QuantConv(6, (3, 3)).apply({"params": {"kernel": v["params"]["kernel"]}}, inputs))
    y = np.asarray(layer.apply(v, inputs))
    errors[per_channel] = np.abs(y - fp).max(axis=(0, 1, 2)) / np.abs(fp).max(axis=(0, 1, 2))
  assert errors[True].max() < 0.02, errors
  assert errors[False].max() > 0.05, errors   # not vacuous: per tensor does not reproduce this kernel


def test_a_per_channel_layer_is_per_channel_a_per_tensor_layer_of_that_channel_alone(inputs):
  """Output, and the gradients of every parameter, of each output channel equal those of a one-channel
  layer with that channel's kernel and ranges (the activation quantizer, shared, gets their sum); with
  the EWGS rule at a non-zero delta on the weights (on the shared activations delta is 0: EWGS's gradient
  is not linear in the cotangent, g + delta sign(g) (x - x_q), so per-channel parts would not sum)."""
  quant = per_channel_quant(rule="ewgs")
  layer = layers.QuantConv(4, (3, 3), use_bias=True, bias_init=nn.initializers.normal(0.3), kernel_init=spread_kernel,
                           quant=quant)
  v = layer.init(jax.random.key(3), inputs)
  v = {**v, "quant_state": {"delta_w": jnp.float32(0.2), "delta_a": jnp.float32(0.0)}}
  coef = jax.random.normal(jax.random.key(4), (6, 6, 4))
  single = layers.QuantConv(1, (3, 3), use_bias=True,
                            quant=QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=quant.act))

  def loss(module, params, coef):
    y = module.apply({"params": params, "quant_state": v["quant_state"]}, inputs)
    return jnp.sum(coef * jnp.sin(2.0 * y))

  full, grads = jax.jit(jax.value_and_grad(functools.partial(loss, layer)))(v["params"], coef)
  one_channel = jax.jit(jax.value_and_grad(functools.partial(loss, single)))
  total = 0.0
  act_grads = {"q_a_lower": 0.0, "q_a_upper": 0.0}
  for c in range(4):
    own = {k: (value[..., c:c + 1] if k in ("kernel", "bias") else value[c] if np.ndim(value) else value)
           for k, value in v["params"].items()}
    value_c, grads_c = one_channel(own, coef[..., c:c + 1])
    total += value_c
    for k, g in grads_c.items():
      if k in act_grads:
        act_grads[k] += g
      else:
        want = grads[k][..., c:c + 1] if k in ("kernel", "bias") else grads[k][c]
        np.testing.assert_allclose(want, g, rtol=1e-4, atol=1e-6, err_msg=f"{k}, channel {c}")
  np.testing.assert_allclose(full, total, rtol=1e-5)
  for k, g in act_grads.items():
    np.testing.assert_allclose(grads[k], g, rtol=1e-4, atol=1e-6, err_msg=k)
  assert all(np.all(np.asarray(grads[k]) != 0) for k in ("q_w_lower", "q_w_upper", "q_alpha"))


class PerChannelLayerVariants(chex.TestCase):
  """The chex kit's variants (jit, no jit, with and without a device) on the gradients of a per-channel layer."""

  @chex.all_variants(with_pmap=False)
  def test_layer_gradient_is_variant_invariant(self):
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 5, 5, 3)))
    layer = layers.QuantConv(4, (3, 3), kernel_init=spread_kernel, quant=per_channel_quant(rule="ewgs"))
    v = layer.init(jax.random.key(1), x)
    state = {"delta_w": jnp.float32(0.2), "delta_a": jnp.float32(0.1)}
    grad = jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p, "quant_state": state}, x) ** 2))
    reference = grad(v["params"], x)
    chex.assert_trees_all_close(self.variant(grad)(v["params"], x), reference, rtol=1e-5, atol=1e-6)
    chex.assert_shape([reference["q_w_lower"], reference["q_alpha"]], (4,))


def test_per_channel_layer_gradients_agree_eagerly_jitted_and_vmapped(inputs):
  layer = layers.QuantDense(4, quant=per_channel_quant("lsq", act="pact"))
  flat = inputs.reshape(4, -1)
  v = layer.init(jax.random.key(1), flat)
  grad = lambda kernel, step, x: jax.grad(lambda k, s: jnp.sum(layer.apply(
      {"params": {**v["params"], "kernel": k, "q_w_step": s}, "quant_state": v["quant_state"]}, x) ** 2),
      argnums=(0, 1))(kernel, step)
  testing.assert_variants_agree(grad, v["params"]["kernel"], v["params"]["q_w_step"], flat, rtol=1e-5, atol=1e-5)


def test_per_channel_settings_that_cannot_work_are_refused_in_one_line(inputs):
  with pytest.raises(ValueError, match=r"per-channel ranges need a forward method with learned parameters .*"
                                       r"'dorefa' has none"):
    QuantizerSpec("dorefa", "ste", 2, per_channel=True)
  QuantizerSpec("none", per_channel=True)   # nothing quantized: nothing to refuse
  with pytest.raises(ValueError, match="per-channel ranges are for weight quantizers only"):
    QuantConfig(act=QuantizerSpec(per_channel=True))
  with pytest.raises(ValueError, match=r"per_channel='yes' is invalid; valid choices: \[False, True\]"):
    QuantizerSpec(per_channel="yes")
  with pytest.raises(ValueError, match=r"unknown keys \['act_per_channel'\]"):
    QuantConfig(overrides=(("conv", {"act_per_channel": True}),))
  with pytest.raises(ValueError, match=r"override 'fc': per-channel ranges need .*'dorefa' has none"):
    QuantConfig(weight=QuantizerSpec(per_channel=True), overrides=(("fc", {"weight_method": "dorefa"}),))
  with pytest.raises(ValueError, match=r"QuantEinsum .*kernel's last axis to be the output's last axis "
                                       r"\(einsum 'abcd,ecd->abe'\)"):
    layers.QuantEinsum((4, 6, 3), "abcd,ecd->abe", quant=per_channel_quant()).init(jax.random.key(0), inputs)
  with pytest.raises(ValueError, match=r"output channel 2\).*kernel holds the constant 0"):
    zero_channel = lambda key, shape, dtype=jnp.float32: spread_kernel(key, shape).at[..., 2].set(0.0)
    layers.QuantConv(4, (3, 3), kernel_init=zero_channel, quant=per_channel_quant()).init(jax.random.key(0), inputs)


def test_per_layer_override_and_layer_report():
  quant = QuantConfig(overrides=(("conv_b", {"weight_per_channel": True}),))
  assert quant.resolve("conv_b").weight.per_channel and not quant.resolve("conv_a").weight.per_channel
  assert quant.resolve("conv_b").weight.describe() == "interval/ste/2b/per-channel"
  assert quant.resolve("conv_a").weight.describe() == "interval/ste/2b"


def test_config_key_reaches_the_quant_config_and_is_checked_before_compiling():
  config = config_lib.default_config()
  assert config.quant.weight_per_channel is False and not config_lib.quant_config(config).weight.per_channel
  config.quant.weight_per_channel = True
  config_lib.validate(config)
  assert config_lib.quant_config(config).weight.per_channel and not config_lib.quant_config(config).act.per_channel
  config.quant.weight_method = "dorefa"
  with pytest.raises(ValueError, match=r"config\.quant\.weight_per_channel=True needs a weight method with learned "
                                       r"parameters \(interval, pact, lsq\); quant\.weight_method='dorefa' has none"):
    config_lib.validate(config)
  config.quant.weight_method = "none"   # full-precision weights: nothing to refuse
  config_lib.validate(config)


def test_snapshot_logs_mean_min_and_max_of_per_channel_parameters():
  variables = {"params": {"conv": {"kernel": np.ones((3, 2)), "q_w_lower": np.array([-1.0, -3.0]),
                                   "q_a_upper": np.float32(2.0)}},
               "quant_state": {"conv": {"delta_w": np.float32(0.5)}}}
  assert actions.quantizer_snapshot(variables) == {"conv": {
      "q_w_lower/mean": -2.0, "q_w_lower/min": -3.0, "q_w_lower/max": -1.0, "q_a_upper": 2.0, "delta_w": 0.5}}


# --- trained and exported ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def per_channel_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("per_channel") / "w2a2")
  config = small_config({"num_train_steps": 30, "learning_rate": 1e-2, "quant.weight_per_channel": True},
                        variant="w2a2_ste")   # 22 steps: the one epoch
  summary = training.train_and_evaluate(config, workdir)
  return workdir, summary


def test_a_per_channel_run_trains_and_reports_its_ranges(per_channel_run):
  workdir, summary = per_channel_run
  losses = [r["loss"] for r in reporting.read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses   # measured: 0.72
  layer = summary["quantizers"]["stage1_block0/conv1"]
  assert layer["q_w_lower/min"] <= layer["q_w_lower/mean"] <= layer["q_w_lower/max"] < 0
  assert layer["q_alpha/min"] < layer["q_alpha/max"] and "q_a_upper" in layer
  assert summary["config"]["quant"]["weight_per_channel"] is True
  assert json.loads(open(os.path.join(workdir, "summary.json")).read())["quantizers"] == json.loads(
      json.dumps(summary["quantizers"]))


def test_a_per_channel_run_exports_to_an_integer_model_that_agrees(per_channel_run, tmp_path, capsys):
  workdir, summary = per_channel_run
  code = export_cli.main([workdir, str(tmp_path / "model.npz"), "--platforms", "cpu"])
  assert code == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["agreement"] == 1.0 and result["max_rel_logit_error"] < 1e-4, result
  assert result["test_accuracy"] == pytest.approx(summary["final_test_accuracy"])
  layers_meta = runtime.load(str(tmp_path / "model.npz")).metadata["layers"]
  assert all(meta["weight"]["per_channel"] for meta in layers_meta.values())
