"""The README's examples run and compute what they say."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block_with(marker: str) -> str:
  return next(b for b in blocks() if marker in b)


def test_readme_python_example_runs():
  assert blocks(), "README lost its example"
  namespace = {}
  exec(compile(blocks()[0], "README.md", "exec"), namespace)
  grad_w, grad_lower, grad_upper = namespace["grads"]
  assert grad_w.shape == (3, 3, 16, 16) and np.isfinite(np.asarray(grad_w)).all()
  assert float(grad_lower) != 0.0 and float(grad_upper) != 0.0
  np.testing.assert_allclose(float(namespace["p_T"]), np.log10(0.001 * 1000 + 2.0), rtol=1e-6)
  mixed = np.asarray(namespace["mixed"])
  assert np.all(np.isclose(mixed, 0.4) | np.isclose(mixed, 1 / 3))


@pytest.fixture
def damped_rule():
  """The README's user rule, registered for the test and removed after it."""
  from ewgs_jax import rules
  namespace = {}
  try:
    exec(compile(block_with("rules.register("), "README.md", "exec"), namespace)
    yield namespace
  finally:
    rules.unregister("damped")


def test_readme_user_rule_has_its_own_factor_and_it_reaches_the_backward_pass(damped_rule):
  import jax
  import jax.numpy as jnp
  import ewgs_jax as ej
  from ewgs_jax import config as config_lib, layers, rules
  rule = rules.get("damped")
  assert (rule.source, rule.factor) == ("context", "lam")
  quant = ej.QuantConfig(weight=ej.QuantizerSpec("interval", "damped", 2), act=ej.QuantizerSpec("interval", "damped", 2),
                         settings={"damped": {"lam_max": 0.8}})
  qat = ej.QAT(quant, total_steps=100)
  ctx = qat.context(0)
  assert float(ctx.factor("damped", "lam")) == pytest.approx(0.8) and float(qat.context(100).factor("damped", "lam")) < 1e-6
  assert set(qat.metrics(ctx)) == {"damped/lam"}
  model = layers.QuantDense(3, quant=quant)
  x = jax.random.uniform(jax.random.key(0), (16, 5))
  v = model.init(jax.random.key(1), x)
  grad = lambda c: jax.grad(lambda inputs: jnp.sum(model.apply(v, inputs, c) * jnp.arange(3.0)))(x)
  # the input gradient through the activation quantizer is damped by lam_T: it differs from lam = 0 (STE)
  damped, ste = grad(ctx), grad(ej.QuantContext(factors={"damped": {"lam": jnp.float32(0.0)}}))
  assert not np.allclose(damped, ste) and np.all(np.abs(damped) <= np.abs(ste) + 1e-6)
  # its config section comes with it: default, meaning and the override
  c = config_lib.default_config()
  assert c.damped.lam_max == 0.5 and "annealed to 0" in config_lib.meanings()["damped.lam_max"]


def test_readme_user_rule_trains_through_train_py(tmp_path):
  """The user's rule end to end through the training command line: a config file that defines it."""
  config_file = tmp_path / "my_config.py"
  config_file.write_text(
      "import pathlib, re\n"
      f"README = pathlib.Path({str(README)!r}).read_text()\n"
      "exec(next(b for b in re.findall(r'```python\\n(.*?)```', README, re.S) if 'rules.register(' in b))\n"
      "from ewgs_jax.configs import quickstart\n"
      "def get_config(variant=None):\n"
      "  c = quickstart.get_config(variant)\n"
      "  c.model_kwargs.stage_widths = (8,)\n"
      "  return c\n")
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "ewgs_jax.train", "--config", f"{config_file}:w2a2_damped", "--workdir", str(workdir),
       "--config.num_train_steps=4", "--config.damped.lam_max=0.3", "--config.batch_size=64",
       "--config.log_every_steps=1", "--config.progress_bar=False", "--config.eval_batch_size=120"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  lam = [r["damped/lam"] for r in records if r["split"] == "train"]
  assert lam[0] == pytest.approx(0.3) and lam == sorted(lam, reverse=True) and lam[-1] < 0.3


def test_readme_own_loop_example_refreshes_delta_and_runs_pege():
  namespace = {}
  exec(compile(block_with("qat.run_due(step, variables"), "README.md", "exec"), namespace)
  variables, metrics = namespace["variables"], namespace["metrics"]
  deltas = variables["quant_state"]
  # EWGS layers got a delta from the refresh at step 6 (from the user's loss on (pixels, targets) batches
  # of 32, the model initialised at batch 8); the PEGE layer and the full-precision ends did not
  assert any(float(deltas[layer][d]) > 0 for layer in ("Conv_1", "Conv_2") for d in ("delta_w", "delta_a"))
  assert float(deltas["Conv_3"]["delta_w"]) == 0.0 and "q_w_lower" not in variables["params"]["Conv_0"]
  assert {"loss", "pege/mu", "pege/rate"} <= set(metrics) and np.isfinite(float(metrics["loss"]))
  assert namespace["refreshed"] == {} and float(metrics["pege/rate"]) == pytest.approx(1.0)   # ramp done at 10 %
  # the NNX example continues from the same namespace
  exec(compile(block_with("nnx.bridge.ToNNX(QuantConv(16"), "README.md", "exec"), namespace)
  net = namespace["net"]
  assert float(net.conv.delta_a.get_value()) > 0 or float(net.conv.delta_w.get_value()) > 0   # refreshed in place, at batch 32
  assert np.isfinite(float(namespace["nnx_loss"](net, namespace["data"][0])))


def test_readme_quantize_example_runs():
  namespace = {}
  exec(compile(block_with("quantize_first_last=True, overrides"), "README.md", "exec"), namespace)
  logits = np.asarray(namespace["logits"])
  assert logits.shape == (8, 10) and np.isfinite(logits).all()
  assert "q_a_lower" in namespace["variables"]["params"]["Conv_0"]
  assert "q_a_lower" not in namespace["variables"]["params"]["Dense_0"]      # the override kept it full precision
