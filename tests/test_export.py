"""Export: packed codes, integer layers exact, and whole integer models equal to their fake-quantized twins.

Equality, stated (:func:`assert_integer_model_matches`): on the same input every integer layer equals
the fake-quantized layer within :data:`LAYER_TOL`; whole models agree in every predicted class, with
logits within :data:`REL_TOL` (``max |logit difference| / max |logit|`` per example) whenever their
activation codes agree. They are not bit-equal: the fake-quantized layer sums float products (float32
rounding) where the integer layer sums exactly in int32, so a value within that rounding of a
threshold may take the neighbouring code in the next layer, and the difference propagates.
"""

import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import estimators, initialization, models, names, ops, quantizers
from ewgs_jax.export import check, integer, model as export_model, packing, runtime
from ewgs_jax.layers import QuantConfig, QuantizerSpec

# Float32 rounding of the fake-quantized sums and of the requantization is ~1e-6 relative; LSQ's
# fake-quantized weights carry their own ~1e-5 at 8 bits ((k / n) n - Q_N in float32), hence 1e-4.
LAYER_TOL = 1e-4   # one layer, same input
REL_TOL = 1e-4     # whole model, when every activation code agrees
MAX_FLIPS = 1e-2   # whole model: fraction of activation codes that may differ (see assert_integer_model_matches)
METHODS = ("interval", "pact", "lsq", "dorefa")
BITS = (1, 2, 4, 8)
CPU = ("cpu",)

# Tiny members of each model family (compiles stay short); the slow matrix adds the rest.
FAMILIES = {
    "cifar_resnet": ("resnet8", {"stage_widths": (8, 16)}, (8, 8, 3)),
    "vgg": ("vgg16", {"layout": (8, "M", 16, 16, "M")}, (8, 8, 3)),
    "imagenet_resnet_basic": ("resnet18", {"stage_sizes": (1, 1)}, (16, 16, 3)),
    "imagenet_resnet_bottleneck": ("resnet50", {"stage_sizes": (1, 1)}, (16, 16, 3)),
    "mobilenet_v2": ("mobilenet_v2", {}, (16, 16, 3)),
}


# --- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_round_trips_and_uses_the_smallest_slot(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2 ** bits, (3, 5, 7))
  codes.flat[:2] = (0, 2 ** bits - 1)
  packed = packing.pack(codes, bits)
  slot = {1: 1, 2: 2, 3: 4, 4: 4}.get(bits, 8 if bits <= 8 else 16)
  assert packed.ndim == 1 and packed.dtype == (np.uint8 if slot <= 8 else np.uint16)
  assert packed.size == math.ceil(codes.size * slot / (8 if slot <= 8 else 16))
  np.testing.assert_array_equal(jax.jit(packing.unpack, static_argnums=(1, 2))(packed, bits, codes.shape), codes)


def test_pack_refuses_codes_out_of_range():
  with pytest.raises(ValueError, match=r"0\.\.3 for 2 bits"):
    packing.pack(np.array([0, 4]), 2)
  with pytest.raises(ValueError, match=r"0\.\.1 for 1 bits"):
    packing.pack(np.array([-1, 1]), 1)


# --- one layer -----------------------------------------------------------------------------------


def method_params(method, x, bits, weight, per_channel=False):
  """The method's data-driven initial parameters for ``x`` (PACT's activation clip from the data too:
  its constant 10 would put every activation of a random network in code 0 at low bits); per output
  channel with ``per_channel``."""
  spec = quantizers.get_method(method).params
  wrap = quantizers.per_channel if per_channel else (lambda init: init)
  params = {suffix: np.asarray(wrap(init)(x, bits, weight), np.float32) for suffix, init in spec.items()}
  if method == "pact" and not weight:
    params["clip"] = np.float32(3.0 * np.std(x))
  return params


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", BITS)
def test_weight_codes_are_in_range_and_reproduce_the_fake_quantized_kernel(method, bits):
  kernel = jax.random.normal(jax.random.key(bits), (3, 3, 4, 6)) * 0.3
  params = method_params(method, kernel, bits, weight=True)
  codes = np.asarray(integer.codes(method, kernel, params, bits, weight=True))   # int32: a range check can fail
  assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
  assert len(np.unique(codes)) > 1
  levels = integer.weight_levels(method, kernel, params, bits)
  np.testing.assert_array_equal(levels.codes, codes)
  assert levels.codes.dtype == np.uint8
  fake = np.asarray(quantizers.get_method(method).apply(kernel, params, bits=bits, weight=True,
                                                       discretizer=estimators.ste))
  # float32 slop of the fake-quantized values (LSQ's (k / n) n - Q_N loses a few ulps near the middle)
  np.testing.assert_allclose(levels.scale * levels.levels(), fake, rtol=1e-6, atol=1e-5 * np.abs(fake).max())


