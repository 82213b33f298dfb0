"""ewgs_jax.hostmem: the allocator tuning removes the per-call page faults of XLA:CPU buffers."""

import os
import subprocess
import sys

import jax
import pytest

from ewgs_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints the median minor page faults per call over calls 3..12 of the gradient of a small conv
# net (its temporaries, about 40 MiB, are allocated and freed on every call). The median, because
# the tuned heap occasionally grows once more while its layout settles; XLA:CPU's concurrent
# thunks allocate in a timing-dependent order, so on a loaded machine a process now and then
# keeps faulting (seen once in CI, beside another test worker: 8,060 vs 10,248 untuned).
PROBE = """
import resource, sys
from ewgs_jax import hostmem
applied = hostmem.tune(sys.argv[1])
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
def loss(ws, x):
  for w in ws:
    x = jax.nn.relu(conv(x, w))
  return (x ** 2).mean()
f = jax.jit(jax.grad(loss))
ws, x = [jnp.full((3, 3, 16, 16), 0.05)] * 4, jnp.ones((64, 32, 32, 16))
faults = []
for i in range(12):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(ws, x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults[2:])[5])
"""


def _faults(mode: str) -> tuple[bool, int]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  for name in hostmem.ENV:
    env.pop(name, None)
  out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()
  return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_removes_page_faults():
  not_applied, system = _faults("system")
  for _ in range(3):   # fresh processes: see PROBE on the occasional unsettled heap
    applied, tuned = _faults("tuned")
    if tuned < system / 10:
      break
  assert applied and not not_applied
  # ~10,000 pages a call when the temporaries are a fresh mapping each time
  assert system > 5_000, system
  assert tuned < system / 10, (tuned, system)


def test_too_late_and_bad_mode():
  jax.devices()   # this test process has started its backend
  if not hostmem._applied:
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
      hostmem.tune("tuned")
    assert hostmem.tune("auto") is False
  assert hostmem.tune("system") is hostmem._applied
  with pytest.raises(ValueError, match="auto, tuned, system"):
    hostmem.tune("jemalloc")


def test_auto_follows_platform(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert hostmem._cpu_only() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem._cpu_only() is True
