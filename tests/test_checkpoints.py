"""Checkpoints: round trip, last-N plus best retention, config guard, warm-start loading, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ewgs_jax import checkpoints, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_state(shift=0.0):
  params = {"w": jnp.arange(3.0) + shift}
  return {"params": params, "batch_stats": {"m": jnp.ones(2) * shift}, "opt_state": optax.adam(1e-3).init(params),
          "step": jnp.int32(int(shift))}


def test_round_trip_with_extra(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=2)
  state = toy_state(1.0)
  keeper.save(1, state, {"data": {"epoch": 0, "step": 1}, "history": {"x": [1, 2]}})
  keeper.wait_until_finished()
  replicated = parallel.replicated(parallel.make_mesh())
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          jax.eval_shape(lambda: state))
  restored, extra = keeper.restore_latest(abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(restored))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert extra == {"data": {"epoch": 0, "step": 1}, "history": {"x": [1, 2]}}
  keeper.close()
  assert checkpoints.CheckpointKeeper(str(tmp_path / "empty")).restore_latest(abstract) is None


def test_keeps_last_n_plus_best(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=2)
  for step, accuracy in enumerate([0.1, 0.9, 0.3, 0.4, 0.2], start=1):
    keeper.save(step, toy_state(step), {}, metrics={"test_accuracy": accuracy})
  keeper.save(6, toy_state(6), {})
  keeper.wait_until_finished()
  assert keeper.all_steps() == [2, 5, 6]   # best (0.9 at step 2) + the latest two
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "5", "6"]
  keeper.close()
  latest_only = checkpoints.CheckpointKeeper(str(tmp_path / "latest"), max_to_keep=2, keep_best=False)
  for step, accuracy in enumerate([0.1, 0.9, 0.3], start=1):
    latest_only.save(step, toy_state(step), {}, metrics={"test_accuracy": accuracy})
  latest_only.wait_until_finished()
  assert latest_only.all_steps() == [2, 3]
  latest_only.close()


def test_config_guard(tmp_path):
  config = {"model": "resnet20", "quant": {"bits": 2, "backward": "ewgs"}}
  checkpoints.save_or_check_config(str(tmp_path), config)
  checkpoints.save_or_check_config(str(tmp_path), config)   # same config: resume
  changed = {"model": "resnet20", "quant": {"bits": 4, "backward": "ewgs"}, "seed": 1}
  with pytest.raises(ValueError, match=r"different config \(quant\.bits: 2 -> 4; seed: '<absent>' -> 1\)"):
    checkpoints.save_or_check_config(str(tmp_path), changed)


def test_load_variables_from_another_run(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=1)
  keeper.save(3, toy_state(2.0), {})
  keeper.wait_until_finished()
  keeper.close()
  variables = checkpoints.load_variables(str(tmp_path))
  assert set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["params"]["w"], [2.0, 3.0, 4.0])
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    checkpoints.load_variables(str(tmp_path / "nothing"))


def test_no_checkpoint_is_an_error_naming_the_workdir(tmp_path):
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(FileNotFoundError, match="empty.*train that run first"):
    checkpoints.load_variables(str(tmp_path / "empty"))


# A toy training loop: w <- w / 2 + step, checkpointed on SIGTERM (the training loop's protocol).
TOY_LOOP = """
import json, sys, time
import jax, jax.numpy as jnp
from ewgs_jax import checkpoints

workdir, num_steps = sys.argv[1], int(sys.argv[2])
checkpoints.install_preemption_handler()
keeper = checkpoints.CheckpointKeeper(workdir, max_to_keep=2)
state = {"params": {"w": jnp.zeros(3)}, "step": jnp.int32(0)}
restored = keeper.restore_latest(jax.eval_shape(lambda: state))
start = 0 if restored is None else restored[1]["next_step"]
if restored is not None:
  state = restored[0]
update = jax.jit(lambda s: {"params": {"w": s["params"]["w"] / 2 + s["step"]}, "step": s["step"] + 1})
preempted = False
for step in range(start, num_steps):
  state = update(state)
  with open(workdir + "/progress", "a") as f:
    f.write(f"{step}\\n")
  time.sleep(0.05)
  if checkpoints.preemption_requested() or keeper.reached_preemption(step + 1):
    preempted = True
    break
keeper.save(int(state["step"]), state, {"next_step": int(state["step"])})
keeper.wait_until_finished()
keeper.close()
print(json.dumps({"start": start, "end": int(state["step"]), "w": state["params"]["w"].tolist(),
                  "preempted": preempted}))
"""


def run_toy_loop(workdir, num_steps):
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(TOY_LOOP), str(workdir), str(num_steps)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def communicate(process, timeout=180):
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path):
  process = run_toy_loop(tmp_path, 100000)
  progress = tmp_path / "progress"
  deadline = time.time() + 180
  while process.poll() is None and time.time() < deadline:
    if progress.exists() and len(progress.read_text().splitlines()) >= 5:
      break
    time.sleep(0.2)
  assert process.poll() is None, process.communicate()[1][-3000:]
  process.send_signal(signal.SIGTERM)
  first = communicate(process)
  stopped = first["end"]
  assert first["preempted"] and first["start"] == 0 and 5 <= stopped < 1000
  keeper = checkpoints.CheckpointKeeper(str(tmp_path))
  assert keeper.latest_step() == stopped
  keeper.close()

  second = communicate(run_toy_loop(tmp_path, stopped + 4))   # the same command resumes
  assert second == {"start": stopped, "end": stopped + 4, "w": second["w"], "preempted": False}
  w = np.zeros(3)
  for step in range(stopped + 4):   # the uninterrupted run
    w = w / 2 + step
  np.testing.assert_allclose(second["w"], w, rtol=1e-6)
