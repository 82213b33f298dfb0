"""Mesh, shardings and multi-host helpers (ARCHITECTURE.md, "Input, parallelism and scale").

One 1-D mesh axis, ``data``, over every device of every process. Batches are sharded on it, the
training state is replicated, and BatchNorm under ``jax.jit`` then normalises over the global
batch with no ``axis_name``.

Row ownership: a global batch of ``B`` rows is split into ``jax.process_count()`` contiguous
blocks of ``B / P`` rows, process ``i`` owning rows ``[i B/P, (i+1) B/P)``. :mod:`ewgs_jax.data`
produces exactly those rows, and :func:`shard_batch` assembles the global array with
``jax.make_array_from_process_local_data``, so a run sees the same global batches whatever the
number of processes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
DATA_AXIS = "data"


_INIT_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids",
              "initialization_timeout", "heartbeat_timeout_seconds")
HEARTBEAT_TIMEOUT_S = 100   # jax.distributed.initialize's default


def maybe_initialize_distributed(config: Any = None, **overrides: Any) -> None:
  """Calls ``jax.distributed.initialize`` when ``enabled`` is set; a no-op otherwise or if done.

  ``config`` is a mapping (``dict`` or ``ConfigDict``, e.g. ``config.distributed``) and/or keyword
  arguments: ``enabled`` plus any of ``coordinator_address``, ``num_processes``, ``process_id``,
  ``local_device_ids``, ``initialization_timeout``, ``heartbeat_timeout_seconds``. Unset ones are
  left to JAX, which detects them on TPU pods, SLURM and Kubernetes. Safe to call more than once.

  ``heartbeat_timeout_seconds`` is how long a silent process counts as alive: JAX's coordination
  service then ends every other process (the training command reports it as a lost peer, exit 75).

  Args:
    config: a mapping of the settings, or ``None``.
    **overrides: settings that take precedence over ``config``'s.
  """
  settings = {**dict(config or {}), **overrides}
  if not settings.get("enabled", False) or jax.distributed.is_initialized():
    return
  kwargs = {k: settings[k] for k in _INIT_KEYS if settings.get(k) is not None}
  for key in ("initialization_timeout", "heartbeat_timeout_seconds"):
    value = kwargs.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
      raise ValueError(f"config.distributed.{key}={value!r} is invalid; it must be a positive integer (seconds)")
  # CPU processes need a collectives backend to talk to each other (no effect on GPU/TPU).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  # Set up the cross-process collectives now, while the processes are in step: the first
  # collective creates the CPU (gloo) context with a 30 s rendezvous, which uneven compile
  # times later in the run could exceed.
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("ewgs_jax: distributed initialised")
  log.info("distributed: process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
           jax.device_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A mesh with one ``data`` axis over the first ``num_devices`` (default: all) global devices.

  Args:
    num_devices: the number of devices, or ``None`` for all; raises ``ValueError`` if out of range.

  Returns:
    The 1-D ``Mesh``.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole value (the training state).

  Args:
    mesh: the device mesh.

  Returns:
    ``NamedSharding(mesh, P())``.
  """
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; device ``d`` of the mesh holds the ``d``-th block.

  Args:
    mesh: the device mesh.

  Returns:
    ``NamedSharding(mesh, P("data"))``.
  """
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a tree replicated on ``mesh``; works with several processes.

  Host values (numpy, Python scalars, single-process ``jax.Array``s) must be identical on every
  process, as after initialising from the same seed: each process fills its own devices from its
  copy. Arrays that already span several processes are resharded with ``jax.device_put``.

  Args:
    tree: a pytree of arrays or scalars.
    mesh: the device mesh.

  Returns:
    The tree of global ``jax.Array``s replicated on ``mesh``.
  """
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and (not x.is_fully_addressable
                                     or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
      return jax.device_put(x, sharding)
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, tree)


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
  """Raises if the global batch cannot be split evenly over the mesh's devices and processes.

  Args:
    global_batch_size: the batch size over all processes.
    mesh: the device mesh.
    what: the batch's name in the error message.
  """
  devices = mesh.devices.size
  if global_batch_size % devices or global_batch_size % jax.process_count():
    raise ValueError(f"{what} {global_batch_size} is not divisible by the device count {devices} "
                     f"({jax.process_count()} process(es)); choose a multiple of {devices}")


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays sharded on ``data`` from this process's rows (see the module docstring).

  ``local_batch`` maps names to numpy arrays of ``global_batch_size / jax.process_count()`` rows:
  this process's contiguous block. With one process it is simply the whole batch.

  Args:
    local_batch: this process's rows, by name.
    mesh: the device mesh.

  Returns:
    The global arrays, by name.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Numpy copy of the whole value of every leaf, on every process.

  Replicated arrays are read from a local device; arrays sharded across processes are gathered
  with ``process_allgather``, a collective: every process must call :func:`to_host` on the same
  tree (as in the training loop, where all processes run the same code).

  Args:
    tree: a pytree of arrays.

  Returns:
    The same tree of numpy arrays.
  """
  from jax.experimental import multihost_utils

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))   # every device holds the whole value
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)
