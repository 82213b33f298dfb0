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
SHARDED_RUN = {"num_train_steps": 4, "quant.enabled": False, "ewgs.mode": "off"}


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
  result = finish(run_in_subprocess(tmp_path_factory.mktemp("one"), SHARDED_RUN))
  return result["losses"]


def test_eight_devices_match_one_device(tmp_path, single_device_losses):
  eight = finish(run_in_subprocess(tmp_path / "eight", SHARDED_RUN,
                                   {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
  np.testing.assert_allclose(eight["losses"], single_device_losses, rtol=1e-4)
  bad = run_in_subprocess(tmp_path / "bad", {"batch_size": 60},
                          {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
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
from ewgs_jax import workdir
jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
workdir.install_preemption_handler()
print(json.dumps({"python_handler": signal.getsignal(signal.SIGTERM) is workdir._on_sigterm}), flush=True)
step = 0
while step < 3000:
  step += 1
  time.sleep(0.02)
  if workdir.preemption_requested() or multihost_utils.reached_preemption_sync_point(step):
    break
workdir.uninstall_preemption_handler()
print(json.dumps({"stopped_at": step, "own_flag": workdir.preemption_requested()}), flush=True)
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
  # SIGINT is compared with what the process started with: a shell's background job inherits it ignored.
  code = ("import signal; from ewgs_jax import workdir; before = signal.getsignal(signal.SIGINT);"
          "workdir.install_preemption_handler();"
          "assert signal.getsignal(signal.SIGTERM) is workdir._on_sigterm, 'SIGTERM handler not installed';"
          "assert signal.getsignal(signal.SIGINT) is workdir._on_sigint, 'SIGINT handler not installed';"
          "workdir.uninstall_preemption_handler();"
          "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, 'SIGTERM not restored';"
          "assert signal.getsignal(signal.SIGINT) == before, 'SIGINT not restored'; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# stop_requested() polled inside long work between steps (the delta refresh): a collective that gives
# every process the same answer at the same call, whichever process got the signal.
STOP_POLL_WORKER = """
import json, sys, time
from ewgs_jax import parallel, workdir
parallel.maybe_initialize_distributed(enabled=True, coordinator_address="localhost:" + sys.argv[1], num_processes=2,
                                      process_id=int(sys.argv[2]))
workdir.install_preemption_handler()
print(json.dumps({"ready": True}), flush=True)
call = 0
while call < 3000:
  call += 1
  time.sleep(0.02)
  if workdir.stop_requested():
    break
print(json.dumps({"stopped_at": call, "flag": workdir.preemption_requested()}), flush=True)
"""


def first_json_line(process):
  """The first line of ``process``'s stdout that is JSON (gloo prints its own lines there)."""
  for line in process.stdout:
    if line.startswith("{"):
      return json.loads(line)
  return None


def test_stop_requested_agrees_on_every_process():
  port = str(free_port())
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([sys.executable, "-c", STOP_POLL_WORKER, port, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    ready = [first_json_line(p) for p in procs]
    assert ready == [{"ready": True}] * 2, procs[0].stderr.read()[-3000:] if ready[0] is None else ready
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)      # JAX's preemption service hears it on process 1 only
    results = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  stops = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
  assert stops[0] == stops[1] and stops[0]["stopped_at"] < 3000 and stops[0]["flag"], stops


# train.py with several processes, as users start it: one command per process.
LONG_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.training_configs import small_config

def get_config(arg=None):
  return small_config({{"num_train_steps": 100000, "num_epochs": 10000, "checkpoint_every_steps": 2}})
"""


def start_processes(config, workdir, port, heartbeat_s=10):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  return [subprocess.Popen(
      [sys.executable, "train.py", "--config", str(config), "--workdir", str(workdir),
       "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
       f"--config.distributed.heartbeat_timeout_seconds={heartbeat_s}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def wait_for_a_checkpoint(procs, workdir, after=-1, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    steps = checkpoints.committed_steps(str(workdir))
    if steps and steps[-1] > after:
      return steps[-1]
    time.sleep(0.3)
  for p in procs:
    p.kill()
  raise AssertionError(f"no checkpoint after step {after}: {[p.communicate()[1][-2000:] for p in procs]}")


def worker_of(supervisor):
  """The training process that a train.py with several processes starts (ewgs_jax.supervisor)."""
  deadline = time.time() + 60
  while time.time() < deadline:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(supervisor.pid)], capture_output=True,
                              text=True).stdout.split()
    if children:
      return int(children[0])
    time.sleep(0.1)
  raise AssertionError("the supervised worker did not start")


def finish_all(procs, timeout=120):
  start, results = time.time(), []
  try:
    for p in procs:
      out, err = p.communicate(timeout=max(1, timeout - (time.time() - start)))
      results.append((p.returncode, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results, time.time() - start


def error_lines(err):
  """The lines a process wrote on stderr, with no native dump or traceback among them."""
  lines = err.strip().splitlines()
  assert not [l for l in lines if "Traceback" in l or "Check failure" in l or l.lstrip().startswith("@ 0x")], err
  return lines


def long_run(tmp_path):
  config = tmp_path / "long.py"
  config.write_text(LONG_RUN.format(root=str(ROOT)))
  return config, tmp_path / "run"


def test_ctrl_c_on_one_process_stops_every_process_at_one_step(tmp_path):
  config, workdir = long_run(tmp_path)
  procs = start_processes(config, workdir, free_port())
  wait_for_a_checkpoint(procs, workdir)
  procs[0].send_signal(signal.SIGINT)
  [(rc0, err0), (rc1, err1)], seconds = finish_all(procs)
  assert (rc0, rc1) == (75, 75) and seconds < 60, err0[-3000:] + err1[-3000:]
  stopped = checkpoints.committed_steps(str(workdir))[-1]
  assert error_lines(err0) == [
      "Ctrl-C (process 0 of 2): every process will save a checkpoint at the same step and stop (press Ctrl-C again "
      "to abort at once, without saving)",
      f"stopped early: saved step {stopped} of 100000 in {workdir}; re-run the same command to resume"]
  assert error_lines(err1) == []


def test_a_killed_process_ends_the_others_with_one_line(tmp_path):
  # JAX's coordination service declares process 1 lost after its heartbeat timeout and aborts process
  # 0 natively; train.py (its supervisor) turns that into one line and the resumable exit code.
  config, workdir = long_run(tmp_path)
  procs = start_processes(config, workdir, free_port())
  wait_for_a_checkpoint(procs, workdir)
  os.kill(worker_of(procs[1]), signal.SIGKILL)
  [(rc0, err0), (rc1, err1)], seconds = finish_all(procs)
  last = checkpoints.committed_steps(str(workdir))[-1]
  assert rc0 == 75 and seconds < 60, err0[-3000:]
  assert error_lines(err0) == [
      f"error: lost process 1 of 2: it stopped answering (killed, crashed or unreachable), so process 0 stopped too. "
      f"The last checkpoint in {workdir} is step {last}: re-run every process's command to resume "
      f"(details: {workdir}/logs/native.0.log)"]
  assert rc1 == 1 and error_lines(err1) == [
      f"error: the training of process 1 died of SIGKILL (out of memory, or killed by someone). The last checkpoint "
      f"in {workdir} is step {last}; details: {workdir}/logs/native.1.log"]


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_and_the_others_stop_on_the_lost_coordinator(tmp_path):
  config, workdir = long_run(tmp_path)
  procs = start_processes(config, workdir, free_port())
  wait_for_a_checkpoint(procs, workdir)
  procs[0].send_signal(signal.SIGINT)
  time.sleep(0.3)
  procs[0].send_signal(signal.SIGINT)
  [(rc0, err0), (rc1, err1)], seconds = finish_all(procs)
  assert (rc0, rc1) == (130, 75) and seconds < 60, err0[-3000:] + err1[-3000:]
  assert error_lines(err0) == [
      "Ctrl-C (process 0 of 2): every process will save a checkpoint at the same step and stop (press Ctrl-C again "
      "to abort at once, without saving)",
      "aborted (Ctrl-C pressed twice, process 0 of 2): stopped at once, without saving; the other processes stop "
      "too. Re-run every process's command to resume from the last saved checkpoint"]
  assert len(error_lines(err1)) == 1 and error_lines(err1)[0].startswith(
      "error: lost process 0 of 2 (the coordinator): it stopped answering")
