"""Shared test setup: a persistent compilation cache so that repeated runs reuse compiled steps."""

import os
import tempfile

import pytest

from ewgs_jax import hostmem

hostmem.tune()   # before jax starts its backend: XLA:CPU steps without per-call page faults

import jax  # noqa: E402

# Training tests compile the same (tiny) train step in several runs and subprocesses; the cache
# turns every compilation after the first into a disk read.
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ewgs_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
# The tests check rules against float32/float64 formulas: pin full float32 matmuls and convolutions,
# which GPUs otherwise run as TF32 (~1e-3 relative error; the library leaves the backend default,
# README "Choices where the papers are open"). No effect on CPU, where float32 is already exact.
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# `make test` runs -m "not slow": say how many cases that left out and how to run them. Under xdist the
# workers collect and deselect; each hands its list to the controller, which prints the line.
_slow_deselected: set[str] = set()


def pytest_deselected(items):
  _slow_deselected.update(item.nodeid for item in items if item.get_closest_marker("slow"))


def pytest_sessionfinish(session):
  workeroutput = getattr(session.config, "workeroutput", None)   # set on an xdist worker only
  if workeroutput is not None:
    workeroutput["slow_deselected"] = sorted(_slow_deselected)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):   # xdist's controller, as each worker finishes
  _slow_deselected.update(getattr(node, "workeroutput", {}).get("slow_deselected", []))


def pytest_terminal_summary(terminalreporter):
  n = len(_slow_deselected)
  if n and "not slow" in (terminalreporter.config.getoption("markexpr") or ""):
    terminalreporter.write_line(f"{n} slow test{'s' * (n != 1)} deselected (-m 'not slow'): run them with "
                                f"`make test-all` (the whole suite) or `python -m pytest -m slow tests`")
