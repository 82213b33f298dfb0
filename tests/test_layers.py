"""Quantized Flax layers: data-driven initialisation, per-layer rules, warm start, gradients, probes."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewgs_jax as ej
from ewgs_jax import hessian, hooks, initialization, layers, models, names, quantizers, rules
from ewgs_jax.layers import QuantConfig, QuantContext, QuantConv, QuantDense, QuantizerSpec

W2A2_EWGS = QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("interval", "ewgs", 2))


class TwoConvs(nn.Module):
  """conv_a -> relu -> conv_b -> pool -> dense, all quantizable (a tiny test model)."""
  quant: QuantConfig | None

  @nn.compact
  def __call__(self, x, train=False, ctx=None):
    x = nn.relu(QuantConv(6, (3, 3), quant=self.quant, name="conv_a")(x, ctx))
    x = nn.relu(QuantConv(6, (3, 3), quant=self.quant, name="conv_b")(x, ctx))
    return QuantDense(3, quant=self.quant, name="fc")(jnp.mean(x, (1, 2)), ctx)


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.fixture(scope="module")
def images():
  return jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 6, 6, 2)))


def test_full_precision_layers_equal_plain_flax(images):
  v = QuantConv(5, (3, 3)).init(jax.random.key(1), images)
  np.testing.assert_allclose(QuantConv(5, (3, 3)).apply(v, images),
                             nn.Conv(5, (3, 3), use_bias=False).apply(v, images), rtol=1e-6)
  flat = images.reshape(4, -1)
  v = QuantDense(7).init(jax.random.key(2), flat)
  np.testing.assert_allclose(QuantDense(7).apply(v, flat), nn.Dense(7).apply(v, flat), rtol=1e-6)
  # a config whose every quantizer is 'none' is the full-precision model, same parameter names
  none = QuantConfig(weight=QuantizerSpec("none"), act=QuantizerSpec("none"))
  fp_vars = jax.jit(TwoConvs(None).init)(jax.random.key(3), images)
  np.testing.assert_allclose(jax.jit(TwoConvs(none).apply)(fp_vars, images),
                             jax.jit(TwoConvs(None).apply)(fp_vars, images), rtol=1e-6)


def test_data_driven_initialisation_formulas(images):
  model = TwoConvs(W2A2_EWGS)
  v = initialization.init_variables(model, jax.random.key(4), images)
  p = v["params"]["conv_a"]
  kernel = np.asarray(p["kernel"], np.float64)
  sigma_w = kernel.std(ddof=1)                               # unbiased, as torch.std
  np.testing.assert_allclose([p["q_w_lower"], p["q_w_upper"]], [-3 * sigma_w, 3 * sigma_w], rtol=1e-5)
  x = np.asarray(images, np.float64)
  np.testing.assert_allclose(p["q_a_lower"], x.min(), atol=1e-7)
  np.testing.assert_allclose(p["q_a_upper"], 3 * x.std(ddof=1) / math.sqrt(1 - 2 / math.pi), rtol=1e-5)
  # alpha = E|conv(x, w)| / E|conv(Q(x), Q(w))| with the freshly initialised bounds
  q_x = ej.interval(images, p["q_a_lower"], p["q_a_upper"], bits=2, weight=False)
  q_w = ej.interval(p["kernel"], p["q_w_lower"], p["q_w_upper"], bits=2, weight=True)
  alpha = jnp.mean(jnp.abs(conv(images, p["kernel"]))) / jnp.mean(jnp.abs(conv(q_x, q_w)))
  np.testing.assert_allclose(p["q_alpha"], alpha, rtol=1e-5)
  # layer by layer: conv_b's activation bounds come from conv_a's *quantized* output
  y = jax.nn.relu(conv(q_x, q_w) * jnp.abs(p["q_alpha"]))
  np.testing.assert_allclose(v["params"]["conv_b"]["q_a_upper"],
                             3 * np.asarray(y, np.float64).std(ddof=1) / math.sqrt(1 - 2 / math.pi), rtol=1e-4)
  assert float(v["quant_state"]["conv_a"]["delta_w"]) == 0.0   # delta starts at 0 (reference code)


def test_pact_and_lsq_initialisations(images):
  pact = TwoConvs(QuantConfig(weight=QuantizerSpec("pact"), act=QuantizerSpec("pact")))
  p = initialization.init_variables(pact, jax.random.key(5), images)["params"]["conv_a"]
  assert float(p["q_a_clip"]) == quantizers.PACT_INIT_CLIP
  lsq = TwoConvs(QuantConfig(weight=QuantizerSpec("lsq", bits=3), act=QuantizerSpec("lsq", bits=3)))
  p = initialization.init_variables(lsq, jax.random.key(5), images)["params"]["conv_a"]
  np.testing.assert_allclose(p["q_a_step"], 2 * np.abs(np.asarray(images)).mean() / math.sqrt(7), rtol=1e-5)
  np.testing.assert_allclose(p["q_w_step"], 2 * np.abs(np.asarray(p["kernel"])).mean() / math.sqrt(3), rtol=1e-5)
  assert "q_alpha" not in p   # the output scale belongs to the interval (EWGS) parameterisation


def test_rule_changes_exactly_the_matched_layers(images):
  base2 = QuantConfig(overrides=((r"conv_b$", {"bits": 4}),))
  all4 = QuantConfig(weight=QuantizerSpec(bits=4), act=QuantizerSpec(bits=4))
  assert base2.resolve("conv_b").weight.bits == 4 and base2.resolve("conv_a").weight.bits == 2
  v = initialization.init_variables(TwoConvs(base2), jax.random.key(6), images)
  run = lambda quant: TwoConvs(quant).apply(v, images, capture_intermediates=True, mutable=["intermediates"])[1]
  mixed, four = run(base2), run(all4)
  out = lambda tree, name: tree["intermediates"][name]["__call__"][0]
  assert not np.allclose(out(mixed, "conv_a"), out(four, "conv_a"))
  # conv_b computes what a 4-bit conv_b computes on conv_a's (2-bit) output
  conv_b = QuantConv(6, (3, 3), quant=all4)
  np.testing.assert_allclose(out(mixed, "conv_b"),
                             conv_b.apply({"params": v["params"]["conv_b"]}, jax.nn.relu(out(mixed, "conv_a"))), rtol=1e-5)
  disabled = QuantConfig(overrides=(("fc", {"enabled": False}), ("conv_a", {"weight_bits": 3, "act_method": "none"})))
  assert not disabled.resolve("fc").active
  assert disabled.resolve("conv_a").weight.bits == 3 and not disabled.resolve("conv_a").act.active


def check_overrides(model, x):
  initialization.layer_report(model, x).check(model.quant)


def test_unmatched_or_invalid_rules_raise(images):
  with pytest.raises(ValueError, match=r"\['conv_c'\] match no quantizable layer"):
    check_overrides(TwoConvs(QuantConfig(overrides=(("conv_c", {"bits": 3}),))), images)
  check_overrides(TwoConvs(QuantConfig(overrides=(("conv_", {"bits": 3}),))), images)
  with pytest.raises(ValueError, match="unknown keys"):
    QuantConfig(overrides=(("conv", {"bitz": 3}),))
  with pytest.raises(ValueError, match="bits"):
    QuantConfig(overrides=(("conv", {"bits": 0}),))
  with pytest.raises(ValueError, match="valid choices"):
    QuantizerSpec(method="apot")
  # first/last layers of a model are not quantizable by default: a rule aimed at them is unmatched
  resnet = models.get_model("resnet8", num_classes=10, quant=QuantConfig(overrides=(("^fc$", {"bits": 8}),)))
  with pytest.raises(ValueError, match="match no quantizable layer"):
    check_overrides(resnet, jnp.zeros((2, 8, 8, 1)))


def test_warm_start_copies_weights_and_names_mismatches(images):
  fp_vars = initialization.init_variables(TwoConvs(None), jax.random.key(7), images)
  q_vars = initialization.warm_start(TwoConvs(W2A2_EWGS), fp_vars, jax.random.key(8), images)
  for name in ("conv_a", "conv_b", "fc"):
    for leaf in fp_vars["params"][name]:
      np.testing.assert_array_equal(q_vars["params"][name][leaf], fp_vars["params"][name][leaf])
    assert "q_w_upper" in q_vars["params"][name]
  # bounds were initialised from the copied kernel, not a random one
  np.testing.assert_allclose(q_vars["params"]["conv_a"]["q_w_upper"],
                             3 * np.asarray(fp_vars["params"]["conv_a"]["kernel"]).std(ddof=1), rtol=1e-5)
  broken = {"params": {**fp_vars["params"], "conv_b": {"kernel": jnp.zeros((3, 3, 6, 5))}, "extra": {"w": jnp.zeros(1)}}}
  with pytest.raises(ValueError, match=r"unexpected params/extra/w; shape of params/conv_b/kernel: checkpoint \(3, 3, 6, 5\)"):
    initialization.warm_start(TwoConvs(W2A2_EWGS), broken, jax.random.key(8), images)
  del broken["params"]["fc"]
  with pytest.raises(ValueError, match="missing params/fc/bias"):
    initialization.warm_start(TwoConvs(W2A2_EWGS), broken, jax.random.key(8), images)


@pytest.mark.parametrize("backward", ["ewgs", "pege"])
def test_gradients_reach_every_quantizer_parameter_and_not_delta(images, backward):
  quant = QuantConfig(weight=QuantizerSpec("interval", backward, 2), act=QuantizerSpec("interval", backward, 2))
  model = TwoConvs(quant)
  v = initialization.init_variables(model, jax.random.key(9), images)
  v["quant_state"] = jax.tree.map(lambda d: d + 0.5, v["quant_state"])
  ctx = pege_context(mu=0.1, rate=0.7, key=jax.random.key(1))

  @jax.jit
  @jax.grad
  def grads(variables):
    return jnp.sum(model.apply(variables, images, ctx=ctx) ** 2)

  grads = grads(v)
  for path, g in jax.tree_util.tree_leaves_with_path(grads["params"]):
    assert np.all(np.abs(np.asarray(g)).sum() > 0), path
  for g in jax.tree.leaves(grads["quant_state"]):
    assert float(g) == 0.0
  assert names.is_quantizer_param(("conv_a", "q_alpha")) and not names.is_quantizer_param(("conv_a", "kernel"))


def test_probe_gradient_is_the_gradient_wrt_x_q(images):
  layer = QuantConv(4, (3, 3), quant=W2A2_EWGS)
  v = layer.init(jax.random.key(10), images)
  assert set(v) == {"params", "quant_state"}    # the probes are not variables: any batch size applies
  p = v["params"]
  target = jax.random.normal(jax.random.key(11), (4, 6, 6, 4))
  loss_fn = lambda variables, x: jnp.sum((layer.apply(variables, x) - target) ** 2)
  found = hessian.find_quantizers(loss_fn, v, images)
  assert found.paths == ["a_q", "w_q"] and [q.shape for q in found.ordered] == [images.shape, (3, 3, 2, 4)]
  loss, zeros = hessian.probe_loss(loss_fn, v, images, found)
  grads = dict(zip(found.paths, jax.grad(loss)(zeros)))
  a_q = ej.interval(images, p["q_a_lower"], p["q_a_upper"], bits=2, weight=False)
  w_q = ej.interval(p["kernel"], p["q_w_lower"], p["q_w_upper"], bits=2, weight=True)
  direct = jax.grad(lambda a: jnp.sum((conv(a, w_q) * jnp.abs(p["q_alpha"]) - target) ** 2))(a_q)
  np.testing.assert_allclose(grads["a_q"], direct, rtol=1e-5, atol=1e-6)
  # the weight probe sits on x_q in [0, 1], before the 2(x_q - 0.5) map: chain rule factor 2
  direct_w = jax.grad(lambda w: jnp.sum((conv(a_q, 2 * (w - 0.5)) * jnp.abs(p["q_alpha"]) - target) ** 2))(
      (w_q + 1) / 2)
  np.testing.assert_allclose(grads["w_q"], direct_w, rtol=1e-5, atol=1e-5)
  # zero probes do not change the output
  np.testing.assert_allclose(loss(zeros), loss_fn(v, images), rtol=1e-6)
  # each probe reads its delta from the state's own leaf: the refresh knows where to write
  assert sorted(found.leaf_names.values()) == ["quant_state/delta_a", "quant_state/delta_w"]


def test_init_at_one_batch_size_then_apply_differentiate_and_probe_at_another():
  model = TwoConvs(W2A2_EWGS)
  small = jax.nn.relu(jax.random.normal(jax.random.key(0), (8, 6, 6, 2)))
  big = jax.nn.relu(jax.random.normal(jax.random.key(1), (32, 6, 6, 2)))
  v = model.init(jax.random.key(2), small)
  loss_fn = lambda variables, x: jnp.mean(model.apply(variables, x) ** 2)
  assert model.apply(v, big).shape == (32, 3)
  grads = jax.grad(lambda p: loss_fn({**v, "params": p}, big))(v["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  found = hessian.find_quantizers(loss_fn, v, big)
  assert dict(zip(found.paths, (q.shape for q in found.ordered)))["conv_a/a_q"] == big.shape


def test_replacement_in_the_layer_follows_the_rate(images):
  # replacement belongs to the PEGE rule (rules.get("pege").replacement): a PEGE layer
  layer = QuantConv(4, (3, 3), quant=QuantConfig(weight=QuantizerSpec("interval", "pege", 2),
                                                act=QuantizerSpec("interval", "pege", 2)))
  v = layer.init(jax.random.key(12), images)
  v = {k: v[k] for k in ("params", "quant_state")}
  quantized = layer.apply(v, images)
  full = layer.apply(v, images, pege_context(rate=1.0, key=jax.random.key(0)))
  np.testing.assert_allclose(full, quantized, rtol=1e-6)   # p = 1: exactly the quantized layer
  mixed = layer.apply(v, images, pege_context(rate=0.5, key=jax.random.key(0)))
  assert not np.allclose(mixed, quantized)


@pytest.mark.parametrize("name,shape,classes,expected", [
    ("resnet20", (1, 32, 32, 3), 10, 269_850),        # "0.27 M" (EWGS Sec. 4.1)
    ("resnet32", (1, 32, 32, 3), 10, 464_282),
    ("resnet56", (1, 32, 32, 3), 10, 853_146),       # akamaster counts + the BN before fc
    ("vgg16", (1, 32, 32, 3), 10, 14_724_042),
    ("resnet18", (1, 224, 224, 3), 1000, 11_689_512),  # torchvision's counts
    ("resnet34", (1, 224, 224, 3), 1000, 21_797_672),
    ("resnet50", (1, 224, 224, 3), 1000, 25_557_032),
    ("mobilenet_v2", (1, 224, 224, 3), 1000, 3_504_872),
])
def test_model_zoo_shapes_and_parameter_counts(name, shape, classes, expected):
  for quant in (None, W2A2_EWGS):
    model = models.get_model(name, num_classes=classes, quant=quant)
    v = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros(shape))
    out = jax.eval_shape(functools.partial(model.apply, train=False), v, jnp.zeros(shape))
    assert out.shape == (1, classes)
    weights = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(v["params"])
                  if not names.is_quantizer_param([getattr(k, "key", k) for k in p]))
    assert weights == expected


def test_mobilenet_can_quantize_every_layer():
  everything = QuantConfig(quantize_first_last=True)
  shapes = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  paths = initialization.layer_report(models.get_model("mobilenet_v2", num_classes=10, quant=everything),
                                      shapes).quantized()
  assert "stem" in paths and "fc" in paths and "block1_0/depthwise" in paths
  default = initialization.layer_report(models.get_model("mobilenet_v2", num_classes=10, quant=QuantConfig()),
                                        shapes).quantized()
  assert "stem" not in default and "fc" not in default
  resnet18 = initialization.layer_report(models.get_model("resnet18", num_classes=10, quant=QuantConfig()),
                                         jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)).quantized()
  assert "layer2_block0/downsample_conv" in resnet18 and "conv1" not in resnet18


def test_unknown_model_lists_choices():
  with pytest.raises(ValueError, match=r"valid choices: \[.*'mobilenet_v2'.*'resnet20'"):
    models.get_model("resnet21", num_classes=10)


# --- machinery follows the rules as resolved per layer (issue 13) ------------------------------


MIXED = QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("interval", "ewgs", 2),
                    overrides=(("conv_b", {"rule": "pege"}), ("fc", {"rule": "ste"})))


def pege_context(mu=0.0, rate=1.0, key=None):
  """A training context carrying PEGE's per-step factors (what QAT.context builds)."""
  return QuantContext(factors={"pege": {"mu": jnp.float32(mu), "rate": jnp.float32(rate)}}, key=key)


