"""Checkpoints (orbax ``CheckpointManager``) and the warm-start copy.

A checkpoint holds the whole ``TrainState`` pytree (``state``) plus a JSON ``extra`` dict (the data
iterator's position, history). Retention keeps the latest ``max_to_keep`` steps *and* the best
step by evaluation accuracy (validation, or test without a hold-out). Saving is asynchronous; :meth:`CheckpointKeeper.wait_until_finished` is
called before exiting, and a failed save (a full disk) stops the run naming the last good
checkpoint. A latest checkpoint that cannot be read while an older one can is moved aside and the
older one is used; when none can be read, nothing is moved and the run stops.
A warm-start source is copied into the run (``warm_start.npz``), so that a run resumes without
its ``init_from``.

The guard of the workdir (its lock, the config guard, stopping on SIGTERM / Ctrl-C) is
:mod:`ewgs_jax.workdir`; its names are still reachable here (``checkpoints.WorkdirLock``, ...) for
the callers written before the split.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import zipfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)

# Moved to ewgs_jax.workdir; resolved on first use (workdir imports this module).
_MOVED_TO_WORKDIR = ("WorkdirLock", "WorkdirBusyError", "save_or_check_config", "has_trained",
                     "install_preemption_handler", "uninstall_preemption_handler", "preemption_requested",
                     "stop_requested", "leaves_signals_to_jax")


def __getattr__(name: str) -> Any:
  if name in _MOVED_TO_WORKDIR:
    from ewgs_jax import workdir
    return getattr(workdir, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the manager --------------------------------------------------------------------------------


class CheckpointKeeper:
  """Saves/restores ``(state, extra)`` under ``workdir/checkpoints``: last N plus the best."""

  def __init__(self, workdir: str, max_to_keep: int = 2, best_metric: str = "eval_accuracy",
               keep_best: bool = True):
    """``max_to_keep`` latest steps are kept, plus (``keep_best``) the step with the highest
    ``metrics[best_metric]`` among those saved with metrics (orbax's ``BestN`` with ``n=1``).
    Checkpoints written before 0.2.0 stored the same value as ``test_accuracy``."""
    self.best_metric = best_metric
    keep = [policies.LatestN(max_to_keep)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=lambda m: m.get(best_metric, m.get("test_accuracy")), reverse=False, n=1,
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
      raise self._save_failed(e) from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """``(state, extra)`` of the latest readable checkpoint, with the shardings of ``abstract_state``.

    A checkpoint that cannot be read (torn, corrupt) while an older one can is moved to
    ``workdir/corrupt_checkpoints`` with a warning naming it: a run never dies on its own
    half-written checkpoint while an older good one exists. When none can be read, nothing is moved
    and :class:`CheckpointRestoreError` says why: the cause is then rarely the files (a different
    model, out of memory, a filesystem error), and starting again would throw the run away.
    """
    failed: list[tuple[int, Exception]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - judged below: damaged if an older one restores
        failed.append((step, e))
        continue
      for bad_step, error in failed:
        bad = os.path.join(str(self.manager.directory), str(bad_step))
        log.warning("checkpoint %s cannot be read (%s); moved aside to corrupt_checkpoints, using step %d",
                    bad, _first_line(error), step)
        self._quarantine(bad_step)
      log.info("restored step %d from %s", step, self.manager.directory)
      return restored["state"], restored["extra"]
    if failed:
      step, error = failed[0]
      raise CheckpointRestoreError(
          f"no checkpoint in {self.manager.directory} can be restored (step {step}: {_first_line(error)}); "
          f"nothing was moved. If they are damaged, move them aside (e.g. to corrupt_checkpoints/) to start again")
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
      raise self._save_failed(e) from e

  def _save_failed(self, error: Exception) -> "CheckpointSaveError":
    """One line: what failed where, why (a full disk said plainly), the last good checkpoint, the fix."""
    text = str(error).strip()
    full = "No space left on device" in text or getattr(error, "errno", None) == errno.ENOSPC
    why = "No space left on device" if full else f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    again = "resume" if _committed_steps(str(self.manager.directory)) else "start again"
    fix = f"{'free some space and ' if full else ''}re-run the same command to {again}"
    return CheckpointSaveError(f"saving a checkpoint in {self.manager.directory} failed ({why}); stopped. The last "
                               f"good checkpoint is {self._last_good()}: {fix}")

  def _last_good(self) -> str:
    steps = [s for s in _committed_steps(str(self.manager.directory))]
    return f"step {max(steps)}" if steps else "none (nothing was saved)"

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(e) from e
    self.check_for_errors()

  def close(self) -> None:
    self.manager.close()


class CheckpointSaveError(RuntimeError):
  """An asynchronous checkpoint save failed; the run stops with the last good checkpoint kept."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a run could be restored; none was moved or deleted."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


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
  try:
    with open(path + ".tmp", "wb") as f:
      arrays: dict[str, Any] = {k: np.asarray(v) for k, v in flat.items()}
      np.savez(f, __source__=np.asarray(os.path.abspath(source)), **arrays)
    os.replace(path + ".tmp", path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(path + ".tmp")
    raise OSError(e.errno, f"copying the warm start from {source} to {path} failed ({e.strerror or e}); "
                           f"free space in {workdir} (or fix its permissions) and re-run") from None


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
  try:
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files if k != "__source__"}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"the warm-start copy {path} is unreadable ({type(e).__name__}: {e}); delete it, and the "
                     f"run copies its warm start again from config.init_from") from None
  return traverse_util.unflatten_dict(flat, sep="/")
