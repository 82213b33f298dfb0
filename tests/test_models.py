"""Model-level behaviour on the tiny ResNet-8 (8x8x1 digits size): switches, paths, contexts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import initialization, layers, models
from ewgs_jax.layers import QuantConfig, QuantContext, QuantizerSpec

W2A2_PEGE = QuantConfig(weight=QuantizerSpec("interval", "pege", 2), act=QuantizerSpec("interval", "pege", 2))


@pytest.fixture(scope="module")
def digits():
  return jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))


@pytest.mark.slow  # ~40 s on the loaded 2-core machine (ResNet-8 compile)
def test_disabled_config_is_the_full_precision_model(digits):
  fp = models.get_model("resnet8", num_classes=10)
  off = models.get_model("resnet8", num_classes=10, quant=QuantConfig(enabled=False))
  v = jax.jit(lambda k, x: initialization.init_variables(fp, k, x))(jax.random.key(1), digits)
  off_params = jax.eval_shape(lambda k, x: initialization.init_variables(off, k, x), jax.random.key(1), digits)["params"]
  assert jax.tree_util.tree_structure(off_params) == jax.tree_util.tree_structure(v["params"])
  apply = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False))(v, digits)
  np.testing.assert_allclose(apply(off), apply(fp), rtol=1e-6)


def test_resnet8_quantizable_paths_and_first_last_switch(digits):
  model = models.get_model("resnet8", num_classes=10, quant=W2A2_PEGE)
  paths = list(initialization.layer_report(model, digits).quantized())
  assert paths == [f"stage{s}_block0/conv{c}" for s in (1, 2, 3) for c in (1, 2)]
  both = QuantConfig(weight=W2A2_PEGE.weight, act=W2A2_PEGE.act, quantize_first_last=True)
  assert set(initialization.layer_report(models.get_model("resnet8", num_classes=10, quant=both), digits).quantized()) \
      == set(paths) | {"conv1", "fc"}


@pytest.mark.slow  # ~90-170 s on the loaded 2-core machine (quantized ResNet-8 compile)
def test_init_with_context_and_replacement_gives_finite_outputs(digits):
  model = models.get_model("resnet8", num_classes=10, quant=W2A2_PEGE)
  ctx = QuantContext(factors={"pege": {"mu": jnp.float32(0.5), "rate": jnp.float32(0.5)}}, key=jax.random.key(2))
  v = jax.jit(lambda k, x, c: initialization.init_variables(model, k, x, ctx=c))(jax.random.key(1), digits, ctx)
  assert set(v) == {"params", "batch_stats", "quant_state"}
  train = jax.jit(lambda v, x, c: model.apply(v, x, train=True, ctx=c, mutable=["batch_stats"])[0])
  logits = train(v, digits, ctx)
  assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
  # replacement at rate 0.5 changes the training output relative to no replacement (rate 1)
  plain = train(v, digits, QuantContext(factors={"pege": {"mu": jnp.float32(0.5), "rate": jnp.float32(1.0)}},
                                        key=jax.random.key(2)))
  assert not np.allclose(logits, plain)
