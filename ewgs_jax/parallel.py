"""Mesh, shardings and multi-host helpers (DESIGN.md, "Parallelism and scale").

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


def maybe_initialize_distributed(config: Any = None) -> None:
  """Calls ``jax.distributed.initialize`` when ``config.enabled``; a no-op otherwise or if done.

  ``coordinator_address``, ``num_processes`` and ``process_id`` may be left unset on platforms
  where JAX detects them (TPU pods, SLURM, Kubernetes).
  """
  if config is None or not config.get("enabled", False):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {k: config.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if config.get(k) is not None}
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
  """A mesh with one ``data`` axis over the first ``num_devices`` (default: all) global devices."""
  devices = jax.devices()
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
  """Raises if the global batch cannot be split evenly over the mesh's devices and processes."""
  devices = mesh.devices.size
  if global_batch_size % devices or global_batch_size % jax.process_count():
    raise ValueError(f"{what} {global_batch_size} is not divisible by the device count {devices} "
                     f"({jax.process_count()} process(es)); choose a multiple of {devices}")


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global arrays sharded on ``data`` from this process's rows (see the module docstring)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Numpy copy of a tree of replicated (or host-local) arrays, on every process."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))   # replicated: every shard holds the whole value
    return np.asarray(x)
  return jax.tree.map(fetch, tree)
