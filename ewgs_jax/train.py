"""Trains (and evaluates) a quantized network: ``ewgs-jax-train --config CONFIG[:VARIANT] --workdir DIR``.

The same command line as ``python -m ewgs_jax.train`` and, in a checkout, ``python train.py``.
``CONFIG`` is a config file (``configs/cifar10_resnet20.py``) or the name of a config shipped in the
package (``cifar10_resnet20``, ``fashion_mnist_resnet20``, ``imagenet_resnet18``, ``quickstart``;
:mod:`ewgs_jax.configs`), so ``pip install ewgs_jax`` alone runs every paper configuration.
Any config key can be overridden on the command line, e.g. ``--config.quant.rule=pege``;
``--config_keys`` lists every key with its default and meaning.
Re-running the same command resumes from the latest checkpoint in ``--workdir``.

With several processes (``--config.distributed.enabled=True``) each command supervises its process
of the run (:mod:`ewgs_jax.supervisor`), so that the loss of another process ends it with one line.

Exit status: 0 the run finished; 1 an error (one message, no traceback; ``--verbose`` shows it and
the libraries' own log messages); 2 a bad command line or config key; 75 stopped early with the
checkpoints intact (SIGTERM or Ctrl-C after saving, or another process of the run lost): re-run the
same command (every process's) to resume; 130 aborted by Ctrl-C without saving (a second press).
"""

import ast
import errno
import importlib.util
import io
import logging as std_logging
import os
import sys
import threading
import time
import typing
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from ewgs_jax import checkpoints, config as config_lib, configs as shipped_configs, hostmem, parallel, supervisor
from ewgs_jax import training
from ewgs_jax import workdir as workdir_lib

EXIT_ERROR, EXIT_USAGE = 1, 2
EXIT_STOPPED_EARLY, EXIT_ABORTED = workdir_lib.EXIT_STOPPED_EARLY, workdir_lib.EXIT_ABORTED
# Failures a user causes and fixes (bad value, missing data, busy workdir, divergence, full disk):
# one message, not a traceback.
# ImportError: an optional part that is not installed (the message names the extra to install).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, workdir_lib.WorkdirBusyError,
                   checkpoints.CheckpointSaveError, checkpoints.CheckpointRestoreError, OSError,
                   ImportError)
VERDICT_MARGIN_S = 30   # waited beyond the heartbeat timeout for JAX's verdict on a lost peer
EXIT_GRACE_S = 10       # how long an error exit waits for library threads before leaving without them
_COMMAND_LINE: list[str] = []   # as given, for the supervised worker

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally 'path.py:variant'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("verbose", False, "Log library INFO messages (orbax, ...) and show tracebacks of errors.")
flags.DEFINE_bool("config_keys", False, "List every config key with its default and meaning, and exit.")


def _fail(message: str, code: int) -> NoReturn:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  _exit_even_if_a_library_thread_hangs(code)
  sys.exit(code)


def _exit_even_if_a_library_thread_hangs(code: int) -> None:
  """Arms a watchdog that ends the process with ``code`` if it has not exited ``EXIT_GRACE_S`` after
  an error. Python's exit waits for every non-daemon thread, and a library's can wait forever after a
  failure: orbax 0.11's signalling threads of a save that failed on a full disk do. The message is
  out and the checkpoint manager closed by then, so nothing is lost by not waiting for them."""
  def leave() -> None:
    time.sleep(EXIT_GRACE_S)
    os._exit(code)
  threading.Thread(target=leave, name="ewgs_jax-exit-watchdog", daemon=True).start()


def shipped_config_path(spec: str) -> str:
  """``NAME[:VARIANT]`` of a config shipped in :mod:`ewgs_jax.configs` -> its file path; a path as is.

  A file that exists wins over a shipped name, so a checkout's ``configs/x.py`` behaves as before.

  Args:
    spec: the ``--config`` argument, ``PATH_OR_NAME[:VARIANT]``.

  Returns:
    ``spec`` itself, or the shipped file's absolute path with ``:VARIANT`` kept.
  """
  path, sep, variant = spec.partition(":")
  name = path[:-3] if path.endswith(".py") else path
  if os.path.exists(path) or os.sep in path or name not in shipped_configs.NAMES:
    return spec
  return os.path.join(os.path.dirname(os.path.abspath(shipped_configs.__file__)), f"{name}.py") + sep + variant