@pytest.mark.parametrize("method", METHODS)
def test_activation_scale_maps_codes_to_the_fake_quantized_values(method):
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (500,))) * 1.5
  params = method_params(method, np.asarray(x), 3, weight=False)
  k = integer.codes(method, x, params, 3, weight=False)
  fake = quantizers.get_method(method).apply(x, params, bits=3, weight=False, discretizer=estimators.ste)
  np.testing.assert_allclose(integer.activation_scale(method, params, 3) * np.asarray(k), fake, rtol=1e-6, atol=1e-7)


def test_per_channel_activation_parameters_have_no_integer_form():
  with pytest.raises(NotImplementedError, match="per-channel"):
    integer.activation_scale("interval", {"lower": np.zeros(3), "upper": np.ones(3)}, 2)


@pytest.mark.parametrize("method,params,per_channel_scale", [
    ("lsq", {"step": np.linspace(0.1, 0.3, 5, dtype=np.float32)}, True),
    ("pact", {"clip": np.linspace(0.5, 1.5, 5, dtype=np.float32)}, True),
    ("interval", {"lower": -np.linspace(0.5, 1.5, 5, dtype=np.float32),   # output 2 x_q - 1 whatever the
                  "upper": np.linspace(0.5, 1.5, 5, dtype=np.float32)}, False)])   # bounds (EWGS Eq. 3)
def test_per_channel_weight_parameters(method, params, per_channel_scale):
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  levels = integer.weight_levels(method, kernel, params, 2)
  assert levels.scale.shape == ((5,) if per_channel_scale else ())
  fake = quantizers.get_method(method).apply(kernel, params, bits=2, weight=True, discretizer=estimators.ste)
  np.testing.assert_allclose(levels.scale * levels.levels(), fake, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strides,padding,groups", [((1, 1), "SAME", 1), ((2, 2), "VALID", 1),
                                                    ((2, 1), [(1, 2), (0, 1)], 1), ((1, 1), "SAME", 3),
                                                    ((2, 2), [(1, 1), (1, 1)], 6), ((1, 1), "SAME", 2)])
