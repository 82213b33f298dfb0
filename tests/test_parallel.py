"""Mesh and sharding helpers on 8 fake CPU devices, and on two real processes on localhost.

Each check runs in a fresh Python process, so the device count (and ``jax.distributed``) of the
main pytest process is untouched. A generous timeout turns a hang (e.g. a lost rendezvous) into a
failure instead of blocking the suite.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def run_python(code, *args, devices=1):
  """Starts ``python -c code args`` with ``devices`` CPU devices."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
  try:
    out, err = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    out, err = process.communicate()
    raise AssertionError(f"subprocess hung for {TIMEOUT_S} s; stderr tail:\n{err[-3000:]}")
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


EIGHT_DEVICES = """
import json
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from ewgs_jax import parallel

assert jax.device_count() == 8, jax.devices()
mesh = parallel.make_mesh()
assert mesh.axis_names == ("data",) and mesh.devices.size == 8
rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 4, 3)).astype(np.float32)
y = rng.normal(size=(16,)).astype(np.float32)

# shard_batch: device d of the mesh holds rows [2d, 2d + 2) (one process owns the whole batch).
batch = parallel.shard_batch({"x": x, "y": y}, mesh)
assert batch["x"].shape == x.shape and batch["x"].sharding == data
for d, device in enumerate(mesh.devices.flat):
  (shard,) = [s for s in batch["x"].addressable_shards if s.device == device]
  assert shard.index[0] == slice(2 * d, 2 * d + 2), shard.index
  np.testing.assert_array_equal(np.asarray(shard.data), x[2 * d:2 * d + 2])

# A jitted reduction over the sharded batch equals the 1-device result.
def weighted_mean(w, b):
  return jnp.mean(b["x"].sum(-1) @ w + b["y"])
w = parallel.replicate(np.linspace(-1, 1, 4).astype(np.float32), mesh)
assert w.sharding == rep
sharded = jax.jit(weighted_mean, in_shardings=(rep, data), out_shardings=rep)(w, batch)
single = jax.jit(weighted_mean)(jax.device_put(np.asarray(w), jax.devices()[0]),
                                jax.device_put({"x": x, "y": y}, jax.devices()[0]))
np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6)
np.testing.assert_allclose(np.asarray(sharded), np.mean(x.sum(-1) @ np.asarray(w) + y), rtol=1e-5)

# BatchNorm with no axis_name under jit on a P('data') batch normalises over the global batch.
bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
images = (rng.normal(size=(16, 3)) * np.arange(1, 4) + np.arange(3)).astype(np.float32)
variables = bn.init(jax.random.key(0), images)
apply = lambda v, b: bn.apply(v, b, mutable=["batch_stats"])
out_s, upd_s = jax.jit(apply, in_shardings=(rep, data))(parallel.replicate(variables, mesh),
                                                        parallel.shard_batch({"i": images}, mesh)["i"])
out_1, upd_1 = jax.jit(apply)(variables, images)
np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_1), rtol=1e-5, atol=1e-6)
jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5), upd_s, upd_1)
np.testing.assert_allclose(np.asarray(upd_s["batch_stats"]["mean"]), 0.5 * images.mean(0), rtol=1e-5)
# ... which differs from per-device statistics (2 rows each), so the check above can fail.
assert not np.allclose(np.asarray(out_1[:2]), np.asarray(bn.apply(variables, images[:2], mutable=["batch_stats"])[0]))

# to_host and the divisibility check.
host = parallel.to_host({"w": w, "x": batch["x"]})
assert isinstance(host["x"], np.ndarray)
np.testing.assert_array_equal(host["x"], x)
parallel.check_batch_divisible(16, mesh)
try:
  parallel.check_batch_divisible(60, mesh)
  raise AssertionError("no error for batch 60 on 8 devices")
except ValueError as e:
  message = str(e)
assert "batch size 60 is not divisible by the device count 8" in message, message
assert parallel.make_mesh(4).devices.size == 4
print(json.dumps({"ok": True}))
"""


def test_eight_devices():
  assert finish(run_python(EIGHT_DEVICES, devices=8)) == {"ok": True}


# Each of two processes (2 CPU devices each) owns 8 contiguous rows of a 16-row global batch.
TWO_PROCESSES = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ewgs_jax import parallel

process_id, port = int(sys.argv[1]), sys.argv[2]
settings = {"enabled": True, "coordinator_address": f"localhost:{port}", "num_processes": 2,
            "process_id": process_id, "initialization_timeout": 120}
parallel.maybe_initialize_distributed(settings)
parallel.maybe_initialize_distributed(settings)   # a second call is a no-op
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = parallel.make_mesh()
rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
rng = np.random.default_rng(0)   # every process builds the same global batch, then keeps its rows
x = rng.normal(size=(16, 3)).astype(np.float32)
y = rng.normal(size=(16,)).astype(np.float32)
rows = slice(8 * process_id, 8 * process_id + 8)
batch = parallel.shard_batch({"x": x[rows], "y": y[rows]}, mesh)
assert batch["x"].shape == (16, 3) and not batch["x"].is_fully_addressable
for shard in batch["x"].addressable_shards:   # this process's devices hold exactly its rows
  start = shard.index[0].start
  assert 8 * process_id <= start < 8 * process_id + 8, (process_id, shard.index)
  np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])

def sgd_step(w, b):
  loss, grad = jax.value_and_grad(lambda w: jnp.mean((b["x"] @ w - b["y"]) ** 2))(w)
  return w - 0.1 * grad, loss, jnp.sum(b["x"], axis=0), jnp.mean(b["y"])

step = jax.jit(sgd_step, in_shardings=(rep, data), out_shardings=rep)
w = parallel.replicate(np.array([0.5, -0.25, 1.0], np.float32), mesh)
for _ in range(3):
  w, loss, total, mean = step(w, batch)
host = parallel.to_host({"w": w, "loss": loss, "sum": total, "mean": mean, "x": batch["x"]})
np.testing.assert_array_equal(host["x"], x)   # gathered across processes
print(json.dumps({k: np.asarray(v).tolist() for k, v in host.items() if k != "x"}))
"""


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process():
  port = free_port()
  processes = [run_python(TWO_PROCESSES, i, port, devices=2) for i in range(2)]
  try:
    results = [finish(p) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float64)
  y = rng.normal(size=(16,)).astype(np.float64)
  w = np.array([0.5, -0.25, 1.0])
  for _ in range(3):
    residual = x @ w - y
    loss = np.mean(residual ** 2)
    w = w - 0.1 * 2 * x.T @ residual / len(y)
  for result in results:
    np.testing.assert_allclose(result["w"], w, rtol=1e-5)
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(result["sum"], x.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["mean"], y.mean(), rtol=1e-5, atol=1e-6)
  assert results[0] == results[1]


def test_a_bad_heartbeat_timeout_is_refused_before_initialising():
  import pytest
  from ewgs_jax import parallel
  with pytest.raises(ValueError, match=r"config\.distributed\.heartbeat_timeout_seconds=0 is invalid; it must be a "
                                       r"positive integer \(seconds\)"):
    parallel.maybe_initialize_distributed({"enabled": True, "heartbeat_timeout_seconds": 0})
