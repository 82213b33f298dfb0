"""The workdir guard: the lock, the config guard (and the advice that matches it), stopping on a signal."""

import json
import os
import signal
import subprocess
import sys

import pytest

from ewgs_jax import checkpoints, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit_checkpoint(path, step):
  """A committed checkpoint as far as the guard can tell (orbax renames a finished save to its step)."""
  os.makedirs(path / "checkpoints" / str(step) / "state")


def test_config_guard_refuses_a_changed_config_over_checkpoints(tmp_path):
  config = {"model": "resnet20", "quant": {"bits": 2, "backward": "ewgs"}, "init_from": "a"}
  workdir.save_or_check_config(str(tmp_path), config)
  workdir.save_or_check_config(str(tmp_path), config)   # same config: resume
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  commit_checkpoint(tmp_path, 3)
  changed = {"model": "resnet20", "quant": {"bits": 4, "backward": "ewgs"}, "seed": 1, "init_from": "a"}
  with pytest.raises(ValueError, match=r"different config \(quant\.bits: 2 -> 4; seed: '<absent>' -> 1\) and "
                                       r"checkpoints trained with it \(last: step 3\); resume it with its original "
                                       r"config, or use a new --workdir"):
    workdir.save_or_check_config(str(tmp_path), changed)
  moved = {**config, "init_from": "b"}
  with pytest.raises(ValueError, match=r"init_from: 'a' -> 'b'"):
    workdir.save_or_check_config(str(tmp_path), moved)
  workdir.save_or_check_config(str(tmp_path), moved, ignore=("init_from",))   # allowed when asked
  assert json.loads((tmp_path / "config.json").read_text()) == config


def test_a_run_without_a_checkpoint_takes_a_corrected_config(tmp_path, caplog):
  # A run that diverged (or read bad data) before its first checkpoint: the advice it printed is to
  # change the config and re-run, and the guard accepts exactly that.
  diverged = {"learning_rate": 0.5, "seed": 0}
  workdir.save_or_check_config(str(tmp_path), diverged)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1e9}\n')
  (tmp_path / "events.out.tfevents.1.host.2").write_bytes(b"x")
  (tmp_path / checkpoints.WARM_START_FILE).write_bytes(b"from the old init_from")
  os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1")   # an unfinished save is no checkpoint
  assert workdir.config_change_advice(str(tmp_path), "lower the learning rate") == (
      f"No checkpoint was saved in {tmp_path}: lower the learning rate, and re-run there (a workdir without a "
      "checkpoint takes a changed config and starts the run again)")
  with caplog.at_level("WARNING"):
    workdir.save_or_check_config(str(tmp_path), {"learning_rate": 0.05, "seed": 0})
  assert "learning_rate: 0.5 -> 0.05" in caplog.text and "starting it again" in caplog.text
  assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.05
  attempt = tmp_path / "superseded" / "1"   # the failed attempt's files, kept apart
  assert sorted(os.listdir(attempt)) == ["config.json", "events.out.tfevents.1.host.2", "metrics.jsonl",
                                         "warm_start.npz"]
  assert json.loads((attempt / "config.json").read_text()) == diverged
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / checkpoints.WARM_START_FILE).exists()
  # With a checkpoint the advice changes, and so does the guard.
  commit_checkpoint(tmp_path, 6)
  assert workdir.config_change_advice(str(tmp_path), "lower the learning rate") == (
      f"The last good checkpoint (step 6) in {tmp_path} is kept, and resumes only with this run's config: lower the "
      "learning rate in a new --workdir")
  with pytest.raises(ValueError, match="use a new --workdir"):
    workdir.save_or_check_config(str(tmp_path), {"learning_rate": 0.01, "seed": 0})


def test_config_of_a_run_that_never_trained_is_replaced(tmp_path):
  workdir.save_or_check_config(str(tmp_path), {"data_dir": None, "seed": 0})
  (tmp_path / checkpoints.WARM_START_FILE).write_bytes(b"stale")
  workdir.save_or_check_config(str(tmp_path), {"data_dir": "/data", "seed": 0})
  assert json.loads((tmp_path / "config.json").read_text())["data_dir"] == "/data"
  assert not (tmp_path / checkpoints.WARM_START_FILE).exists() and not (tmp_path / "superseded").exists()


def test_a_broken_config_json_is_named_with_its_fix(tmp_path):
  (tmp_path / "config.json").write_text('{"seed": 0, "lear')
  with pytest.raises(ValueError, match=rf"{tmp_path}/config.json is not readable JSON \(JSONDecodeError: .*\); it "
                                       r"records the config of the run in .*Restore it, or delete it to resume with "
                                       r"this command's config .*or use a new --workdir"):
    workdir.save_or_check_config(str(tmp_path), {"seed": 0})


def test_workdir_lock_refuses_a_second_holder(tmp_path):
  with workdir.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir.WorkdirBusyError, match=rf"in use by another run \(pid {os.getpid()}\)"):
      workdir.WorkdirLock(str(tmp_path)).acquire()
  with workdir.WorkdirLock(str(tmp_path)):   # released: free again
    pass


STOP_POLL = """
import os, signal
from ewgs_jax import workdir
workdir.install_preemption_handler()
before = workdir.stop_requested()
os.kill(os.getpid(), signal.SIGTERM)
print(before, workdir.stop_requested(), workdir.preemption_requested(), workdir.ctrl_c_presses())
"""


def test_stop_requested_follows_sigterm_in_one_process():
  out = subprocess.run([sys.executable, "-c", STOP_POLL], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "True", "True", "0"]


def test_ctrl_c_is_counted_and_a_second_one_aborts(monkeypatch):
  monkeypatch.setattr(signal, "signal", lambda *args: None)   # the handler would restore the default
  workdir._STOP.update(requested=False, agreed=False, ctrl_c=0)
  workdir._on_sigint(signal.SIGINT, None)
  assert workdir.preemption_requested() and workdir.ctrl_c_presses() == 1
  with pytest.raises(KeyboardInterrupt):
    workdir._on_sigint(signal.SIGINT, None)
  assert workdir.ctrl_c_presses() == 2
  workdir._STOP.update(requested=False, agreed=False, ctrl_c=0)