def test_integer_convolution_is_exact_and_uses_no_convolution_op(strides, padding, groups):
  rng = np.random.default_rng(groups)
  a = rng.integers(0, 256, (2, 9, 8, 6)).astype(np.int32)
  w = rng.integers(-255, 256, (3, 3, 6 // groups, 6)).astype(np.int32)
  conv = jax.jit(lambda a, w: integer.integer_conv(a, w, strides, padding, groups, dtype=jnp.int16))
  acc = conv(a, w)
  # exact reference in float64 (every partial sum is an integer below 2^53)
  ref = jax.lax.conv_general_dilated(np.asarray(a, np.float32), np.asarray(w, np.float32), strides, padding,
                                     dimension_numbers=ops.NHWC, feature_group_count=groups, precision="highest")
  np.testing.assert_array_equal(acc, np.round(np.asarray(ref, np.float64)).astype(np.int64))
  assert acc.dtype == np.int32
  # no integer convolution (UNIMPLEMENTED on XLA's GPU backend): an integer dot (or, depthwise, a
  # multiply-add over the taps) does the work
  hlo = conv.lower(a, w).as_text()
  assert "stablehlo.convolution" not in hlo and ("dot_general" in hlo or groups == a.shape[-1])


# --- whole models --------------------------------------------------------------------------------


def random_variables(model, shape, seed=0):
  """Variables of ``model`` without compiling its initialisation: random weights, non-trivial BatchNorm
  statistics (so folding is tested), and each quantizer's data-driven initial parameters computed from
  its kernel or from a ReLU-like sample of activations."""
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((2, *shape), jnp.float32))
  rng = np.random.default_rng(seed)
  sample = np.maximum(rng.normal(size=4096), 0).astype(np.float32)
  abstract = {k: v for k, v in abstract.items() if k in (names.PARAMS, names.BATCH_STATS)}   # no probes
  flat = {names.path_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  values = {}
  for key in sorted(flat, key=lambda k: k[-1].startswith(names.QUANTIZER_PARAM_PREFIX)):   # kernels first
    collection, *module, leaf = key
    shape_ = flat[key].shape
    if leaf == "kernel":
      value = rng.normal(size=shape_) * math.sqrt(2.0 / math.prod(shape_[:-1]))
    elif leaf in ("bias", "mean"):
      value = rng.normal(size=shape_) * 0.3
    elif leaf in ("scale", "var", names.OUTPUT_SCALE):
      value = rng.uniform(0.5, 1.5, shape_)
    elif collection == names.PARAMS and names.is_quantizer_param([leaf]):
      setting = model.quant.resolve("/".join(module))
      kind, suffix = leaf[2], leaf[4:]
      spec = setting.weight if kind == "w" else setting.act
      source = values[(collection, *module, "kernel")] if kind == "w" else sample
      value = method_params(spec.method, np.asarray(source, np.float32), spec.bits, kind == "w",
                            spec.per_channel)[suffix]
    else:
      value = np.zeros(shape_)
    values[key] = np.asarray(value, np.float32).reshape(shape_)
  tree = {}
  for key, value in values.items():
    node = tree
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = value
  return tree


def cyclic_bits(model, shape, bits=BITS) -> tuple:
  """Per-layer rules giving the model's quantized layers the bit widths ``bits`` in turn."""
  paths = sorted(initialization.layer_report(model, jax.ShapeDtypeStruct((1, *shape), jnp.float32), train=False).paths)
  return tuple((f"^{p}$", {"bits": bits[i % len(bits)]}) for i, p in enumerate(paths))


def build(family, quant, **extra):
  name, kwargs, shape = FAMILIES[family]
  model = models.get_model(name, num_classes=10, quant=quant, **kwargs, **extra)
  return model, shape


def recorder(store):
  """An interceptor that records ``(input, output)`` of every quantized layer and BatchNorm by path."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (*export_model.QUANTIZED, nn.BatchNorm)):
      store["/".join(context.module.scope.path)] = (args[0], out)
    return out
  return interceptor


def traced_with_records(fn):
  """``fn(*args) -> (result, {path: (input, output)})``, jitted."""
  def run(*args):
    store = {}
    with nn.intercept_methods(recorder(store)):
      return fn(*args), store
  return jax.jit(run)


def layer_arrays(integer_model, path):
  return {k[len(path) + 1:]: v for k, v in integer_model.arrays.items() if k.startswith(path + "/")}


def max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def activation_codes(meta, arrays, x):
  act = meta["act"]
  return np.asarray(integer.codes(act["method"], x, {k: arrays[f"act_{k}"] for k in act["params"]}, act["bits"],
                                  weight=False))


def assert_integer_model_matches(model, shape, batch=16, seed=0):
  """The integer model against the fake-quantized one, at two levels.

  1. Layer by layer, on the same input (the fake model's): every integer layer's output and every
     folded BatchNorm's output equals the fake model's within ``LAYER_TOL`` (relative to its largest
     value). This is the arithmetic, exact up to float32 rounding of the final scaling.
  2. The whole model: every predicted class agrees, and the logits are within ``REL_TOL`` whenever
     the two models' activation codes agree. Where the fake model's float32 sums put a value within
     rounding of a threshold, one code differs and the difference propagates (more often at 8 bits,
     whose thresholds are dense); then at most ``MAX_FLIPS`` of the codes may differ.
  """
  variables = random_variables(model, shape, seed)
  images = np.asarray(jax.random.normal(jax.random.key(seed + 1), (batch, *shape)))
  integer_model = export_model.integer_model(variables, model=model, image_shape=shape, platforms=CPU)
  metas = integer_model.metadata["layers"]
  fake, fake_calls = traced_with_records(lambda v, x: model.apply(v, x, train=False))(variables, images)
  fake = np.asarray(fake)
  assert np.ptp(fake, axis=0).max() > 1e-3, "degenerate test: the logits do not depend on the input"

  @jax.jit
  def teacher_forced(arrays, calls):
    out = {}
    for path, meta in metas.items():
      a = {k[len(path) + 1:]: v for k, v in arrays.items() if k.startswith(path + "/")}
      acc, y = export_model.integer_layer(meta, a, calls[path][0])
      out[path] = y
      if meta["folded_bn"]:
        out[meta["folded_bn"]] = export_model.folded_output(a, acc)
    return out

  forced = teacher_forced(integer_model.arrays, {p: fake_calls[p] for p in metas})
  assert len(forced) == len(metas) + sum(bool(m["folded_bn"]) for m in metas.values())
  for path, y in forced.items():
    assert max_rel(y, fake_calls[path][1]) < LAYER_TOL, path

  logits = np.asarray(integer_model(images))
  stats = check.logit_agreement(fake, logits)
  flips = 0
  if stats["max_rel_logit_error"] >= REL_TOL:   # count the codes that differ (the only other source)
    forward = export_model.forward_function(model, metas)
    _, int_calls = traced_with_records(forward)(integer_model.arrays, images)
    for path, meta in metas.items():
      if meta["act"] is not None:
        codes_fake = activation_codes(meta, layer_arrays(integer_model, path), fake_calls[path][0])
        codes_int = activation_codes(meta, layer_arrays(integer_model, path), int_calls[path][0])
        flips += int((codes_fake != codes_int).sum())
    total = sum(np.size(fake_calls[p][0]) for p, m in metas.items() if m["act"] is not None)
    assert 0 < flips <= MAX_FLIPS * total, (flips, total, stats)
  print(f"\n  agreement {stats['agreement']:.3f} max_rel_logit_error {stats['max_rel_logit_error']:.2e} "
        f"code flips {flips}")
  assert stats["agreement"] == 1.0
  return integer_model, variables, images, logits


def model_quant(method, family="cifar_resnet", first_last=True, bits=2, per_channel=False):
  spec = QuantizerSpec(method, "ste", bits)
  weight = QuantizerSpec(method, "ste", bits, per_channel=per_channel)
  quant = QuantConfig(weight=weight, act=spec, quantize_first_last=first_last)
  model, shape = build(family, quant)
  # 1-bit layers among MobileNetV2's 52 leave a random network's logits independent of its input (a
  # vacuous test); the other families cover 1 bit
  cycle = BITS[1:] if family == "mobilenet_v2" else BITS
  return QuantConfig(weight=weight, act=spec, quantize_first_last=first_last,
                     overrides=cyclic_bits(model, shape, cycle)), shape


@pytest.mark.parametrize("method", METHODS)
def test_integer_cifar_resnet_matches_fake_quant_for_every_method_at_1_2_4_8_bits(method):
  quant, shape = model_quant(method)   # layers at 1, 2, 4, 8 bits in turn; first and last layers quantized
  model, _ = build("cifar_resnet", quant)
  integer_model, *_ = assert_integer_model_matches(model, shape)
  layers = integer_model.metadata["layers"]
  assert {m["weight"]["bits"] for m in layers.values()} == set(BITS)
  assert layers["fc"]["op"] == "dot" and layers["conv1"]["op"] == "conv"
  assert all(m["folded_bn"] for p, m in layers.items() if p != "fc")   # every conv is followed by its BatchNorm


@pytest.mark.parametrize("method", ["interval", pytest.param("pact", marks=pytest.mark.slow),
                                    pytest.param("lsq", marks=pytest.mark.slow)])   # alpha per channel: interval
def test_per_channel_weights_export_with_per_channel_requantization_scales(method):
  """Per-channel weight ranges (and, for the interval method, a per-channel alpha): the integer model still
  matches the fake-quantized one, each layer's requantization scale one per output channel."""
  quant, shape = model_quant(method, per_channel=True)   # 1, 2, 4, 8 bits in turn, first and last layers too
  model, _ = build("cifar_resnet", quant)
  integer_model, variables, *_ = assert_integer_model_matches(model, shape)
  for path, meta in integer_model.metadata["layers"].items():
    features = meta["weight"]["shape"][-1]
    assert meta["weight"]["per_channel"]
    assert layer_arrays(integer_model, path)["scale"].shape == (features,), path
  assert variables["params"]["fc"]["q_w_" + next(iter(quantizers.get_method(method).params))].shape == (10,)


@pytest.mark.parametrize("family,method", [("vgg", "lsq"), ("imagenet_resnet_bottleneck", "interval")])
def test_integer_model_matches_fake_quant_on_other_families(family, method):
  quant, shape = model_quant(method, family, first_last=family == "vgg")
  model, _ = build(family, quant)
  integer_model, *_ = assert_integer_model_matches(model, shape)
  if family == "imagenet_resnet_bottleneck":   # strides and padding are the layers' own
    params = integer_model.metadata["layers"]["layer2_block0/conv2"]["op_params"]
    assert params["strides"] == [2, 2] and params["padding"] == [[1, 1], [1, 1]]
    assert "layer2_block0/downsample_conv" in integer_model.metadata["layers"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_integer_model_matches_fake_quant_for_every_family_and_method(family, method):
  quant, shape = model_quant(method, family)
  model, _ = build(family, quant)
  integer_model, *_ = assert_integer_model_matches(model, shape)
  if family == "mobilenet_v2":
    assert integer_model.metadata["layers"]["block1_0/depthwise"]["op_params"]["feature_group_count"] == 96


def test_mixed_settings_weight_only_layers_and_full_precision_edges():
  rules = (("stage1_block0/conv1", {"act_method": "none", "weight_bits": 1}),     # W1A32: float activations
           ("stage1_block0/conv2", {"weight_method": "none"}),                   # float weights, 4-bit codes
           ("stage2_block0/conv1", {"weight_method": "interval", "act_method": "lsq", "bits": 3}),
           ("stage2_block0/conv2", {"method": "dorefa", "bits": 5}))
  quant = QuantConfig(weight=QuantizerSpec("pact", "ste", 4), act=QuantizerSpec("pact", "ste", 4), overrides=rules)
  model, shape = build("cifar_resnet", quant)
  integer_model, *_ = assert_integer_model_matches(model, shape)
  layers = integer_model.metadata["layers"]
  assert layers["stage1_block0/conv1"]["act"] is None and layers["stage1_block0/conv2"]["weight"] is None
  assert layers["stage2_block0/conv2"]["weight"]["slot_bits"] == 8
  assert "conv1" not in layers and "fc" not in layers   # full precision, run as the model has them
  assert "fp/params/conv1/kernel" in integer_model.arrays and "fp/params/fc/kernel" in integer_model.arrays


def test_a_full_precision_model_has_no_integer_form():
  model, shape = build("cifar_resnet", None)
  with pytest.raises(ValueError, match="no quantized layer"):
    export_model.integer_model(random_variables(model, shape), model=model, image_shape=shape, platforms=CPU)


def test_an_int32_overflow_is_refused_naming_the_layer():
  spec = QuantizerSpec("interval", "ste", 16)
  model, shape = build("cifar_resnet", QuantConfig(weight=spec, act=spec))
  with pytest.raises(NotImplementedError, match="stage1_block0/conv1.*overflow"):
    export_model.integer_model(random_variables(model, shape), model=model, image_shape=shape, platforms=CPU)


# --- the file ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  quant, shape = model_quant("interval")
  model, _ = build("cifar_resnet", quant)
  integer_model, variables, images, logits = assert_integer_model_matches(model, shape)
  path = str(tmp_path_factory.mktemp("export") / "model.npz")
  return integer_model, path, integer_model.save(path), images, logits


def test_the_file_round_trips(saved):
  integer_model, path, size, images, logits = saved
  assert size == os.path.getsize(path) and not os.path.exists(path + ".tmp")
  loaded = runtime.load(path)
  np.testing.assert_array_equal(loaded(images), logits)
  np.testing.assert_array_equal(loaded(images[:3]), logits[:3])   # any batch size
  assert loaded.metadata == json.loads(json.dumps(integer_model.metadata))
  assert sorted(loaded.arrays) == sorted(integer_model.arrays)
  for path, meta in loaded.metadata["layers"].items():   # 8, 4, 2 or 1 codes per byte
    size = math.prod(meta["weight"]["shape"])
    assert loaded.arrays[f"{path}/weight_codes"].size == math.ceil(size * meta["weight"]["slot_bits"] / 8)
  assert set(loaded.metadata["platforms"]) == set(CPU)


def test_the_file_runs_with_numpy_and_jax_alone(saved, tmp_path):
  _, path, _, images, logits = saved
  (tmp_path / "runtime.py").write_text(open(runtime.__file__).read())   # the loader, copied alone
  np.save(tmp_path / "images.npy", images)
  code = ("import sys, numpy as np, runtime\n"
          "assert not any(m.startswith('ewgs_jax') for m in sys.modules)\n"
          f"m = runtime.load({path!r})\n"
          "np.save('logits.npy', np.asarray(m(np.load('images.npy'))))\n"
          "assert not any(m.startswith(('ewgs_jax', 'flax')) for m in sys.modules)\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  flatbuffers = os.path.dirname(os.path.dirname(__import__("flatbuffers").__file__))
  env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{flatbuffers}", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), logits)


def test_loading_something_else_is_one_clear_error(tmp_path):
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
    runtime.load(str(tmp_path / "junk.npz"))
  np.savez(tmp_path / "plain.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="not an exported integer model"):
    runtime.load(str(tmp_path / "plain.npz"))
  metadata = np.frombuffer(json.dumps({"format": runtime.FORMAT}).encode(), np.uint8)
  np.savez(tmp_path / "torn.npz", **{runtime.METADATA_KEY: metadata, runtime.FORWARD_KEY: np.zeros(7, np.uint8)})
  with pytest.raises(ValueError, match="torn.npz: its serialized forward is damaged"):
    runtime.load(str(tmp_path / "torn.npz"))
  np.savez(tmp_path / "bad_meta.npz", **{runtime.METADATA_KEY: np.zeros(3, np.uint8),
                                         runtime.FORWARD_KEY: np.zeros(7, np.uint8)})
  with pytest.raises(ValueError, match="bad_meta.npz: its metadata is damaged"):
    runtime.load(str(tmp_path / "bad_meta.npz"))


def test_the_forward_exports_for_gpus_without_integer_convolutions(saved):
  integer_model = saved[0]
  quant, shape = model_quant("interval")
  model, _ = build("cifar_resnet", quant)
  variables = random_variables(model, shape)
  exported = export_model.integer_model(variables, model=model, image_shape=shape, platforms=("cuda",)).exported
  text = exported.mlir_module()
  convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
  assert convolutions == [] and "dot_general" in text and exported.platforms == ("cuda",)
  assert integer_model.exported.platforms == CPU


class _MaskedNet(nn.Module):
  quant: QuantConfig

  @nn.compact
  def __call__(self, x, train=False):
    from ewgs_jax.layers import QuantConv, QuantDense
    mask = np.ones((3, 3, 3, 8), np.float32)
    mask[:, :, :, ::2] = 0.0                        # half the output channels see nothing but the bias
    mask[0] = 0.0
    x = nn.relu(QuantConv(8, (3, 3), quant=self.quant, mask=mask, name="masked")(x))
    x = nn.relu(QuantConv(8, (3, 3), quant=self.quant, name="plain")(x))
    return QuantDense(4, quant=self.quant, name="head")(x.mean(axis=(1, 2)))


def test_a_masked_convolution_exports_its_masked_kernel():
  quant = QuantConfig(weight=QuantizerSpec("interval", "ste", 4), act=QuantizerSpec("interval", "ste", 4),
                      quantize_first_last=True)
  assert_integer_model_matches(_MaskedNet(quant), (8, 8, 3))


def test_layers_without_an_integer_form_are_refused_with_their_name():
  from ewgs_jax.layers import QuantDenseGeneral

  class Net(nn.Module):
    quant: QuantConfig

    @nn.compact
    def __call__(self, x, train=False):
      return QuantDenseGeneral(4, quant=self.quant, name="dg")(x)

  model = Net(QuantConfig(weight=QuantizerSpec("interval", "ste", 4), act=QuantizerSpec("interval", "ste", 4),
                          quantize_first_last=True))
  variables = random_variables(model, (6,))
  with pytest.raises(NotImplementedError, match="layer 'dg' is a QuantDenseGeneral, which the integer model"):
    export_model.integer_model(variables, model=model, image_shape=(6,), platforms=CPU)
