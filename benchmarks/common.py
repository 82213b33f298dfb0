"""Timing helpers shared by the benchmarks: interleaved repeats, medians, ratios."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from ewgs_jax import hostmem

# As train.py does on CPU: before JAX starts, keep freed buffers mapped (see ewgs_jax.hostmem).
# EWGS_BENCH_HOST_ALLOCATOR=system measures glibc's defaults instead.
hostmem.tune(os.environ.get("EWGS_BENCH_HOST_ALLOCATOR", "auto"))

import jax  # noqa: E402


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
  """Median seconds per call of each thunk, calls interleaved so that drift hits all alike."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in samples.items()}


def print_table(medians: dict[str, float], baseline: str, unit: str = "ms") -> None:
  scale = 1e3 if unit == "ms" else 1.0
  print(f"{'case':<32} {'median ' + unit:>12} {'ratio':>8}")
  for name, value in medians.items():
    print(f"{name:<32} {value * scale:>12.2f} {value / medians[baseline]:>8.3f}")
