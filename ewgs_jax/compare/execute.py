"""Running a comparison's runs: each in a child process, resumable, stopped cleanly by a signal.

Every training run goes through the training command line as a module of this very package
(``python -m ewgs_jax.train``), so that compare works from an installed wheel as from a checkout
(the child is given this package's parent directory on ``PYTHONPATH``, so it imports the same
``ewgs_jax`` as the parent); a baseline runs as ``python -m ewgs_jax.compare.baseline WORKDIR``.
Each run has its own workdir: a finished run (``summary.json``) of the same config is skipped, an
unfinished one resumes from its checkpoints.

Signals: the children run in their own process groups, so a terminal's Ctrl-C reaches compare
alone; compare forwards SIGTERM and SIGINT (SIGHUP as SIGTERM) to every running child, exactly once
per signal received, starts no further run, waits for the children (the training command line saves
a checkpoint and exits 75) and exits :data:`EXIT_STOPPED` (75, re-run the same command to resume),
or :data:`EXIT_ABORTED` (130) after a second Ctrl-C, which the children take as theirs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ewgs_jax.compare import plan as plan_lib

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_COMMAND = (sys.executable, "-m", "ewgs_jax.train")
BASELINE_COMMAND = (sys.executable, "-m", "ewgs_jax.compare.baseline")
JOB_FILE = "job.json"   # a baseline's run, as its child process reads it
EXIT_STOPPED, EXIT_ABORTED = 75, 130   # as the training command line's
FORWARDED: dict[int, int] = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT,
                              signal.SIGHUP: signal.SIGTERM}
POLL_S = 0.2   # how often a waiting thread forwards a signal compare received


class RunFailed(RuntimeError):
  """A run failed, or its workdir holds another config's finished run; the message says which and why."""


class RunStopped(RuntimeError):
  """A run stopped early with a checkpoint saved (SIGTERM or Ctrl-C): re-running resumes it."""


class Supervisor:
  """The signals compare received, forwarded to its children.

  The handler only records the signal (so it never waits on a lock another thread holds); each
  thread that waits on a child forwards every recorded signal to it once (:meth:`wait`).
  """

  def __init__(self) -> None:
    self.received: list[int] = []
    self._previous: dict[int, Any] = {}

  def install(self) -> "Supervisor":
    """Routes SIGTERM, SIGINT and SIGHUP to :meth:`stop` (in the main thread; elsewhere nothing changes).

    Returns:
      ``self``.
    """
    try:
      for signum in FORWARDED:
        self._previous[signum] = signal.signal(signum, self._on_signal)
    except ValueError:   # not the main thread: the caller's handlers stay (stop() can still be called)
      pass
    return self

  def restore(self) -> None:
    """Puts back the handlers :meth:`install` replaced."""
    while self._previous:
      signum, previous = self._previous.popitem()
      signal.signal(signum, previous)

  def _on_signal(self, signum, frame):
    del frame
    self.stop(signum)

  def stop(self, signum: int) -> None:
    """Records ``signum``: no run starts after it, and the running children receive it.

    Args:
      signum: the signal received.
    """
    self.received.append(signum)
    if self.aborting:
      text = "second Ctrl-C: the running runs abort (their last saved checkpoints are kept)"
    else:
      text = (f"{signal.Signals(signum).name}: stopping; the running runs save a checkpoint and stop, "
              "no other starts (re-run the same command to resume)")
    os.write(2, f"[compare] {text}\n".encode())   # a signal handler: no buffered stream

  @property
  def stopping(self) -> bool:
    """Whether a signal asked compare to stop."""
    return bool(self.received)

  @property
  def aborting(self) -> bool:
    """Whether Ctrl-C came twice (the children abort without saving)."""
    return self.received.count(signal.SIGINT) >= 2

  def exit_code(self) -> int:
    """The exit status after a stop.

    Returns:
      :data:`EXIT_ABORTED` after a second Ctrl-C, else :data:`EXIT_STOPPED`.
    """
    return EXIT_ABORTED if self.aborting else EXIT_STOPPED

  def wait(self, proc: subprocess.Popen) -> int:
    """Waits for ``proc``, forwarding to it each signal compare receives meanwhile (once each, spaced by ``POLL_S``).

    Args:
      proc: a child started after this supervisor was installed.

    Returns:
      Its exit status.
    """
    forwarded = 0
    while True:
      # one per poll: two signals sent back to back would reach the child's handler as one
      if forwarded < len(self.received):
        try:
          proc.send_signal(FORWARDED[self.received[forwarded]])
        except ProcessLookupError:   # it has just exited
          pass
        forwarded += 1
      try:
        return proc.wait(timeout=POLL_S)
      except subprocess.TimeoutExpired:
        pass


def _same(planned, stored) -> bool:
  """Whether a planned override (often a command-line string) equals a stored config value."""
  if isinstance(stored, list):
    stored = tuple(stored)
  if isinstance(planned, str) and not isinstance(stored, str):
    try:
      return float(planned) == float(stored)
    except (TypeError, ValueError):
      return planned == plan_lib.flag_value(stored) or planned.lower() == str(stored).lower()
  return planned == stored or plan_lib.flag_value(planned) == plan_lib.flag_value(stored)


def differences(run: plan_lib.Run, summary: dict) -> list[str]:
  """The planned overrides a finished run's stored config does not have.

  Args:
    run: the planned run.
    summary: its workdir's ``summary.json``.

  Returns:
    ``"key: stored there, planned now"`` per difference; empty when the run can be reused.
  """
  out = []
  for key, planned in run.overrides.items():
    node = summary["config"]
    for part in key.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    if not _same(planned, node):
      out.append(f"{key}: {node!r} there, {planned!r} now")
  return out