def test_rules_in_use_are_the_resolved_ones(images):
  rules_of = lambda quant, x=images: set(initialization.layer_report(TwoConvs(quant), x).rules())
  assert rules_of(MIXED) == {"ewgs", "pege", "ste"}
  assert rules_of(W2A2_EWGS) == {"ewgs"}
  assert rules_of(None) == set()
  only_pege = QuantConfig(overrides=((".", {"rule": "pege"}),))   # global ste, every layer pege
  assert rules_of(only_pege, jax.ShapeDtypeStruct(images.shape, images.dtype)) == {"pege"}
  with pytest.warns(DeprecationWarning, match="override key 'backward' is deprecated; use 'rule'"):
    old = QuantConfig(overrides=((".", {"backward": "pege"}),))
  assert old == only_pege


def test_context_reaches_only_the_layers_whose_rule_reads_it(images):
  """A PEGE layer in an EWGS model gets mu and replacement; the EWGS and STE layers ignore the context."""
  model = TwoConvs(MIXED)
  v = initialization.init_variables(model, jax.random.key(3), images)
  captured = lambda ctx: model.apply(v, images, ctx=ctx, capture_intermediates=True)[1]["intermediates"]
  plain = captured(None)
  replaced = captured(pege_context(mu=0.0, rate=0.3, key=jax.random.key(0)))
  # conv_a (ewgs) sees the same input either way and must not replace: same output
  np.testing.assert_array_equal(replaced["conv_a"]["__call__"][0], plain["conv_a"]["__call__"][0])
  # conv_b (pege) replaces part of its quantized values by full-precision ones
  assert not np.allclose(replaced["conv_b"]["__call__"][0], plain["conv_b"]["__call__"][0])

  def kernel_grads(mu):
    ctx = pege_context(mu=mu)
    return jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, images, ctx=ctx) ** 2))(v["params"])

  g0, g5 = kernel_grads(0.0), kernel_grads(5.0)
  assert not np.allclose(g0["conv_b"]["kernel"], g5["conv_b"]["kernel"])   # mu acts on the pege layer
  np.testing.assert_array_equal(g0["fc"]["kernel"], g5["fc"]["kernel"])    # downstream of it: untouched

  def own_grads(layer, mu):
    """A layer's gradients from a loss on its own output: they pass through its own rules only."""
    ctx = pege_context(mu=mu)

    def loss(p):
      out = model.apply({**v, "params": p}, images, ctx=ctx, capture_intermediates=True)[1]["intermediates"]
      return jnp.sum(out[layer]["__call__"][0] ** 2)

    return jax.grad(loss)(v["params"])[layer]

  # conv_a (ewgs) and fc (ste) ignore mu: every gradient of theirs (kernel, bounds, alpha) is unchanged;
  # conv_b (pege) reads it (upstream of conv_b, conv_a's full-loss gradients change through conv_b's rule)
  for layer in ("conv_a", "fc"):
    chex.assert_trees_all_equal(own_grads(layer, 0.0), own_grads(layer, 5.0))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), own_grads("conv_b", 0.0), own_grads("conv_b", 5.0))
  assert changed["kernel"], changed


