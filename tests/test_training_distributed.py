"""Training across devices and processes, and preemption by SIGTERM (each run in a fresh process)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ewgs_jax import checkpoints
from tests.training_configs import ROOT


def run_in_subprocess(workdir, overrides, env_extra=None, timeout=300):
  # CPU devices (fake ones via XLA_FLAGS): on a GPU host two processes would share the one GPU,
  # which NCCL refuses ("Duplicate GPU detected"), and the device counts here are the CPU's.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  return subprocess.Popen([sys.executable, "tests/run_training.py", str(workdir), json.dumps(overrides)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=600):
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


# Device-count equality is checked on the full-precision network: with quantizers, a gradient
# all-reduced in a different order changes a latent value by ~1e-7, which can flip one rounding
# decision a few steps later and change the loss by far more than float tolerance.
SHARDED_RUN = {"num_train_steps": 4, "quant.enabled": False, "delta.mode": "off"}


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  result = finish(run_in_subprocess(tmp_path_factory.mktemp("one"), SHARDED_RUN))
  return result["losses"]


def test_eight_devices_match_one_device(tmp_path, single_device_losses):
  eight = finish(run_in_subprocess(tmp_path / "eight", SHARDED_RUN,
                                   {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
  np.testing.assert_allclose(eight["losses"], single_device_losses, rtol=1e-4)
  bad = run_in_subprocess(tmp_path / "bad", {"batch_size": 60}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  _, err = bad.communicate(timeout=300)
  assert bad.returncode != 0 and "batch size 60 is not divisible by the device count 8" in err


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, single_device_losses):
  port = free_port()
  procs = [run_in_subprocess(tmp_path / "two", {
      **SHARDED_RUN, "distributed.enabled": True, "distributed.coordinator_address": f"localhost:{port}",
      "distributed.num_processes": 2, "distributed.process_id": i}) for i in range(2)]
  results = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  losses = json.loads(results[0][0].strip().splitlines()[-1])["losses"]
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-4)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "sigterm"
  overrides = {"num_train_steps": 100000, "num_epochs": 1000, "log_every_steps": 1}
  process = run_in_subprocess(workdir, overrides)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if (workdir / "metrics.jsonl").exists() and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-3000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["preempted"] and 3 <= summary["train_steps"] < 100
  keeper = checkpoints.CheckpointKeeper(str(workdir))
  assert keeper.latest_step() == summary["train_steps"]
  keeper.close()


# Two processes polling JAX's preemption sync point at every step, as the training loop does through
# CheckpointKeeper.reached_preemption; SIGTERM goes to one of them only.
PREEMPTION_WORKER = """
import json, signal, sys, time
import jax
from jax.experimental import multihost_utils
from ewgs_jax import checkpoints
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
checkpoints.install_preemption_handler()
print(json.dumps({"python_handler": signal.getsignal(signal.SIGTERM) is checkpoints._on_sigterm}), flush=True)
step = 0
while step < 3000:
  step += 1
  time.sleep(0.02)
  if checkpoints.preemption_requested() or multihost_utils.reached_preemption_sync_point(step):
    break
checkpoints.uninstall_preemption_handler()
print(json.dumps({"stopped_at": step, "own_flag": checkpoints.preemption_requested()}), flush=True)
"""


def test_sigterm_to_one_of_several_processes_stops_all_at_the_same_step():
  port = str(free_port())
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([sys.executable, "-c", PREEMPTION_WORKER, port, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    ready = [json.loads(p.stdout.readline() or "null") for p in procs]
    assert ready == [{"python_handler": False}] * 2, procs[0].stderr.read()[-3000:] if ready[0] is None else ready
    time.sleep(1.0)
    procs[0].send_signal(signal.SIGTERM)      # one host is preempted
    results = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  stops = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
  # JAX's service heard the signal (no Python handler took it) and both stopped at one agreed step,
  # long before the end of the loop; with a per-process flag the other process would run to step 3000.
  assert stops[0]["stopped_at"] == stops[1]["stopped_at"] < 3000
  assert not stops[0]["own_flag"] and not stops[1]["own_flag"]


def test_one_process_keeps_its_own_sigterm_handler():
  code = ("import signal; from ewgs_jax import checkpoints; checkpoints.install_preemption_handler();"
          "assert signal.getsignal(signal.SIGTERM) is checkpoints._on_sigterm;"
          "checkpoints.uninstall_preemption_handler(); assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL;"
          "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
