"""Checkpoints: round trip, last-N plus best retention, warm-start copy and loading, failed saves, SIGTERM."""

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


def test_warm_start_copy_round_trip(tmp_path):
  variables = {"params": {"conv": {"kernel": np.ones((2, 2), np.float32)}},
               "batch_stats": {"bn": {"mean": np.zeros(2)}}}
  assert checkpoints.load_warm_start(str(tmp_path)) is None
  checkpoints.save_warm_start(str(tmp_path), variables, source="runs/fp")
  jax.tree.map(np.testing.assert_array_equal, checkpoints.load_warm_start(str(tmp_path)), variables)


def test_a_broken_warm_start_copy_is_named_with_its_fix(tmp_path):
  (tmp_path / checkpoints.WARM_START_FILE).write_bytes(b"PK\x03\x04 torn")
  with pytest.raises(ValueError, match=rf"warm-start copy {tmp_path}/warm_start.npz is unreadable .*delete it, and "
                                       r"the run copies its warm start again from config.init_from"):
    checkpoints.load_warm_start(str(tmp_path))


def test_a_full_disk_is_one_line_naming_the_directory_and_the_last_good_checkpoint(tmp_path, monkeypatch):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=2)
  keeper.save(1, toy_state(1.0), {})
  keeper.wait_until_finished()

  def disk_full(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 22591 bytes to '
                     "file 7: No space left on device [os_error_code='28']\nsecond line")

  monkeypatch.setattr(keeper.manager, "save", disk_full)
  with pytest.raises(checkpoints.CheckpointSaveError) as failure:
    keeper.save(2, toy_state(2.0), {})
  assert str(failure.value) == (f"saving a checkpoint in {tmp_path}/checkpoints failed (No space left on device); "
                                "stopped. The last good checkpoint is step 1: free some space and re-run the same "
                                "command to resume")
  keeper.close()


def test_names_moved_to_workdir_are_still_reachable_from_checkpoints():
  from ewgs_jax import workdir
  for name in ("WorkdirLock", "WorkdirBusyError", "save_or_check_config", "install_preemption_handler",
               "uninstall_preemption_handler", "preemption_requested", "stop_requested"):
    assert getattr(checkpoints, name) is getattr(workdir, name)
  with pytest.raises(AttributeError, match="no attribute 'nothing'"):
    checkpoints.nothing  # noqa: B018


def test_load_variables_saved_on_two_devices_into_one(tmp_path):
  script = textwrap.dedent("""
      import sys, jax, jax.numpy as jnp, optax
      from ewgs_jax import checkpoints, parallel
      assert jax.device_count() == 2
      params = {"w": jnp.arange(4.0)}
      state = jax.device_put({"params": params, "batch_stats": {"m": jnp.ones(2)},
                              "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(3)},
                             parallel.replicated(parallel.make_mesh()))
      keeper = checkpoints.CheckpointKeeper(sys.argv[1])
      keeper.save(3, state, {})
      keeper.wait_until_finished()
      keeper.close()
  """)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=180)
  assert jax.device_count() == 1
  variables = checkpoints.load_variables(str(tmp_path))
  np.testing.assert_array_equal(variables["params"]["w"], [0.0, 1.0, 2.0, 3.0])
  np.testing.assert_array_equal(variables["batch_stats"]["m"], [1.0, 1.0])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    keeper.save(step, toy_state(float(step)), {"next": step})
  keeper.wait_until_finished()
  keeper.close()
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file() and path.name != "commit_success.txt":
      path.write_bytes(b"garbage")
  abstract = jax.eval_shape(lambda: toy_state(0.0))
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=3)
  with caplog.at_level("WARNING"):
    state, extra = keeper.restore_latest(abstract)
  assert extra == {"next": 1} and int(state["step"]) == 1
  assert "checkpoints/2 cannot be read" in caplog.text
  assert keeper.all_steps() == [1] and (tmp_path / "corrupt_checkpoints" / "2").is_dir()
  keeper.save(2, toy_state(5.0), {"next": 2})   # the step can be saved again
  keeper.wait_until_finished()
  keeper.close()


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
from ewgs_jax import checkpoints, workdir as guard

workdir, num_steps = sys.argv[1], int(sys.argv[2])
guard.install_preemption_handler()
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
  if guard.preemption_requested() or keeper.reached_preemption(step + 1):
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


def test_loading_a_warm_start_logs_no_orbax_warnings(tmp_path, caplog):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=1)
  keeper.save(1, toy_state(1.0), {})
  keeper.wait_until_finished()
  keeper.close()
  with caplog.at_level("INFO"):
    checkpoints.load_variables(str(tmp_path))
  assert not [r for r in caplog.records if r.levelno >= 30], [r.getMessage() for r in caplog.records]


def test_when_no_checkpoint_restores_nothing_is_moved_and_one_line_says_why(tmp_path):
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    keeper.save(step, toy_state(float(step)), {"next": step})
  keeper.wait_until_finished()
  keeper.close()
  other_model = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "other": jnp.zeros((7,))})
  keeper = checkpoints.CheckpointKeeper(str(tmp_path), max_to_keep=3)
  with pytest.raises(checkpoints.CheckpointRestoreError) as error:
    keeper.restore_latest(other_model)
  message = str(error.value)
  assert message.startswith(f"no checkpoint in {tmp_path / 'checkpoints'} can be restored (step 2: ")
  assert "nothing was moved" in message and "\n" not in message
  assert keeper.all_steps() == [1, 2] and not (tmp_path / "corrupt_checkpoints").exists()
  keeper.close()