def test_a_user_registered_rule_runs_in_the_layers(images):
  """One function and one registration: a constant-factor rule (a scaled STE) works in the layers."""
  from ewgs_jax import estimators

  def doubled(x, bits, scale):   # STE with its gradient scaled by a constant factor
    @jax.custom_vjp
    def f(x):
      return estimators.rounding(x, bits)[0].astype(x.dtype)
    f.defvjp(lambda x: (estimators.rounding(x, bits)[0].astype(x.dtype), None), lambda _, g: (g * scale,))
    return f(x)

  rule = rules.register(rules.Rule("scaled_ste_test", doubled, factor="scale", source="constant", value=2.0),
                        replace=True)
  try:
    model = TwoConvs(QuantConfig(overrides=(("fc", {"rule": "scaled_ste_test"}),)))
    assert set(initialization.layer_report(model, images).rules()) == {"ste", "scaled_ste_test"}
    v = initialization.init_variables(model, jax.random.key(3), images)
    grads = jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, images)))(v["params"])
    ste_model = TwoConvs(QuantConfig())
    ste_grads = jax.grad(lambda p: jnp.sum(ste_model.apply({**v, "params": p}, images)))(v["params"])
    np.testing.assert_allclose(grads["fc"]["kernel"], 2.0 * ste_grads["fc"]["kernel"], rtol=1e-5, atol=1e-6)
  finally:
    rules.unregister(rule.name)