def command(run: plan_lib.Run) -> list[str]:
  """The child command line of ``run``.

  Args:
    run: a training run or a baseline.

  Returns:
    The training command line with the run's config and overrides, or the baseline's child, which
    reads them from ``WORKDIR/job.json``.
  """
  if run.baseline is not None:
    return [*BASELINE_COMMAND, run.workdir]
  return [*TRAIN_COMMAND, "--config", run.config, "--workdir", run.workdir, *run.config_flags()]


def write_job(run: plan_lib.Run) -> str:
  """``run.workdir/job.json``: what a baseline's child evaluates (name, module, config, overrides).

  Args:
    run: a baseline run.

  Returns:
    The file's path.
  """
  os.makedirs(run.workdir, exist_ok=True)
  path = os.path.join(run.workdir, JOB_FILE)
  with open(path + ".tmp", "w") as f:
    assert run.baseline is not None, f"{run.name} is a training run"
    baseline = plan_lib.BASELINES[run.baseline]
    json.dump({"baseline": baseline.name, "module": baseline.module, "about": baseline.about, "config": run.config,
               "overrides": run.overrides}, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def child_env(jobs: int) -> dict:
  """The environment of the children: this package first on ``PYTHONPATH``, a memory share per job.

  Args:
    jobs: how many children run at once (each gets ``0.9 / jobs`` of an accelerator's memory).

  Returns:
    The environment.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
  if jobs > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.3f}")
  return env


def execute(run: plan_lib.Run, log_dir: str, env: dict, supervisor: Supervisor) -> dict:
  """Runs ``run`` in a child process unless it has finished; returns its summary.

  Args:
    run: the run to train (or the baseline to evaluate).
    log_dir: where its log goes (``<slug>.log``, appended to).
    env: the child's environment (:func:`child_env`).
    supervisor: the signals received; none starts after a stop, and a running one gets them.

  Returns:
    The run's ``summary.json`` as a dict. Raises :class:`RunStopped` when it stopped early or did
    not start because compare is stopping, :class:`RunFailed` if the workdir holds a finished run
    of another config or the child failed (with the end of its log).
  """
  done = run.summary()
  if done is not None:
    changed = differences(run, done)
    if changed:
      raise RunFailed(f"{run.workdir} holds a finished run of another config ({'; '.join(changed)}); "
                      "use a new --workdir")
    print(f"[compare] {run.name}: finished earlier ({run.workdir})", flush=True)
    return done
  if supervisor.stopping:
    raise RunStopped(f"run {run.name!r} not started")
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, plan_lib.slug(os.path.relpath(run.workdir, os.path.dirname(log_dir))) + ".log")
  if run.baseline is not None:
    write_job(run)
  print(f"[compare] {run.name}: {'evaluating' if run.baseline else 'training'} in {run.workdir} (log {log_path})",
        flush=True)
  start = time.time()
  with open(log_path, "a") as log:
    # its own process group: a terminal's Ctrl-C reaches compare alone, which forwards it once
    proc = subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
    code = supervisor.wait(proc)
  summary = run.summary()
  if code == EXIT_STOPPED or (supervisor.stopping and (code != 0 or summary is None)):
    raise RunStopped(f"run {run.name!r} stopped early (exit {code}); re-run to resume")
  if code != 0 or summary is None:
    with open(log_path) as f:
      tail = "".join(f.readlines()[-15:])
    raise RunFailed(f"run {run.name!r} failed (exit {code}); the end of {log_path}:\n{tail}")
  print(f"[compare] {run.name}: done in {time.time() - start:.0f} s", flush=True)
  return summary


@dataclasses.dataclass
class Outcome:
  """What executing a plan gave.

  Attributes:
    fp: the full-precision run's summary (``None`` if it did not finish).
    summaries: per planned run, its summary or ``None``.
    failed: one message per failed run.
    stopped: one message per run stopped early or not started.
  """
  fp: dict | None
  summaries: list[dict | None]
  failed: list[str]
  stopped: list[str]


def execute_all(fp: plan_lib.Run, runs: list[plan_lib.Planned], *, log_dir: str, jobs: int,
                supervisor: Supervisor, train_fp: bool = True) -> Outcome:
  """The full-precision run, then every planned run, ``jobs`` at once.

  Args:
    fp: the full-precision run.
    runs: the planned runs (training runs and baselines).
    log_dir: where the logs go.
    jobs: how many children at once.
    supervisor: the installed signal supervisor.
    train_fp: ``False`` for a given ``--init-from`` run (used as it is).

  Returns:
    The :class:`Outcome`; the planned runs are not started if the full-precision one did not finish.
  """
  env = child_env(jobs)
  outcome = Outcome(None, [None] * len(runs), [], [])

  def attempt(run: plan_lib.Run) -> dict | None:
    try:
      return execute(run, log_dir, env, supervisor)
    except RunStopped as e:
      outcome.stopped.append(str(e))
    except RunFailed as e:
      outcome.failed.append(str(e))
    return None

  outcome.fp = attempt(fp) if train_fp else fp.summary()
  if outcome.fp is None:
    if not train_fp:
      outcome.failed.append(f"--init-from {fp.workdir}: no finished run there (summary.json)")
    return outcome
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    outcome.summaries = list(pool.map(lambda planned: attempt(planned.run), runs))
  return outcome
