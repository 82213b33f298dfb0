"""Checkpoints (orbax ``CheckpointManager``), the resolved-config guard, warm start, preemption.

A checkpoint holds the whole ``TrainState`` pytree (``state``) plus a JSON ``extra`` dict (the data
iterator's position, history). Retention keeps the latest ``max_to_keep`` steps *and* the best
step by test accuracy. Saving is asynchronous; :meth:`CheckpointKeeper.wait_until_finished` is
called before exiting. In one process SIGTERM (preemption) sets a flag that the training loop polls,
so it can save and exit cleanly; the first Ctrl-C (SIGINT) does the same; a second one aborts at once.
With several processes SIGTERM is left to JAX's preemption service, which orbax's
``reached_preemption`` polls, so that every process stops at the same step.

A workdir is held by one process at a time (:class:`WorkdirLock`). A warm-start source is copied
into the run (``warm_start.npz``), so that a run resumes without its ``init_from``. A latest
checkpoint that cannot be read is moved aside and the previous one is used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
from typing import IO, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)
_PREEMPTED = False


# --- preemption -------------------------------------------------------------------------------


def _on_sigterm(signum, frame):
  del signum, frame
  global _PREEMPTED
  _PREEMPTED = True
  log.warning("SIGTERM received: will save a checkpoint and stop after the current step")


def _on_sigint(signum, frame):
  del signum, frame
  global _PREEMPTED
  if _PREEMPTED:   # a second Ctrl-C: give up on saving
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt
  _PREEMPTED = True
  log.warning("Ctrl-C: will save a checkpoint and stop after the current step (press again to abort)")


_INSTALLED: dict[int, Any] = {}   # signal -> the handler it had before ours


def leaves_signals_to_jax() -> bool:
  """True when several processes run (``jax.distributed``): SIGTERM belongs to JAX's preemption service.

  ``jax.distributed.initialize`` starts a preemption notifier that catches SIGTERM and agrees with
  every process on one step to stop at (``multihost_utils.reached_preemption_sync_point``, which
  orbax's ``CheckpointManager.reached_preemption`` polls). A Python handler would replace it: the
  service would never hear of the signal, and each process would stop on its own flag at its own
  step, leaving the others waiting in a collective. A handler installed outside Python (which
  ``signal.getsignal`` reports as ``None``) is left alone for the same reason.
  """
  distributed = getattr(jax.distributed, "is_initialized", lambda: False)()
  return distributed or jax.process_count() > 1 or signal.getsignal(signal.SIGTERM) is None


def install_preemption_handler() -> None:
  """Routes SIGTERM and the first SIGINT to :func:`preemption_requested` (main thread, one process).

  With several processes both are left as they are: SIGTERM to JAX's preemption service (the
  training loop polls :meth:`CheckpointKeeper.reached_preemption`, so every process saves the same
  step and stops), SIGINT to Python's default (Ctrl-C aborts; a flag set on one host alone would
  stop it at a step the others do not stop at).
  """
  global _PREEMPTED
  _PREEMPTED = False
  if leaves_signals_to_jax():
    log.info("several processes: SIGTERM is left to JAX's preemption service")
    return
  try:
    for signum, handler in ((signal.SIGTERM, _on_sigterm), (signal.SIGINT, _on_sigint)):
      _INSTALLED.setdefault(signum, signal.getsignal(signum))
      signal.signal(signum, handler)
  except ValueError:   # not the main thread
    pass


def uninstall_preemption_handler() -> None:
  """Restores the handlers :func:`install_preemption_handler` replaced (nothing if it left them)."""
  try:
    while _INSTALLED:
      signum, previous = _INSTALLED.popitem()
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
  except ValueError:
    pass


def preemption_requested() -> bool:
  return _PREEMPTED


# --- the manager --------------------------------------------------------------------------------


class CheckpointKeeper:
  """Saves/restores ``(state, extra)`` under ``workdir/checkpoints``: last N plus the best."""

  def __init__(self, workdir: str, max_to_keep: int = 2, best_metric: str = "test_accuracy",
               keep_best: bool = True):
    """``max_to_keep`` latest steps are kept, plus (``keep_best``) the step with the highest
    ``metrics[best_metric]`` among those saved with metrics (orbax's ``BestN`` with ``n=1``)."""
    self.best_metric = best_metric
    keep = [policies.LatestN(max_to_keep)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
                                 keep_checkpoints_without_metrics=False))
    preservation = policies.AnyPreservationPolicy(keep)
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation, create=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                         options=options, item_names=("state", "extra"))

  def save(self, step: int, state: Any, extra: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save; a failure (of this one or of the previous one, e.g. a full
    disk) raises :class:`CheckpointSaveError` naming the last good checkpoint."""
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      extra=ocp.args.JsonSave(extra)),
                        metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"saving the checkpoint of step {step} in {self.manager.directory} failed "
                                f"({type(e).__name__}: {e}); stopped. The last good checkpoint is "
                                f"{self._last_good()}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """``(state, extra)`` of the latest readable checkpoint, with the shardings of ``abstract_state``.

    A checkpoint that cannot be read (torn, corrupt) is moved to ``workdir/corrupt_checkpoints``
    with a warning naming it, and the previous one is tried: a run never dies on its own
    half-written checkpoint while an older good one exists.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped the same way
        bad = os.path.join(str(self.manager.directory), str(step))
        log.warning("checkpoint %s cannot be read (%s: %s); moved aside, trying the previous one",
                    bad, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        self._quarantine(step)
        continue
      log.info("restored step %d from %s", step, self.manager.directory)
      return restored["state"], restored["extra"]
    return None

  def _quarantine(self, step: int) -> None:
    directory = str(self.manager.directory)
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(directory), "corrupt_checkpoints")
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(os.path.join(directory, str(step)), target)
    self.manager.reload()

  def check_for_errors(self) -> None:
    """Raises ``CheckpointSaveError`` if an asynchronous save failed (disk full, ...)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(
          f"saving a checkpoint in {self.manager.directory} failed ({type(e).__name__}: {e}); stopped. "
          f"The last good checkpoint is {self._last_good()}") from e

  def _last_good(self) -> str:
    steps = [s for s in _committed_steps(str(self.manager.directory))]
    return f"step {max(steps)}" if steps else "none (nothing was saved)"

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointSaveError(f"saving a checkpoint in {self.manager.directory} failed "
                                f"({type(e).__name__}: {e}); the last good checkpoint is {self._last_good()}") from e
    self.check_for_errors()

  def close(self) -> None:
    self.manager.close()


class CheckpointSaveError(RuntimeError):
  """An asynchronous checkpoint save failed; the run stops with the last good checkpoint kept."""


def _committed_steps(directory: str) -> list[int]:
  """Steps of the finished checkpoints in ``directory`` (orbax writes into temporary names first)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state")))


def committed_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints of the run in ``workdir``.

  Args:
    workdir: the run's directory (its checkpoints are in ``workdir/checkpoints``).

  Returns:
    The committed checkpoint steps, ascending (empty if there are none).
  """
  return _committed_steps(os.path.join(workdir, "checkpoints"))


@contextlib.contextmanager
def _quiet_absl():
  """Orbax logs harmless warnings (missing step metadata, read-only manager) through absl."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def load_variables(workdir: str) -> dict:
  """``{"params", "batch_stats"}`` of another run's latest checkpoint (e.g. a full-precision run).

  The latest, not the best, as the reference code warm starts from ``last_checkpoint.pth``.
  Restores the raw pytree as host numpy arrays, without needing that run's optimizer structure
  or its device topology (a run saved on 8 devices loads on 1). Raises ``FileNotFoundError`` if
  ``workdir`` holds no checkpoint.

  Args:
    workdir: the other run's directory.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as host numpy pytrees (``batch_stats`` only if saved).
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {directory}); train that run first")
  steps = _committed_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir!r}; train that run first")
  path = os.path.join(directory, str(steps[-1]), "state")
  with _quiet_absl():
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    tree = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                                                     partial_restore=True))
  return {k: state[k] for k in ("params", "batch_stats") if k in state}


# --- the warm-start copy --------------------------------------------------------------------------

WARM_START_FILE = "warm_start.npz"


def save_warm_start(workdir: str, variables: dict, source: str) -> None:
  """Copies the warm-start variables into the run, so that it never needs ``init_from`` again.

  Only process 0 writes; the file (``WARM_START_FILE``) is an ``.npz`` of the flattened variables
  and the absolute path of ``source``, written atomically.

  Args:
    workdir: the run's directory.
    variables: the warm-start variables (a nested dict of arrays).
    source: the directory they were loaded from (``init_from``), recorded with them.
  """
  if jax.process_index() != 0:
    return
  from flax import traverse_util
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  path = os.path.join(workdir, WARM_START_FILE)
  with open(path + ".tmp", "wb") as f:
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in flat.items()}
    np.savez(f, __source__=np.asarray(os.path.abspath(source)), **arrays)
  os.replace(path + ".tmp", path)


def load_warm_start(workdir: str) -> dict | None:
  """The variables stored by :func:`save_warm_start`, or ``None``.

  Args:
    workdir: the run's directory.

  Returns:
    The nested dict of numpy arrays, or ``None`` if the run has no stored warm start.
  """
  path = os.path.join(workdir, WARM_START_FILE)
  if not os.path.exists(path):
    return None
  from flax import traverse_util
  with np.load(path) as f:
    flat = {k: f[k] for k in f.files if k != "__source__"}
  return traverse_util.unflatten_dict(flat, sep="/")


# --- the workdir lock ----------------------------------------------------------------------------


class WorkdirBusyError(RuntimeError):
  """Another process is training in this workdir."""


class WorkdirLock:
  """An exclusive ``flock`` on ``workdir/.lock`` held for the whole run (released on exit, even on
  ``kill -9``, by the kernel). Two processes in one workdir would interleave metrics and wait on
  each other's checkpoint barriers; the second one is refused at once instead."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._file: IO[str] | None = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, ".lock")
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      f.seek(0)
      holder = f.read().strip() or "unknown"
      f.close()
      raise WorkdirBusyError(f"workdir {self.workdir!r} is in use by another run (pid {holder}); "
                             f"wait for it to finish, stop it, or use a different --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# --- the resolved config -----------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for key, value in d.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: d}


def has_trained(workdir: str) -> bool:
  """Whether a run in ``workdir`` has trained at least one step (a checkpoint or logged metrics).

  Args:
    workdir: the run's directory.

  Returns:
    ``True`` if it has a committed checkpoint or a non-empty ``metrics.jsonl``.
  """
  if _committed_steps(os.path.join(workdir, "checkpoints")):
    return True
  metrics = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(metrics) and os.path.getsize(metrics) > 0


def save_or_check_config(workdir: str, config: dict, ignore: tuple[str, ...] = ()) -> None:
  """Writes ``workdir/config.json``, or checks that a run already there used the same config.

  A different config is refused with the differing keys, so that re-running a command resumes
  exactly the run it started and never mixes two experiments in one workdir. Only a run that has
  trained counts: the config of one that failed before its first step (dataset missing, ...) is
  replaced. Differences in ``ignore`` (flattened keys) are allowed with a warning.

  Args:
    workdir: the run's directory (created if needed; only process 0 writes).
    config: the resolved config as a dict (stored as sorted JSON).
    ignore: flattened keys (``"a.b"``) whose differences only warn.
  """
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(json.dumps(config, sort_keys=True, default=str))
  if os.path.exists(path) and not has_trained(workdir):
    log.info("replacing %s: the run there never trained", path)
    if jax.process_index() == 0:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, WARM_START_FILE))   # it may come from a different init_from
  elif os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored != resolved:
      old, new = _flatten(stored), _flatten(resolved)
      keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]
      for k in [k for k in keys if k in ignore]:
        log.warning("config.%s differs from this run's (%r -> %r); ignored: the run resumes from its own "
                    "checkpoints", k, old.get(k), new.get(k))
      diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if k not in ignore]
      if not diffs:
        return
      raise ValueError(f"workdir {workdir!r} holds a run with a different config ({'; '.join(diffs)}); "
                       f"use a new --workdir, or the original config to resume that run")
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