@pytest.mark.parametrize("target", ["weights", "activations"])
def test_mu_reaches_only_the_quantizers_it_is_configured_for(images, target):
  """pege.mu_on: the mu term of PEGE Eq. 5 on weights only or activations only (the other side: STE)."""
  spec = QuantizerSpec("interval", "pege", 2)
  layer = QuantConv(4, (3, 3), quant=QuantConfig(weight=spec, act=spec, settings={"pege": {"mu_on": target}}))
  both = QuantConv(4, (3, 3), quant=QuantConfig(weight=spec, act=spec))
  v = both.init(jax.random.key(0), images)

  def grads(module, mu):
    f = lambda p, x: jnp.sum(module.apply({**v, "params": p}, x, ctx=pege_context(mu=mu)) ** 2)
    return jax.grad(f, argnums=(0, 1))(v["params"], images)

  (p0, x0), (p_one, x_one), (p_both, x_both) = grads(layer, 0.0), grads(layer, 3.0), grads(both, 3.0)
  if target == "weights":   # kernel gradient as with mu on both; input gradient as with mu = 0
    np.testing.assert_allclose(p_one["kernel"], p_both["kernel"], rtol=1e-5)
    np.testing.assert_array_equal(x_one, x0)
    assert not np.allclose(p_one["kernel"], p0["kernel"])
  else:
    np.testing.assert_array_equal(p_one["kernel"], p0["kernel"])
    np.testing.assert_allclose(x_one, x_both, rtol=1e-5)
    assert not np.allclose(x_one, x0)
  with pytest.raises(ValueError, match=r"config\.pege\.mu_on='bias' is invalid; valid choices"):
    QuantConfig(settings={"pege": {"mu_on": "bias"}})


