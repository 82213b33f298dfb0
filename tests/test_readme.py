"""The README's functional-API example runs and computes what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README lost its example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  grad_w, grad_lower, grad_upper = namespace["grads"]
  assert grad_w.shape == (3, 3, 16, 16) and np.isfinite(np.asarray(grad_w)).all()
  assert float(grad_lower) != 0.0 and float(grad_upper) != 0.0
  np.testing.assert_allclose(float(namespace["p_T"]), np.log10(0.001 * 1000 + 2.0), rtol=1e-6)
  mixed = np.asarray(namespace["mixed"])
  assert np.all(np.isclose(mixed, 0.4) | np.isclose(mixed, 1 / 3))


def test_readme_user_rule_example_runs_and_trains_in_a_layer():
  from ewgs_jax import estimators, layers
  import jax
  import jax.numpy as jnp
  block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "register_rule" in b)
  namespace = {}
  try:
    exec(compile(block, "README.md", "exec"), namespace)
    assert estimators.get_rule("damped").source == "constant"
    quant = layers.QuantConfig(weight=layers.QuantizerSpec("interval", "damped", 2),
                               act=layers.QuantizerSpec("interval", "damped", 2))
    model = layers.QuantDense(3, quant=quant)
    x = jax.random.uniform(jax.random.key(0), (4, 5))
    v = model.init(jax.random.key(1), x)
    g = jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, x)))(v["params"])
    assert np.all(np.isfinite(np.asarray(g["kernel"])))
  finally:
    estimators.RULES.pop("damped", None)


def test_readme_quantize_and_nnx_examples_run():
  import jax.numpy as jnp
  from flax import nnx
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  quantize_block = next(b for b in blocks if "ej.quantize(" in b)
  nnx_block = next(b for b in blocks if "nnx.bridge.ToNNX" in b)
  namespace = {}
  exec(compile(quantize_block, "README.md", "exec"), namespace)
  logits = np.asarray(namespace["logits"])
  assert logits.shape == (8, 10) and np.isfinite(logits).all()
  assert "q_a_lower" in namespace["variables"]["params"]["Conv_0"]
  assert "q_a_lower" not in namespace["variables"]["params"]["Dense_0"]      # the rule kept it full precision
  exec(compile(nnx_block, "README.md", "exec"), namespace)
  grads = namespace["grads"]
  assert float(jnp.abs(dict(nnx.to_flat_state(grads["conv"]))[("q_a_upper",)].get_value())) > 0
