"""train.py as a user runs it: exit codes, one-line errors, the workdir lock, Ctrl-C and SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ewgs_jax import checkpoints, workdir as workdir_guard
from tests.training_configs import ROOT

LONG_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.training_configs import small_config

def get_config(arg=None):
  return small_config({{"num_train_steps": 100000, "num_epochs": 10000, "checkpoint_every_steps": 0}})
"""


def train_py(*args, **kwargs):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(process, condition, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None and not condition():
    time.sleep(0.2)
  assert process.poll() is None, process.communicate()[1][-3000:]
  assert condition(), "timed out"


def finish(process, timeout=180):
  try:
    return process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise


def trained_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return sum(1 for line in open(path) if '"train"' in line) if os.path.exists(path) else 0


def test_expected_errors_are_one_message_and_exit_1(tmp_path):
  bad = train_py("--config", "configs/quickstart.py:fp", "--workdir", str(tmp_path), "--config.quant.weight_bits=0")
  _, err = finish(bad)
  assert bad.returncode == 1 and err.strip() == (
      "error: config.quant.weight_bits=0 is invalid; valid choices: integers 1..16")
  missing = train_py("--config", "configs/quickstart.py:w2a2_ste", "--workdir", str(tmp_path / "w"),
                     f"--config.dataset=npz:{tmp_path}/none.npz")
  _, err = finish(missing)
  assert missing.returncode == 1 and len(err.strip().splitlines()) == 1 and "none.npz' does not exist" in err
  allocator = train_py("--config", "configs/quickstart.py:fp", "--workdir", str(tmp_path / "a"),
                       "--config.host_allocator=foo")
  _, err = finish(allocator)
  assert allocator.returncode == 2 and err.startswith("error: config.host_allocator: ") and len(err.splitlines()) == 1


def test_config_keys_are_listed_with_defaults_and_meanings():
  process = train_py("--config_keys")
  out, _ = finish(process)
  assert process.returncode == 0
  assert any(line.startswith("quant.rule = 'ewgs'") and "ste | ewgs | pege" in line for line in out.splitlines())
  help_text, _ = finish(train_py("--help"))
  assert "--config_keys" in help_text


def test_a_busy_workdir_is_refused_at_once(tmp_path):
  with workdir_guard.WorkdirLock(str(tmp_path)):
    process = train_py("--config", "configs/quickstart.py:w2a2_ste", "--workdir", str(tmp_path))
    _, err = finish(process)
  assert process.returncode == 1 and f"is in use by another run (pid {os.getpid()})" in err
  assert len(err.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "metrics.jsonl") and not os.path.exists(tmp_path / "config.json")


def test_ctrl_c_and_sigterm_save_and_exit_75_then_the_command_resumes(tmp_path):
  config = tmp_path / "long.py"
  config.write_text(textwrap.dedent(LONG_RUN.format(root=str(ROOT))))
  workdir = str(tmp_path / "run")
  command = ("--config", str(config), "--workdir", workdir)

  first = train_py(*command)
  wait_for(first, lambda: trained_steps(workdir) >= 2)
  first.send_signal(signal.SIGINT)
  _, err = finish(first)
  assert first.returncode == 75, err[-3000:]
  assert "Traceback" not in err and len(err.strip().splitlines()) <= 4, err
  stopped = checkpoints.committed_steps(workdir)
  assert stopped and f"stopped early: saved step {stopped[-1]}" in err

  second = train_py(*command)
  wait_for(second, lambda: trained_steps(workdir) >= stopped[-1] + 2)
  second.send_signal(signal.SIGTERM)
  _, err = finish(second)
  assert second.returncode == 75, err[-3000:]
  assert f"resumed from step {stopped[-1]} of" in err
  assert checkpoints.committed_steps(workdir)[-1] > stopped[-1]


def test_an_error_exit_does_not_wait_for_a_library_thread_that_never_ends():
  # orbax 0.11 leaves such threads behind a save that failed on a full disk; Python's exit joins them
  stuck = ("import threading, sys\n"
           "from ewgs_jax import train\n"
           "train.EXIT_GRACE_S = 1\n"
           "threading.Thread(target=threading.Event().wait).start()\n"
           "train._fail('the disk is full', 1)\n")
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  started = time.time()
  process = subprocess.Popen([sys.executable, "-c", stuck], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _, err = finish(process, timeout=60)
  assert process.returncode == 1 and err.strip() == "error: the disk is full"
  assert time.time() - started < 30


# train.py with a disk that fills up after the first checkpoint (orbax's JSON writer fails as on ENOSPC).
FULL_DISK = """
import sys
sys.path.insert(0, {root!r})
from orbax.checkpoint._src.handlers import json_checkpoint_handler
real, calls = json_checkpoint_handler.JsonCheckpointHandler._save_fn, {{"n": 0}}

def disk_full_after_the_first_save(self, *args, **kwargs):
  calls["n"] += 1
  if calls["n"] > 1:
    raise OSError(28, "No space left on device")
  return real(self, *args, **kwargs)

json_checkpoint_handler.JsonCheckpointHandler._save_fn = disk_full_after_the_first_save
sys.argv[0] = "train.py"
from ewgs_jax.train import run
run()
"""


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  config = tmp_path / "short.py"
  config.write_text(textwrap.dedent(LONG_RUN.format(root=str(ROOT))).replace('"checkpoint_every_steps": 0',
                                                                             '"checkpoint_every_steps": 2'))
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  process = subprocess.Popen([sys.executable, "-c", FULL_DISK.format(root=str(ROOT)), "--config", str(config),
                              "--workdir", str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _, err = finish(process)
  assert process.returncode == 1 and err.strip().splitlines() == [
      f"error: saving a checkpoint in {workdir}/checkpoints failed (No space left on device); stopped. The last good "
      "checkpoint is step 2: free some space and re-run the same command to resume"], err[-3000:]
  assert checkpoints.committed_steps(str(workdir)) == [2]


def test_a_missing_or_broken_config_file_is_one_line(tmp_path):
  missing = train_py("--config", str(tmp_path / "nothing.py"), "--workdir", str(tmp_path / "w"))
  _, err = finish(missing)
  assert missing.returncode == 2 and err.strip().splitlines() == [
      f"error: --config {tmp_path}/nothing.py: no such file, and no shipped config of that name; give a config file "
      "(PATH.py[:VARIANT]) or a shipped config (cifar10_resnet20, fashion_mnist_resnet20, imagenet_resnet18, "
      "quickstart)[:VARIANT]"]
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  broken = train_py("--config", str(tmp_path / "broken.py"), "--workdir", str(tmp_path / "w"))
  _, err = finish(broken)
  assert broken.returncode == 2 and err.strip().splitlines() == [
      f"error: --config {tmp_path}/broken.py: the file does not parse (SyntaxError: invalid syntax, "
      f"{tmp_path}/broken.py line 1)"]


def test_a_key_missing_from_a_dict_names_what_the_dict_holds_and_the_fix(tmp_path):
  process = train_py("--config", "quickstart:w2a2_pege", "--workdir", str(tmp_path), "--config.model_kwargs.width=4")
  _, err = finish(process)
  assert process.returncode == 2 and err.strip().splitlines() == [
      "error: config.model_kwargs has no key 'width' (it holds: stage_widths); the command line cannot add a key to a "
      "dict, so set the whole dict: --config.model_kwargs=\"{'stage_widths': (16, 32), 'width': 4}\" (keys and "
      "meanings: ewgs-jax-train --config_keys)"]


def test_every_pege_schedule_keyword_is_a_key_of_its_own(tmp_path):
  """--config.pege.mu_kwargs.k=1 used to fail with AttributeError: 'k' (the dict had no such key)."""
  process = train_py("--config", "quickstart:w2a2_pege", "--workdir", str(tmp_path), "--config.pege.mu_kwargs.k=1")
  _, err = finish(process)
  assert process.returncode == 1 and err.strip().splitlines() == [
      "error: config.pege.mu_kwargs.k sets the per-step pace, which mu_ramp=0.1 replaces; drop it, or set "
      "--config.pege.mu_ramp=0 to use it"]


def test_a_broken_config_json_names_the_file_and_the_fix(tmp_path):
  (tmp_path / "config.json").write_text("{")
  process = train_py("--config", "quickstart:w2a2_ste", "--workdir", str(tmp_path))
  _, err = finish(process)
  assert process.returncode == 1 and len(err.strip().splitlines()) == 1, err
  assert f"error: {tmp_path}/config.json is not readable JSON" in err and "delete it to resume" in err


FILL_THE_DISK = """
set -eu
mkdir -p "$1/disk" && mount -t tmpfs -o size=20m tmpfs "$1/disk"
"$2" train.py --config "$3" --workdir "$1/disk/run" 2> "$1/stderr" &
for i in $(seq 1 900); do ls "$1/disk/run/checkpoints" 2>/dev/null | grep -qx '[0-9]*' && break; sleep 0.2; done
dd if=/dev/zero of="$1/disk/fill" bs=1M count=64 2>/dev/null || true
set +e; wait $!; echo "rc=$?"; ls "$1/disk/run/checkpoints"
"""


@pytest.mark.slow
def test_a_really_full_disk_is_one_line(tmp_path):
  # A tmpfs of 20 MiB in a private mount namespace, filled up while the run trains.
  if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
    pytest.skip("needs unprivileged user and mount namespaces (unshare -rm)")
  config = tmp_path / "short.py"
  config.write_text(textwrap.dedent(LONG_RUN.format(root=str(ROOT))).replace('"checkpoint_every_steps": 0',
                                                                             '"checkpoint_every_steps": 2'))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(["unshare", "-rm", "bash", "-c", FILL_THE_DISK, "-", str(tmp_path), sys.executable, str(config)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  err = (tmp_path / "stderr").read_text()
  assert "rc=1" in out.stdout, out.stdout + out.stderr + err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: saving a checkpoint in {tmp_path}/disk/run/checkpoints failed (No space left on device); stopped. The "
      "last good checkpoint is step ")
  last = int(lines[0].split("checkpoint is step ")[1].split(":")[0])
  assert str(last) in out.stdout.split()   # the checkpoint it names is there, committed


def test_a_full_disk_outside_checkpoints_names_the_workdir(tmp_path):
  from ewgs_jax import train
  message = train._error_message(OSError(28, "No space left on device"), str(tmp_path))
  assert message == (f"no space left on device while writing in {tmp_path} ([Errno 28] No space left on device); "
                     "stopped. The last good checkpoint is none (nothing was saved yet): free some space and re-run "
                     "the same command to resume")


SHORT_FP_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.training_configs import small_config

def get_config(arg=None):
  return small_config({{"num_train_steps": 4, "quant.enabled": False}}, variant="fp")
"""


def test_the_advice_after_a_divergence_is_what_the_workdir_accepts(tmp_path):
  config = tmp_path / "fp.py"
  config.write_text(textwrap.dedent(SHORT_FP_RUN.format(root=str(ROOT))))
  workdir = tmp_path / "run"
  diverging = train_py("--config", str(config), "--workdir", str(workdir), "--config.learning_rate=1e6")
  _, err = finish(diverging)
  assert diverging.returncode == 1 and len(err.strip().splitlines()) == 1, err[-3000:]
  assert err.strip().endswith(f"stopping. No checkpoint was saved in {workdir}: lower the learning rate, or check the "
                              "data, and re-run there (a workdir without a checkpoint takes a changed config and "
                              "starts the run again)")
  corrected = train_py("--config", str(config), "--workdir", str(workdir), "--config.learning_rate=1e-3")
  _, err = finish(corrected)
  assert corrected.returncode == 0, err[-3000:]
  assert "learning_rate: 1000000.0 -> 0.001" in err and (workdir / "superseded" / "1" / "metrics.jsonl").exists()
  assert checkpoints.committed_steps(str(workdir))[-1] == 4


def test_an_abort_says_how_many_ctrl_c_presses_it_saw(tmp_path, monkeypatch):
  from ewgs_jax import train
  monkeypatch.setattr(workdir_guard, "ctrl_c_presses", lambda: 0)   # Ctrl-C before the handler was installed
  assert train._aborted_message(str(tmp_path)) == (
      f"aborted (Ctrl-C), without saving; the last checkpoint in {tmp_path} is none (nothing was saved yet): re-run "
      "the same command to resume")
  monkeypatch.setattr(workdir_guard, "ctrl_c_presses", lambda: 2)
  os.makedirs(tmp_path / "checkpoints" / "8" / "state")
  assert train._aborted_message(str(tmp_path)).startswith(
      f"aborted (Ctrl-C pressed twice), without saving; the last checkpoint in {tmp_path} is step 8")