# --- drop-in for nn.Conv / nn.Dense, and initialisation from a placeholder batch ----------------

CONV_CASES = [
    (dict(kernel_size=3), (2, 9, 3)),                                    # an int kernel: 1-D
    (dict(kernel_size=(3,), strides=2, padding=1), (9, 3)),              # unbatched, int stride and padding
    (dict(kernel_size=(3, 3), kernel_dilation=2, use_bias=True), (2, 7, 7, 3)),
    (dict(kernel_size=(2, 3), strides=(2, 1), input_dilation=(1, 2), padding=((1, 0), (2, 2))), (2, 6, 5, 3)),
    (dict(kernel_size=(3, 3), feature_group_count=3, padding="VALID", param_dtype=jnp.float32), (2, 5, 5, 3)),
    (dict(kernel_size=(2, 2, 2), use_bias=True, bias_init=nn.initializers.ones), (1, 4, 4, 4, 3)),
    (dict(kernel_size=(3, 3)), (2, 2, 5, 5, 3)),                          # extra leading batch dims
]


@pytest.mark.parametrize("kwargs, shape", CONV_CASES)
def test_quant_conv_takes_nn_conv_arguments_and_computes_the_same(kwargs, shape):
  x = jax.random.normal(jax.random.key(3), shape)
  reference = nn.Conv(6, **kwargs)
  variables = reference.init(jax.random.key(4), x)
  ours = QuantConv(6, **{"use_bias": True, **kwargs}, dtype=None)   # nn.Conv's bias default (ours: none)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(4), x)) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)
  quantized = QuantConv(6, **kwargs, quant=W2A2_EWGS)
  y = quantized.apply(quantized.init(jax.random.key(4), x), x)
  assert y.shape == reference.apply(variables, x).shape and bool(jnp.all(jnp.isfinite(y)))


