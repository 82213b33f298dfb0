"""Checkpoints (orbax ``CheckpointManager``), the resolved-config guard, warm start, preemption.

A checkpoint holds the whole ``TrainState`` pytree (``state``) plus a JSON ``extra`` dict (the data
iterator's position, history). Retention keeps the latest ``max_to_keep`` steps *and* the best
step by test accuracy. Saving is asynchronous; :meth:`CheckpointKeeper.wait_until_finished` is
called before exiting. SIGTERM (preemption) sets a flag that the training loop polls, so it can
save and exit cleanly; orbax's own multi-host preemption sync is polled too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import jax
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


def install_preemption_handler() -> None:
  """Routes SIGTERM to :func:`preemption_requested` (main thread only; no-op elsewhere)."""
  try:
    signal.signal(signal.SIGTERM, _on_sigterm)
  except ValueError:   # not the main thread
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
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)),
                      metrics=metrics, force=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """``(state, extra)`` of the latest checkpoint, with the shardings of ``abstract_state``."""
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    log.info("restored step %d from %s", step, self.manager.directory)
    return restored["state"], restored["extra"]

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_variables(workdir: str) -> dict:
  """``{"params", "batch_stats"}`` of another run's latest checkpoint (e.g. a full-precision run).

  The latest, not the best, as the reference code warm starts from ``last_checkpoint.pth``.
  Restores the raw pytree without needing that run's optimizer structure. Raises
  ``FileNotFoundError`` if ``workdir`` holds no checkpoint.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {directory}); train that run first")
  with ocp.CheckpointManager(directory, item_names=("state", "extra"),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {workdir!r}; train that run first")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return {k: state[k] for k in ("params", "batch_stats") if k in state}


# --- the resolved config -----------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for key, value in d.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: d}


def save_or_check_config(workdir: str, config: dict) -> None:
  """Writes ``workdir/config.json``, or checks that a run already there used the same config.

  A different config is refused with the differing keys, so that re-running a command resumes
  exactly the run it started and never mixes two experiments in one workdir.
  """
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(json.dumps(config, sort_keys=True, default=str))
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored != resolved:
      old, new = _flatten(stored), _flatten(resolved)
      diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]
      raise ValueError(f"workdir {workdir!r} holds a run with a different config ({'; '.join(diffs)}); "
                       f"use a new --workdir, or the original config to resume that run")
    return
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
