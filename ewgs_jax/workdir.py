"""The guard of a run's directory: one holder at a time, one config per run, stopping on a signal.

* **Lock.** A workdir is held by one training at a time (:class:`WorkdirLock`, an ``flock`` that the
  kernel releases even on ``kill -9``); a second one is refused at once.
* **Config guard.** ``config.json`` records the run's resolved config (:func:`save_or_check_config`).
  Re-running with the same config resumes; a different config is refused while the workdir holds a
  checkpoint trained with the old one (its meaning would change mid-run), and accepted when it holds
  none (a run that failed before its first checkpoint, e.g. diverged or read wrong data, starts again
  with the corrected config; the failed attempt's files are moved to ``superseded/``).
  :func:`config_change_advice` says which of the two applies, so that error messages advise only
  what the guard accepts.
* **Stopping.** With one process, SIGTERM and the first Ctrl-C set a flag that the training loop polls
  (:func:`preemption_requested`) to save and stop; a second Ctrl-C aborts at once. With several
  processes, SIGTERM belongs to JAX's preemption service, which agrees on one step at which every
  process stops (the loop polls ``CheckpointKeeper.reached_preemption``); the first Ctrl-C is handed to
  that service (as a SIGTERM to this process), so it too stops every process at the same step, and
  a second one ends this process at once (the others then stop on the lost peer).
  :func:`stop_requested` answers the same question inside long work between two steps (a rule's
  between-step action, such as a Hessian refresh), on every process alike.

Exit codes shared with the command line: :data:`EXIT_STOPPED_EARLY` (75, resumable: re-run the same
command) and :data:`EXIT_ABORTED` (130).
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
import sys
from typing import IO, Any

import jax
import numpy as np

from ewgs_jax import checkpoints

log = logging.getLogger(__name__)

EXIT_STOPPED_EARLY = 75   # EX_TEMPFAIL: stopped with the checkpoints intact; re-running resumes
EXIT_ABORTED = 130        # 128 + SIGINT: aborted by a second Ctrl-C, without saving

CONFIG_FILE = "config.json"
SUPERSEDED_DIR = "superseded"


# --- stopping on a signal ---------------------------------------------------------------------

# "requested": a signal reached this process's own handler (one process only); "agreed": every
# process has seen stop_requested() return True (several processes); "ctrl_c": presses seen.
_STOP = {"requested": False, "agreed": False, "ctrl_c": 0}
_INSTALLED: dict[int, Any] = {}   # signal -> the handler it had before ours

# The key under which XLA's preemption sync manager records that some process received SIGTERM
# (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc).
_PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"


def _say(text: str) -> None:
  sys.stderr.write(text + "\n")
  sys.stderr.flush()


def _on_sigterm(signum, frame):
  del signum, frame
  _STOP["requested"] = True
  log.warning("SIGTERM received: will save a checkpoint and stop after the current step")


def _on_sigint(signum, frame):
  del signum, frame
  _STOP["ctrl_c"] += 1
  if _STOP["requested"]:   # a second Ctrl-C: give up on saving
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt
  _STOP["requested"] = True
  log.warning("Ctrl-C: will save a checkpoint and stop after the current step (press again to abort)")


def _on_sigint_several_processes(signum, frame):
  """First Ctrl-C: JAX's preemption service stops every process at one step; second: exit now.

  The service listens to SIGTERM only, in a handler outside Python; raising SIGTERM here hands it
  the request. A second press exits at once (``os._exit``: unwinding would wait in collectives and
  in the distributed shutdown barrier for processes that are still training); the other processes
  then stop on their lost peer.
  """
  del signum, frame
  _STOP["ctrl_c"] += 1
  me = f"process {jax.process_index()} of {jax.process_count()}"
  if _STOP["ctrl_c"] == 1:
    _say(f"Ctrl-C ({me}): every process will save a checkpoint at the same step and stop "
         f"(press Ctrl-C again to abort at once, without saving)")
    os.kill(os.getpid(), signal.SIGTERM)
    return
  _say(f"aborted (Ctrl-C pressed twice, {me}): stopped at once, without saving; the other processes stop "
       f"too. Re-run every process's command to resume from the last saved checkpoint")
  os._exit(EXIT_ABORTED)


def several_processes() -> bool:
  """Whether this run spans several processes (``jax.distributed`` is initialised).

  Returns:
    ``True`` with several processes.
  """
  return getattr(jax.distributed, "is_initialized", lambda: False)() or jax.process_count() > 1


def leaves_signals_to_jax() -> bool:
  """True when SIGTERM belongs to JAX's preemption service (several processes).

  ``jax.distributed.initialize`` starts a preemption notifier that catches SIGTERM and agrees with
  every process on one step to stop at (``multihost_utils.reached_preemption_sync_point``, which
  orbax's ``CheckpointManager.reached_preemption`` polls). A Python handler would replace it: the
  service would never hear of the signal, and each process would stop on its own flag at its own
  step, leaving the others waiting in a collective. A handler installed outside Python (which
  ``signal.getsignal`` reports as ``None``) is left alone for the same reason.

  Returns:
    ``True`` if SIGTERM must be left as it is.
  """
  return several_processes() or signal.getsignal(signal.SIGTERM) is None


def install_preemption_handler() -> None:
  """Routes SIGTERM and Ctrl-C to a checkpoint-and-stop (main thread; see the module docstring).

  One process: SIGTERM and the first SIGINT set :func:`preemption_requested`; a second SIGINT raises
  ``KeyboardInterrupt``. Several processes: SIGTERM is left to JAX's preemption service; the first
  SIGINT is handed to it, a second one exits with :data:`EXIT_ABORTED` at once.
  """
  _STOP.update(requested=False, agreed=False, ctrl_c=0)
  handlers = {signal.SIGTERM: _on_sigterm, signal.SIGINT: _on_sigint}
  if several_processes():
    log.info("several processes: SIGTERM is left to JAX's preemption service")
    handlers = {signal.SIGINT: _on_sigint_several_processes}
  elif leaves_signals_to_jax():   # SIGTERM has a handler outside Python: left alone
    del handlers[signal.SIGTERM]
  try:
    for signum, handler in handlers.items():
      _INSTALLED.setdefault(signum, signal.getsignal(signum))
      signal.signal(signum, handler)
  except ValueError:   # not the main thread
    pass


def uninstall_preemption_handler() -> None:
  """Restores the handlers :func:`install_preemption_handler` replaced."""
  try:
    while _INSTALLED:
      signum, previous = _INSTALLED.popitem()
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
  except ValueError:
    pass


def preemption_requested() -> bool:
  """Whether this process must save and stop after the current step (polled once per step).

  Returns:
    ``True`` after SIGTERM or a first Ctrl-C (one process), or once :func:`stop_requested` has
    returned ``True`` (every process alike).
  """
  return bool(_STOP["requested"] or _STOP["agreed"])


def ctrl_c_presses() -> int:
  """How many Ctrl-C presses the installed handler has seen (for the abort message).

  Returns:
    The count since :func:`install_preemption_handler`.
  """
  return _STOP["ctrl_c"]


def _preemption_noticed() -> bool:
  """Whether JAX's preemption service has recorded a SIGTERM on any process (one key-value read)."""
  try:
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
      return False
    client.key_value_try_get(_PREEMPTION_NOTICE_KEY)
    return True
  except Exception:  # noqa: BLE001 - NOT_FOUND (no notice) or a JAX without this key: no notice
    return False


def stop_requested() -> bool:
  """Whether to stop now, for polling inside long work between two steps (e.g. between the batches of
  a rule's Hessian refresh), so that SIGTERM or Ctrl-C does not wait for that work to finish.

  One process: a flag read (as :func:`preemption_requested`). Several processes: a collective (every
  process must call it at the same points, as the refresh's own collectives): this process's view
  (a Ctrl-C, or JAX's preemption notice from any process) is gathered from all, and every process
  gets the same answer at the same call. Once ``True`` it stays ``True``, and
  :func:`preemption_requested` turns ``True`` with it, so that the loop's next check saves the same
  step on every process and stops. Work cut short must leave the state as it was before it began.

  Returns:
    ``True`` if the run must save and stop.
  """
  if preemption_requested() or not several_processes():
    return preemption_requested()
  from jax.experimental import multihost_utils
  local = np.asarray(_preemption_noticed(), dtype=np.int32)
  if np.any(multihost_utils.process_allgather(local)):
    _STOP["agreed"] = True
  return bool(_STOP["agreed"])


# --- the lock ------------------------------------------------------------------------------------


class WorkdirBusyError(RuntimeError):
  """Another process is training in this workdir."""


class WorkdirLock:
  """An exclusive ``flock`` on ``workdir/.lock`` held for the whole run (released on exit, even on
  ``kill -9``, by the kernel). Two processes in one workdir would interleave metrics and wait on
  each other's checkpoint barriers; the second one is refused at once instead."""

  def __init__(self, workdir: str):
    """Prepares (does not take) the lock of ``workdir``."""
    self.workdir = workdir
    self._file: IO[str] | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, or raises :class:`WorkdirBusyError` naming the holder's pid.

    Returns:
      ``self``.
    """
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
    """Releases the lock (nothing if not held)."""
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# --- the config guard ----------------------------------------------------------------------------


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
  if checkpoints.committed_steps(workdir):
    return True
  metrics = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(metrics) and os.path.getsize(metrics) > 0


def config_change_advice(workdir: str, fix: str) -> str:
  """How to retry with a corrected config after a failure in ``workdir``, as :func:`save_or_check_config`
  will accept it: a workdir without a committed checkpoint takes a changed config (the run starts
  again); one with checkpoints resumes only with its own config.

  Args:
    workdir: the run's directory.
    fix: what to correct, e.g. ``"lower the learning rate, or check the data"``.

  Returns:
    One or two sentences for an error message, starting with a capital.
  """
  steps = checkpoints.committed_steps(workdir)
  if not steps:
    return (f"No checkpoint was saved in {workdir}: {fix}, and re-run there (a workdir without a checkpoint "
            f"takes a changed config and starts the run again)")
  return (f"The last good checkpoint (step {steps[-1]}) in {workdir} is kept, and resumes only with this run's "
          f"config: {fix} in a new --workdir")


def _read_config(path: str, workdir: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(
        f"{path} is not readable JSON ({type(e).__name__}: {e}); it records the config of the run in {workdir}. "
        f"Restore it, or delete it to resume with this command's config (only if it is the run's original one), "
        f"or use a new --workdir") from None


def _supersede(workdir: str) -> str:
  """Moves a failed attempt's files (config, metrics, events, summary, warm start) aside."""
  root = os.path.join(workdir, SUPERSEDED_DIR)
  os.makedirs(root, exist_ok=True)
  taken = [int(n) for n in os.listdir(root) if n.isdigit()]
  target = os.path.join(root, str(max(taken, default=0) + 1))
  os.makedirs(target)
  for name in sorted(os.listdir(workdir)):
    if name in (CONFIG_FILE, "metrics.jsonl", "summary.json", checkpoints.WARM_START_FILE, "corrupt_checkpoints") \
        or name.startswith("events.out.tfevents.") or name.endswith(".png"):
      shutil.move(os.path.join(workdir, name), os.path.join(target, name))
  return target


def save_or_check_config(workdir: str, config: dict, ignore: tuple[str, ...] = ()) -> None:
  """Writes ``workdir/config.json``, or checks that a run already there used the same config.

  A different config is refused, listing the differing keys, while the workdir holds a committed
  checkpoint: re-running a command resumes exactly the run it started and never mixes two
  experiments (or two learning rates) in one run. Without a committed checkpoint nothing would be
  resumed, so the changed config is accepted with a warning: the failed attempt's metrics, summary
  and warm-start copy move to ``workdir/superseded/N`` and the run starts again. Differences in
  ``ignore`` (flattened keys) are allowed with a warning.

  Args:
    workdir: the run's directory (created if needed; only process 0 writes).
    config: the resolved config as a dict (stored as sorted JSON).
    ignore: flattened keys (``"a.b"``) whose differences only warn.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  resolved = json.loads(json.dumps(config, sort_keys=True, default=str))
  if os.path.exists(path):
    stored = _read_config(path, workdir)
    if stored == resolved:
      return
    old, new = _flatten(stored), _flatten(resolved)
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]
    diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if k not in ignore]
    steps = checkpoints.committed_steps(workdir)
    if steps:
      for k in [k for k in keys if k in ignore]:
        log.warning("config.%s differs from this run's (%r -> %r); ignored: the run resumes from its own "
                    "checkpoints", k, old.get(k), new.get(k))
      if not diffs:
        return
      raise ValueError(f"workdir {workdir!r} holds a run with a different config ({'; '.join(diffs)}) and "
                       f"checkpoints trained with it (last: step {steps[-1]}); resume it with its original "
                       f"config, or use a new --workdir for the changed one")
    if has_trained(workdir):   # failed before its first checkpoint: the corrected config starts again
      moved = _supersede(workdir) if jax.process_index() == 0 else os.path.join(workdir, SUPERSEDED_DIR)
      log.warning("workdir %s holds no checkpoint of its run, whose config differs (%s): starting it again "
                  "with this config; the earlier attempt's files are in %s", workdir,
                  "; ".join(diffs) or "; ".join(keys), moved)
    else:
      log.info("replacing %s: the run there never trained", path)
      if jax.process_index() == 0:
        with contextlib.suppress(FileNotFoundError):
          os.remove(os.path.join(workdir, checkpoints.WARM_START_FILE))   # may come from another init_from
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