def test_quant_conv_mask_and_dense_arguments():
  x = jax.random.normal(jax.random.key(3), (2, 5, 5, 3))
  mask = jnp.zeros((3, 3, 3, 4)).at[1, 1].set(1.0)
  v = nn.Conv(4, (3, 3), mask=mask).init(jax.random.key(0), x)
  np.testing.assert_allclose(QuantConv(4, (3, 3), mask=mask, use_bias=True).apply(v, x),
                             nn.Conv(4, (3, 3), mask=mask).apply(v, x), rtol=1e-5, atol=1e-6)
  h = jax.random.normal(jax.random.key(5), (2, 3, 7))
  dense = dict(precision=jax.lax.Precision.HIGHEST, bias_init=nn.initializers.ones, param_dtype=jnp.float32)
  v = nn.Dense(5, **dense).init(jax.random.key(0), h)
  np.testing.assert_allclose(QuantDense(5, **dense).apply(v, h), nn.Dense(5, **dense).apply(v, h), rtol=1e-5, atol=1e-6)


def test_every_nn_conv_and_dense_argument_is_accepted_or_named_when_unsupported():
  import dataclasses
  for theirs, ours in ((nn.Conv, QuantConv), (nn.Dense, QuantDense)):
    missing = {f.name for f in dataclasses.fields(theirs)} - {f.name for f in dataclasses.fields(ours)}
    assert not missing, (ours.__name__, missing)
  x = jnp.ones((1, 5, 5, 2))
  for kwargs, named in ((dict(padding="CIRCULAR"), "padding"), (dict(conv_general_dilated=jax.lax.conv_general_dilated),
                                                                 "conv_general_dilated")):
    with pytest.raises(NotImplementedError, match=f"QuantConv does not support {named}"):
      QuantConv(3, (3, 3), **kwargs).init(jax.random.key(0), x)
  with pytest.raises(NotImplementedError, match="QuantDense does not support dot_general"):
    QuantDense(3, dot_general=jax.lax.dot_general).init(jax.random.key(0), jnp.ones((1, 2)))


