"""train.py as a user runs it: exit codes, one-line errors, the workdir lock, Ctrl-C and SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ewgs_jax import checkpoints
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


def test_config_keys_are_listed_with_defaults_and_meanings():
  process = train_py("--config_keys")
  out, _ = finish(process)
  assert process.returncode == 0
  assert any(line.startswith("quant.rule = 'ewgs'") and "ste | ewgs | pege" in line for line in out.splitlines())
  help_text, _ = finish(train_py("--help"))
  assert "--config_keys" in help_text


def test_a_busy_workdir_is_refused_at_once(tmp_path):
  with checkpoints.WorkdirLock(str(tmp_path)):
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
