"""Trains (and evaluates) a quantized network: ``ewgs-jax-train --config CONFIG[:VARIANT] --workdir DIR``.

The same command line as ``python -m ewgs_jax.train`` and, in a checkout, ``python train.py``.
``CONFIG`` is a config file (``configs/cifar10_resnet20.py``) or the name of a config shipped in the
package (``cifar10_resnet20``, ``fashion_mnist_resnet20``, ``imagenet_resnet18``, ``quickstart``;
:mod:`ewgs_jax.configs`), so ``pip install ewgs_jax`` alone runs every paper configuration.
Any config key can be overridden on the command line, e.g. ``--config.quant.backward=pege``;
``--config_keys`` lists every key with its default and meaning.
Re-running the same command resumes from the latest checkpoint in ``--workdir``.

Exit status: 0 the run finished; 1 an error (one message, no traceback; ``--verbose`` shows it);
2 a bad command line or config key; 75 stopped early by SIGTERM or Ctrl-C after saving a
checkpoint (re-run the same command to resume); 130 aborted by a second Ctrl-C.
"""

import os
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from ewgs_jax import checkpoints, config as config_lib, configs as shipped_configs, hostmem, training

EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED_EARLY, EXIT_ABORTED = 1, 2, 75, 130
# Failures a user causes and fixes (bad value, missing data, busy workdir, divergence, full disk):
# one message, not a traceback.
# ImportError: an optional part that is not installed (the message names the extra to install).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, checkpoints.WorkdirBusyError,
                   checkpoints.CheckpointSaveError, OSError, ImportError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally 'path.py:variant'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("verbose", False, "Log library INFO messages (orbax, ...) and show tracebacks of errors.")
flags.DEFINE_bool("config_keys", False, "List every config key with its default and meaning, and exit.")


def _fail(message: str, code: int) -> NoReturn:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(code)


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
  argv = _resolve_config_argument(argv)
  if "--config_keys" in argv:
    print(config_lib.describe())
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:   # a config file that raised: its last line says why
      message = "--config: " + [l for l in message.splitlines() if l.strip()][-1]
    _fail(f"{message}\n(see ewgs-jax-train --help; config keys: ewgs-jax-train --config_keys)", EXIT_USAGE)
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # raised by ml_collections overrides
    known = set(config_lib.known_keys())
    given = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    unknown = [k for k in given if k not in known and not any(k.startswith(f"{free}.") or f".{free}." in k
                                                               for free in ("model_kwargs", "rate_kwargs", "mu_kwargs"))]
    if unknown:
      _fail(config_lib.unknown_key_message(unknown), EXIT_USAGE)
    _fail(f"bad config ({type(e).__name__}: {e})", EXIT_USAGE)


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
  # Before anything starts the JAX backend: the allocator settings only reach threads created later,
  # and XLA reads its flags once.
  if FLAGS.config.deterministic:
    training.enable_deterministic_ops()
  if hostmem.tune(FLAGS.config.host_allocator):
    logging.info("host allocator tuned for XLA:CPU (ewgs_jax.hostmem)")
  try:
    summary = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except EXPECTED_ERRORS as e:
    if FLAGS.verbose:
      raise
    _fail(str(e), EXIT_ERROR)
  except KeyboardInterrupt:
    _fail("aborted (second Ctrl-C); the last saved checkpoint is kept", EXIT_ABORTED)
  if summary.get("preempted"):
    sys.exit(EXIT_STOPPED_EARLY)


def run() -> None:
  """The ``ewgs-jax-train`` console script (and ``python -m ewgs_jax.train``, ``python train.py``)."""
  sys.modules["__main__"].__doc__ = __doc__   # absl's --help prints the main module's docstring
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