@pytest.mark.parametrize("placeholder", [jnp.zeros, jnp.ones])
def test_initialising_from_a_placeholder_batch_fails_loudly(placeholder):
  model = TwoConvs(W2A2_EWGS)
  with pytest.raises(ValueError, match=r"'conv_a'.*activation quantizer.*representative batch"):
    model.init(jax.random.key(0), placeholder((2, 6, 6, 2)))
  shapes = jax.eval_shape(model.init, jax.random.key(0), placeholder((2, 6, 6, 2)))   # shapes only: fine
  assert shapes["params"]["conv_a"]["q_a_upper"].shape == ()
  with pytest.raises(ValueError, match="weight quantizer.*kernel holds the constant 0"):
    QuantDense(3, quant=W2A2_EWGS, kernel_init=nn.initializers.zeros).init(
        jax.random.key(0), jax.random.normal(jax.random.key(1), (4, 5)))
  TwoConvs(None).init(jax.random.key(0), placeholder((2, 6, 6, 2)))     # nothing data-driven: fine
  with pytest.raises(Exception, match=r"'conv_a'.*activation quantizer.*representative batch"):   # under jit too
    jax.block_until_ready(jax.jit(model.init)(jax.random.key(0), placeholder((2, 6, 6, 2))))


def test_bias_is_scaled_by_alpha_and_enters_its_initialisation_as_the_official_code():
  """The official QConv computes (conv(Q(x), Q(W)) + b) * |alpha| with alpha = mean|conv(x, W) + b| /
  mean|conv(Q(x), Q(W)) + b| (its F.conv2d takes the bias)."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 6, 6, 3)))
  layer = QuantConv(5, (3, 3), use_bias=True, bias_init=nn.initializers.constant(0.7), quant=W2A2_EWGS)
  v = layer.init(jax.random.key(1), x)
  p = v["params"]
  x_q = ej.interval(x, p["q_a_lower"], p["q_a_upper"], bits=2, weight=False)
  w_q = ej.interval(p["kernel"], p["q_w_lower"], p["q_w_upper"], bits=2, weight=True)
  quantized = conv(x_q, w_q) + p["bias"]
  alpha = jnp.mean(jnp.abs(conv(x, p["kernel"]) + p["bias"])) / jnp.mean(jnp.abs(quantized))
  np.testing.assert_allclose(p["q_alpha"], alpha, rtol=1e-5)
  np.testing.assert_allclose(layer.apply(v, x), quantized * jnp.abs(p["q_alpha"]), rtol=1e-5, atol=1e-6)


def test_training_without_the_quant_state_collection_is_an_error_not_ste(images):
  model = TwoConvs(W2A2_EWGS)
  v = initialization.init_variables(model, jax.random.key(0), images)
  with pytest.raises(ValueError, match=r"'conv_a': its rule reads its factor from the 'quant_state' collection"):
    model.apply({"params": v["params"]}, images, ctx=QuantContext(factors={}))
  model.apply({"params": v["params"]}, images)   # evaluation without it is fine (delta is unused)


def test_a_training_context_without_a_rules_factor_is_an_error(images):
  model = TwoConvs(QuantConfig(weight=QuantizerSpec("interval", "pege", 2), act=QuantizerSpec("interval", "pege", 2)))
  v = initialization.init_variables(model, jax.random.key(0), images)
  with pytest.raises(KeyError, match="the per-step QuantContext has no factor pege/mu"):
    model.apply(v, images, ctx=QuantContext(factors={"other": {"mu": 1.0}}))


@pytest.mark.parametrize("kwargs,shape", [(dict(features=4), (2, 3, 6)), (dict(features=(4, 5), axis=(1, -1)), (2, 3, 6, 7)),
                                          (dict(features=(4,), axis=-1, batch_dims=(0,)), (2, 3, 6))])
def test_quant_dense_general_is_nn_dense_general_and_quantizes(kwargs, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  reference = nn.DenseGeneral(**kwargs)
  v = reference.init(jax.random.key(1), x)
  ours = layers.QuantDenseGeneral(**kwargs)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, v)
  np.testing.assert_array_equal(ours.init(jax.random.key(1), x)["params"]["kernel"], v["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(v, x), reference.apply(v, x), rtol=1e-6, atol=1e-6)
  quantized = layers.QuantDenseGeneral(**kwargs, quant=W2A2_EWGS)
  qv = quantized.init(jax.random.key(1), x)
  assert {"q_w_lower", "q_a_upper", "q_alpha"} <= set(qv["params"])
  grads = jax.grad(lambda p: jnp.sum(quantized.apply({**qv, "params": p}, x) ** 2))(qv["params"])
  assert float(jnp.abs(grads["q_a_upper"])) > 0


def test_quant_einsum_is_nn_einsum_and_quantizes():
  x = jax.random.normal(jax.random.key(0), (2, 4, 3, 7))
  reference = nn.Einsum((7, 3, 5), "abcd,dce->abe")
  v = reference.init(jax.random.key(1), x)
  ours = layers.QuantEinsum((7, 3, 5), "abcd,dce->abe")
  np.testing.assert_allclose(ours.apply(v, x), reference.apply(v, x), rtol=1e-6, atol=1e-6)
  quantized = layers.QuantEinsum((7, 3, 5), "abcd,dce->abe", quant=W2A2_EWGS)
  qv = quantized.init(jax.random.key(1), x)
  y = quantized.apply(qv, x)
  assert y.shape == (2, 4, 5) and not np.allclose(y, reference.apply(v, x))