def _resolve_config_argument(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = shipped_config_path(out[i + 1])
    elif arg.startswith("--config="):
      out[i] = "--config=" + shipped_config_path(arg[len("--config="):])
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with the config keys listed on request and a bad override as one message.

  Args:
    argv: the command line, program name first.

  Returns:
    The arguments absl leaves over (program name first). ``--config_keys`` prints the keys and
    exits 0; a flag or config error exits with ``EXIT_USAGE`` and one message.
  """
  _COMMAND_LINE[:] = argv
  argv = _resolve_config_argument(argv)
  if "--config_keys" in argv:
    print(config_lib.describe())
    sys.exit(0)
  try:
    remaining = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()   # a config file that could not be loaded raises on first use, not while parsing
    return remaining
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:   # a config file that raised: its last line says why
      message = "--config: " + [l for l in message.splitlines() if l.strip()][-1]
    _fail(f"{message}\n(see ewgs-jax-train --help; config keys: ewgs-jax-train --config_keys)", EXIT_USAGE)
  except OSError as e:   # ml_collections could not load the config file
    _fail(_config_file_message(argv, e), EXIT_USAGE)
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # raised by ml_collections overrides
    # ml_collections.config_flags looks each --config.a.b up in the loaded config while parsing
    # (config_path.get_type): a key the config lacks raises AttributeError/KeyError with only its name.
    known = set(config_lib.known_keys())
    overrides = _overrides(argv)
    unknown = [k for k in overrides if k not in known and not any(k.startswith(f"{free}.") or f".{free}." in k
                                                                   for free in config_lib.FREE_FORM)]
    if unknown:
      _fail(config_lib.unknown_key_message(unknown), EXIT_USAGE)
    _fail(_missing_dict_key_message(argv, overrides) or f"bad config ({type(e).__name__}: {e})", EXIT_USAGE)
  except Exception as e:  # noqa: BLE001 - a config file that does not import (SyntaxError, NameError, ...)
    _fail(_config_file_message(argv, e), EXIT_USAGE)


def _overrides(argv: list[str]) -> dict[str, str]:
  """``{"a.b": "value"}`` of every ``--config.a.b=value`` / ``--config.a.b value`` argument."""
  out = {}
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      out[key] = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
  return out


def _config_spec(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith("--config="):
      return arg[len("--config="):]
  return ""


def _config_file_message(argv: list[str], error: Exception) -> str:
  spec = _config_spec(argv)
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if any("No such file or directory" in line for line in lines):
    return (f"--config {spec}: no such file, and no shipped config of that name; give a config file "
            f"(PATH.py[:VARIANT]) or a shipped config ({', '.join(shipped_configs.NAMES)})[:VARIANT]")
  if isinstance(error, SyntaxError):
    return f"--config {spec}: the file does not parse (SyntaxError: {error.msg}, {error.filename} line {error.lineno})"
  return f"--config {spec}: loading it failed ({type(error).__name__}: {lines[-1] if lines else ''})"


def _missing_dict_key_message(argv: list[str], overrides: dict[str, str]) -> str | None:
  """For ``--config.a.b.k=v`` where the dict ``a.b`` exists but has no ``k``: what it holds and the fix."""
  path, _, variant = _config_spec(argv).partition(":")
  try:   # the config as ml_collections loads it (get_config(variant))
    spec = importlib.util.spec_from_file_location("_ewgs_jax_config_for_message", path)
    if spec is None or spec.loader is None:
      return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except Exception:  # noqa: BLE001 - no better message than the generic one
    return None
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    try:
      for name in parents:
        node = node[name]
    except (KeyError, TypeError, AttributeError):
      continue
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or leaf in node:
      continue
    current = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    parent = ".".join(parents)
    return (f"config.{parent} has no key {leaf!r} (it holds: {', '.join(sorted(current)) or 'nothing'}); the "
            f"command line cannot add a key to a dict, so set the whole dict: "
            f"--config.{parent}=\"{ {**current, leaf: parsed} !r}\" (keys and meanings: ewgs-jax-train --config_keys)")
  return None


def main(argv):
  """Runs one training from the parsed flags (absl's ``app.run`` entry point).

  Args:
    argv: the arguments absl left over (only the program name is accepted).

  Exits with ``EXIT_USAGE``, ``EXIT_ERROR`` or ``EXIT_ABORTED`` on failure and with
  ``EXIT_STOPPED_EARLY`` when the run stopped early after saving.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or FLAGS.workdir is None:
    _fail("--config and --workdir are required (ewgs-jax-train --help; shipped configs: "
          f"{', '.join(shipped_configs.NAMES)})", EXIT_USAGE)
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  distributed = FLAGS.config.distributed
  if distributed.enabled and not supervisor.is_worker():
    sys.exit(supervisor.supervise(_COMMAND_LINE, FLAGS.workdir, distributed.process_id, distributed.num_processes))
  if supervisor.is_worker():
    supervisor.become_worker()
  if not FLAGS.verbose:
    _quiet_libraries(FLAGS.workdir)
  # Before anything starts the JAX backend: the allocator settings only reach threads created later,
  # and XLA reads its flags once.
  if FLAGS.config.deterministic:
    training.enable_deterministic_ops()
  try:
    tuned = hostmem.tune(FLAGS.config.host_allocator)
  except ValueError as e:   # checked here, before the config's validation: it must run before JAX starts
    _fail(f"config.host_allocator: {e}", EXIT_USAGE)
  if tuned:
    logging.info("host allocator tuned for XLA:CPU (ewgs_jax.hostmem)")
  try:
    summary = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except KeyboardInterrupt:
    _fail(_aborted_message(FLAGS.workdir), EXIT_ABORTED)
  except Exception as e:
    if supervisor.is_worker() and supervisor.looks_like_lost_peer(e):
      # A collective lost a peer: JAX's verdict (which the supervisor reports) follows within the
      # heartbeat timeout; the distributed shutdown would wait for the lost peer, so exit directly.
      heartbeat = distributed.get("heartbeat_timeout_seconds") or parallel.HEARTBEAT_TIMEOUT_S
      supervisor.await_lost_peer_verdict(e, heartbeat + VERDICT_MARGIN_S)
      sys.stderr.write(f"error: {e}\n")
      sys.stderr.flush()
      os._exit(EXIT_ERROR)
    if FLAGS.verbose or not isinstance(e, EXPECTED_ERRORS):
      raise
    _fail(_error_message(e, FLAGS.workdir), EXIT_ERROR)
  if summary.get("preempted"):
    sys.exit(EXIT_STOPPED_EARLY)


def _last_checkpoint(workdir: str) -> str:
  steps = checkpoints.committed_steps(workdir)
  return f"step {steps[-1]}" if steps else "none (nothing was saved yet)"


def _aborted_message(workdir: str) -> str:
  how = "Ctrl-C pressed twice" if workdir_lib.ctrl_c_presses() else "Ctrl-C"
  return (f"aborted ({how}), without saving; the last checkpoint in {workdir} is {_last_checkpoint(workdir)}: "
          f"re-run the same command to resume")


def _error_message(error: BaseException, workdir: str) -> str:
  """One line for an expected error; a full disk names the workdir and the last good checkpoint."""
  if isinstance(error, OSError) and error.errno == errno.ENOSPC:
    return (f"no space left on device while writing in {workdir} ({error}); stopped. The last good checkpoint "
            f"is {_last_checkpoint(workdir)}: free some space and re-run the same command to resume")
  return str(error)


class _MainThreadStderr(io.TextIOBase):
  """``sys.stderr`` that passes the main thread's writes (progress, messages, errors) to the terminal
  and sends other threads' (the libraries' background savers and callbacks, which print tracebacks
  of their own when a disk fills up) to ``workdir/logs/library.log``."""

  def __init__(self, terminal, log_path: str):
    super().__init__()
    self._terminal, self._log_path = terminal, log_path
    self._log: typing.TextIO | None = None

  def write(self, text: str) -> int:
    if threading.current_thread() is threading.main_thread():
      return self._terminal.write(text)
    if self._log is None:
      try:
        os.makedirs(os.path.dirname(self._log_path), exist_ok=True)
        self._log = open(self._log_path, "a", buffering=1)
      except OSError:   # a full or read-only disk: nowhere to keep them
        self._log = open(os.devnull, "w")
    try:
      self._log.write(text)
    except OSError:
      pass
    return len(text)

  def flush(self) -> None:
    self._terminal.flush()

  def isatty(self) -> bool:
    return self._terminal.isatty()

  def fileno(self) -> int:
    return self._terminal.fileno()

  @property
  def encoding(self):
    return self._terminal.encoding


class _NotAboutOrbax(std_logging.Filter):
  """Drops records that orbax logs, or that asyncio logs about orbax's tasks."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    # asyncio: "Task exception was never retrieved", for each of orbax's abandoned writes, at exit
    return record.name != "asyncio" or "orbax" not in record.getMessage()


def _quiet_libraries(workdir: str) -> None:
  """Without ``--verbose``: orbax's own log messages are dropped (each failure of a save reaches
  the run as an exception, reported in one line; asyncio reports the same failure again for each
  of orbax's unfinished writes), and library threads write to ``workdir/logs/library.log``."""
  for name in ("absl", "asyncio"):
    std_logging.getLogger(name).addFilter(_NotAboutOrbax())
  sys.stderr = _MainThreadStderr(sys.stderr, os.path.join(workdir, "logs", "library.log"))


def run() -> None:
  """The ``ewgs-jax-train`` console script (and ``python -m ewgs_jax.train``, ``python train.py``)."""
  sys.modules["__main__"].__doc__ = __doc__   # absl's --help prints the main module's docstring
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
