"""A training of several processes runs under a small parent, so that a lost peer ends each survivor
with one line and a resumable exit code.

Why a parent: when one process of a ``jax.distributed`` run dies (SIGKILL, out of memory, a crash),
JAX's coordination service tells the others through a native handler that aborts them (SIGABRT and
a ~70-line native stack dump): at once when the coordinator (process 0) died, after
``distributed.heartbeat_timeout_seconds`` otherwise. jaxlib 0.10 offers no Python hook for it (a
Python ``missed_heartbeat_callback`` given to its client fails to convert the status,
``std::bad_cast``), and an abort cannot be caught inside the process; its parent sees it.

So ``train.py`` with ``distributed.enabled`` starts the training as its child (the worker) and waits:

* the worker's native stderr (XLA's and gloo's logs, the dump) goes to
  ``workdir/logs/native.<process>.log``; Python's messages (progress, errors) still reach the terminal;
* SIGINT, SIGTERM and SIGHUP reach the parent (the worker has its own session, so a terminal's
  Ctrl-C is delivered once) and are forwarded to the worker; the worker dies with the parent;
* a worker that died of a signal becomes one line: the lost peer named from the log, the last saved
  step, and :data:`ewgs_jax.workdir.EXIT_STOPPED_EARLY` (75: re-run every process's command to
  resume); any other exit status is passed on unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

from ewgs_jax import checkpoints, workdir as workdir_lib

WORKER_ENV = "EWGS_JAX_WORKER_LOG"   # set in the worker's environment: where its native stderr goes
PARENT_ENV = "EWGS_JAX_SUPERVISOR_PID"
EXIT_ERROR = 1
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def is_worker() -> bool:
  """Whether this process is a supervised worker (started by :func:`supervise`).

  Returns:
    ``True`` in the worker.
  """
  return WORKER_ENV in os.environ


def native_log_path(workdir: str, process_id: int | None) -> str:
  """Where a worker's native stderr goes: ``workdir/logs/native.<process>.log``.

  Args:
    workdir: the run's directory.
    process_id: ``config.distributed.process_id``, or ``None`` when JAX detects it (the host name
      and this pid then name the file).

  Returns:
    The path (its directory is created here).
  """
  name = str(process_id) if process_id is not None else f"{socket.gethostname()}.{os.getpid()}"
  directory = os.path.join(workdir, "logs")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:   # a read-only workdir: the run reports that itself; the log goes elsewhere
    import tempfile
    directory = tempfile.gettempdir()
  return os.path.join(directory, f"native.{name}.log")


def supervise(argv: list[str], workdir: str, process_id: int | None, num_processes: int | None) -> int:
  """Runs ``argv``'s training as a worker child and returns the exit code for this process.

  Args:
    argv: the command line (program name first), as the user gave it.
    workdir: the run's directory.
    process_id: this process's index in the run, if given.
    num_processes: the number of processes, if given.

  Returns:
    The worker's exit status, or, when it died of a signal, :data:`~ewgs_jax.workdir.EXIT_STOPPED_EARLY`
    for a lost peer and ``1`` otherwise (after one line on stderr).
  """
  log_path = native_log_path(workdir, process_id)
  env = {**os.environ, WORKER_ENV: log_path, PARENT_ENV: str(os.getpid())}
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.basename(package_root) not in ("site-packages", "dist-packages"):   # a checkout: import this copy
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
  worker = subprocess.Popen([sys.executable, "-m", "ewgs_jax.train", *argv[1:]], env=env, start_new_session=True)

  def forward(signum, frame):
    del frame
    with contextlib.suppress(ProcessLookupError):
      worker.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

  for signum in _FORWARDED:
    signal.signal(signum, forward)
  code = worker.wait()
  if code >= 0:
    return code
  lost_to = -code
  steps = checkpoints.committed_steps(workdir)
  saved = f"step {steps[-1]}" if steps else "none (nothing was saved yet)"
  me = f"process {process_id}" if process_id is not None else "this process"
  text = _read_tail(log_path)
  peer = lost_peer(text) if lost_to == signal.SIGABRT else None
  if peer is not None:
    of = f" of {num_processes}" if num_processes else ""
    who = ("another process of the run" if peer < 0 else
           f"process {peer}{of}" + (" (the coordinator)" if peer == 0 else ""))
    _say(f"error: lost {who}: it stopped answering (killed, crashed or unreachable), so {me} stopped too. The "
         f"last checkpoint in {workdir} is {saved}: re-run every process's command to resume (details: {log_path})")
    return workdir_lib.EXIT_STOPPED_EARLY
  name = signal.Signals(lost_to).name
  why = " (out of memory, or killed by someone)" if lost_to == signal.SIGKILL else ""
  _say(f"error: the training of {me} died of {name}{why}. The last checkpoint in {workdir} is {saved}; "
       f"details: {log_path}")
  return EXIT_ERROR


def lost_peer(native_log: str) -> int | None:
  """The process whose loss JAX's coordination service reported in a worker's native log.

  Args:
    native_log: the text of the log.

  Returns:
    The lost process's index (0 when the coordinator became unreachable), ``-1`` when the log holds
    the service's fatal error without naming it, ``None`` when it does not hold it (the worker died
    of something else).
  """
  if "detected fatal errors" not in native_log and "heartbeat" not in native_log:
    return None
  match = (re.search(r"Task (\d+) heartbeat timeout", native_log)
           or re.search(r"stopped sending heartbeats\):\s*(\d+)", native_log))
  if match:
    return int(match[1])
  if re.search(r"leader task|coordination service", native_log):
    return 0
  return -1


def _read_tail(path: str, size: int = 1 << 16) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - size))
      return f.read().decode("utf-8", "replace")
  except OSError:
    return ""


def _say(text: str) -> None:
  sys.stderr.write(text + "\n")
  sys.stderr.flush()


def become_worker() -> None:
  """In the worker, before JAX starts: native stderr to the log, Python's to the terminal.

  Also asks the kernel to end the worker when its parent dies (Linux ``PR_SET_PDEATHSIG``), so that
  killing ``train.py`` ends this process of the run as a whole.
  """
  path = os.environ[WORKER_ENV]
  sys.stderr.flush()
  terminal = os.dup(2)
  log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(log_fd, 2)
  os.close(log_fd)
  old = sys.stderr
  sys.stderr = io.TextIOWrapper(io.FileIO(terminal, "w"), encoding=getattr(old, "encoding", None) or "utf-8",
                                errors="backslashreplace", line_buffering=True)
  for handler in logging.getLogger().handlers:
    if isinstance(handler, logging.StreamHandler) and handler.stream is old:
      handler.setStream(sys.stderr)
  with contextlib.suppress(Exception):   # Linux only; elsewhere the worker outlives a killed parent
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
  if str(os.getppid()) != os.environ.get(PARENT_ENV, str(os.getppid())):
    os._exit(EXIT_ERROR)   # the parent died before the request took effect


# A collective that fails because a peer died surfaces as a Python exception whose text names the
# transport (gloo on CPU, NCCL on GPU) or a lost connection.
_PEER_ERROR = re.compile(r"gloo|nccl|connection (reset|closed|refused)|socket closed|unavailable|heartbeat|"
                         r"deadline_exceeded|barrier", re.IGNORECASE)


def looks_like_lost_peer(error: BaseException) -> bool:
  """Whether an exception in a worker looks like a collective that lost a peer.

  Args:
    error: the exception.

  Returns:
    ``True`` if its text names a collective transport or a lost connection.
  """
  return bool(_PEER_ERROR.search(f"{type(error).__name__}: {error}"))


def await_lost_peer_verdict(error: BaseException, seconds: float) -> None:
  """Waits (in the worker) for JAX's verdict on a peer, which ends this process; returns if none came.

  The coordination service declares a peer lost after its heartbeat timeout and then aborts every
  survivor, which the parent turns into one line; meanwhile this process says nothing on the
  terminal (the error goes to the native log).

  Args:
    error: the exception that suggested a lost peer.
    seconds: how long to wait (the heartbeat timeout and a margin).
  """
  os.write(2, f"ewgs_jax: {type(error).__name__}: {error}\nwaiting {seconds:.0f} s for the coordination "
              f"service's verdict on the peers\n".encode("utf-8", "replace"))
  time.sleep(seconds)
