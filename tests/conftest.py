"""Shared test setup: a persistent compilation cache so that repeated runs reuse compiled steps."""

import os
import tempfile

from ewgs_jax import hostmem

hostmem.tune()   # before jax starts its backend: XLA:CPU steps without per-call page faults

import jax  # noqa: E402

# Training tests compile the same (tiny) train step in several runs and subprocesses; the cache
# turns every compilation after the first into a disk read.
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ewgs_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
