"""Export: integer codes in range and an integer-arithmetic forward equal to the fake-quantized layer."""

import jax
import numpy as np
import pytest

from ewgs_jax import export, initialization, layers, ops
from ewgs_jax.layers import QuantConfig, QuantConv, QuantizerSpec


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_integer_forward_matches_fake_quantized_layer(bits):
  quant = QuantConfig(weight=QuantizerSpec("interval", "ewgs", bits), act=QuantizerSpec("interval", "ewgs", bits))
  layer = QuantConv(5, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)], quant=quant)
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 9, 9, 3)))
  v = layer.init(jax.random.key(1), x)
  params = jax.tree.map(np.asarray, v["params"])
  exported = export.export_layer(params, bits, bits)
  codes = exported["weight_codes"]
  assert codes.dtype == np.uint8 and codes.min() >= 0 and codes.max() <= 2 ** bits - 1
  assert len(np.unique(codes)) > 1
  x_test = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 9, 9, 3))) * 1.3
  fake = layer.apply({"params": v["params"], "quant_state": v["quant_state"]}, x_test)
  integer = export.integer_conv(x_test, exported, strides=(2, 2), padding=[(1, 1), (1, 1)])
  np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5)


def test_export_model_finds_every_interval_layer():
  from ewgs_jax import models
  quant = QuantConfig(overrides=(("stage3", {"bits": 4}),))
  model = models.get_model("resnet8", num_classes=10, quant=quant)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
  v = jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(4), x)
  exported = export.export_model(quant, jax.tree.map(np.asarray, v["params"]))
  assert sorted(exported) == sorted(initialization.layer_report(model, x).quantized())
  assert exported["stage3_block0/conv1"]["weight_codes"].max() <= 15
  assert exported["stage1_block0/conv1"]["weight_codes"].max() <= 3


@pytest.mark.parametrize("strides,padding,groups", [((1, 1), "SAME", 1), ((2, 2), "VALID", 1),
                                                    ((2, 1), [(1, 2), (0, 1)], 1), ((1, 1), "SAME", 3)])
def test_integer_codes_convolution_is_exact_and_uses_no_convolution_op(strides, padding, groups):
  rng = np.random.default_rng(groups)
  a = rng.integers(0, 256, (2, 9, 8, 6))
  w = rng.integers(0, 256, (3, 3, 6 // groups, 6))
  conv = jax.jit(lambda a, w: export.integer_conv_codes(a, w, strides, padding, groups))
  acc, count = conv(a, w)
  # exact reference in float64 (every partial sum is an integer below 2^53)
  ref = lambda lhs, rhs: np.asarray(jax.lax.conv_general_dilated(
      np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), strides, padding,
      dimension_numbers=ops.NHWC, feature_group_count=groups, precision="highest"), np.float64)
  np.testing.assert_array_equal(acc, np.round(ref(a, w)).astype(np.int64))
  np.testing.assert_array_equal(count, np.round(ref(a, np.ones_like(w))).astype(np.int64))
  assert acc.dtype == count.dtype == np.int32
  # no integer convolution (UNIMPLEMENTED on XLA's GPU backend): an integer dot does the work
  hlo = conv.lower(a, w).as_text()
  assert "convolution" not in hlo and "dot_general" in hlo
