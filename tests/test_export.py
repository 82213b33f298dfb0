"""Export: integer codes in range and an integer-arithmetic forward equal to the fake-quantized layer."""

import jax
import numpy as np
import pytest

from ewgs_jax import export, initialization, layers
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
  quant = QuantConfig(rules=(("stage3", {"bits": 4}),))
  model = models.get_model("resnet8", num_classes=10, quant=quant)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
  v = jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(4), x)
  exported = export.export_model(quant, jax.tree.map(np.asarray, v["params"]))
  assert sorted(exported) == initialization.quantizable_layers(model, x)
  assert exported["stage3_block0/conv1"]["weight_codes"].max() <= 15
  assert exported["stage1_block0/conv1"]["weight_codes"].max() <= 3
