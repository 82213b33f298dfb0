"""Host-allocator tuning for XLA:CPU: keep freed buffers in the process instead of unmapping them.

XLA:CPU allocates every executable's buffers with ``malloc`` on its worker threads. With glibc's
defaults, each large buffer (above the 128 KiB-32 MiB mmap threshold) is a fresh ``mmap``: the
kernel zero-fills and faults in every 4 KiB page on first touch, and ``free`` unmaps it again, so
each train step pays the page faults once more: a CPU ResNet-20 step faults in its whole
working set every time with the defaults, not at all with the tuning below, and runs measurably
faster with it (figures: ``benchmarks/README.md``, section "Figures cited by module docstrings",
``hostmem``).
Worker threads also get their own glibc arenas, whose heaps are capped at 64 MiB and fall back to
``mmap`` for larger blocks, so the arena count must be limited too.

The tuning (glibc ``mallopt``): one arena, no ``mmap`` for large blocks, no trimming of the heap
top, and a 256 MiB top pad so the heap grows in large steps. The cost is that the process keeps
its peak heap for its lifetime (a training run does anyway: step after step needs the same buffers).

It only works if applied **before the JAX backend starts its threads** (the arena choice of a
thread is fixed at its first ``malloc``), i.e. before the first JAX computation or
``jax.devices()``; :func:`tune` checks for that and refuses otherwise. It is a no-op (returns
``False``) off glibc/Linux. ``train.py`` calls it first thing (config key ``host_allocator``); a
user of the library can call ``ewgs_jax.hostmem.tune()`` at the top of their own program, or get
the same effect without code by starting Python with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=268435456``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 256 << 20))
# The same settings as glibc's environment variables, for a process started from outside.
_ENV_NAMES = {_M_ARENA_MAX: "MALLOC_ARENA_MAX", _M_MMAP_MAX: "MALLOC_MMAP_MAX_",
              _M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", _M_TOP_PAD: "MALLOC_TOP_PAD_"}
ENV = {_ENV_NAMES[param]: str(value) for param, value in SETTINGS}
MODES = ("auto", "tuned", "system")
# Installed accelerator plugins: with one of them, 'auto' leaves the allocator alone (the host
# side of a GPU/TPU run is not where its time goes, and it may run many host threads).
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")

_applied = False


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge._backends)   # filled by the first backend initialisation
  except (ImportError, AttributeError):   # a future jax without the private: cannot tell, assume yes
    return True


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for name in _ACCELERATOR_MODULES:
    try:
      if importlib.util.find_spec(name) is not None:
        return False
    except (ImportError, ValueError):
      continue
  return True


def tune(mode: str = "auto") -> bool:
  """Applies the allocator settings above; returns whether they are in effect.

  Args:
    mode: ``'tuned'`` applies them; ``'system'`` leaves glibc's defaults; ``'auto'`` applies them
      when JAX will run on the CPU (``JAX_PLATFORMS`` starts with ``cpu``, or no GPU/TPU plugin is
      installed).

  Returns:
    ``True`` if the settings are in effect (applied by this call or an earlier one); ``False`` for
    ``'system'``, for ``'auto'`` off the CPU or after the backend started, off Linux, without
    glibc's ``mallopt``, or if ``mallopt`` refused a setting.

  Raises:
    ValueError: for an unknown mode.
    RuntimeError: ``'tuned'`` after the JAX backend has started (too late to take effect).
  """
  global _applied
  if mode not in MODES:
    raise ValueError(f"host allocator mode {mode!r} is invalid; valid: {', '.join(MODES)}")
  if _applied:
    return True
  if mode == "system" or (mode == "auto" and not _cpu_only()):
    return False
  if _backend_started():
    if mode == "tuned":
      raise RuntimeError("ewgs_jax.hostmem.tune must run before the first JAX computation "
                         "(the backend's threads already chose their allocator arenas)")
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):   # musl and other libcs have no mallopt
    return False
  _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return _applied
