"""The optional parts of ewgs_jax and the extra that installs each: a missing one fails with a message naming it.

The core (layers, estimators, training, checkpoints, the command line) needs only the required
dependencies. These are imported lazily, where they are used:

============  =======================================================================
extra         what needs it
============  =======================================================================
``data``      tfds datasets (CIFAR-10, ImageNet, ...: ``tensorflow-datasets``), ImageNet's
              image transforms (``pillow``) and their worker processes (``grain``)
``demo``      the bundled offline digits of the quickstart (``scikit-learn``)
``plots``     ``curves.png``, ``deltas.png`` and the figures of ``ewgs_jax.compare`` (``matplotlib``)
``export``    saving and loading integer models (``flatbuffers``, which ``jax.export`` serialization needs)
============  =======================================================================

``pip install 'ewgs_jax[data,demo,plots,export]'`` (or ``ewgs_jax[all]``) installs all four. Imports no
project module, so any layer may use it.
"""

from __future__ import annotations

import importlib
import types

# module -> (distribution on PyPI, extra of ewgs_jax that installs it)
OPTIONAL = {
    "tensorflow_datasets": ("tensorflow-datasets", "data"),
    "PIL": ("pillow", "data"),
    "grain": ("grain", "data"),
    "sklearn": ("scikit-learn", "demo"),
    "matplotlib": ("matplotlib", "plots"),
    "flatbuffers": ("flatbuffers", "export"),
}


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message says which extra installs it."""


def missing_message(module: str, purpose: str) -> str:
  """The error message for an optional dependency that is not installed.

  Args:
    module: the missing module (its top-level package must be a key of :data:`OPTIONAL`).
    purpose: what needed it, the message's subject.

  Returns:
    The message, naming the distribution and the ``ewgs_jax[extra]`` to install.
  """
  distribution, extra = OPTIONAL[module.split(".")[0]]
  return (f"{purpose} needs {distribution}, which is not installed; install it with "
          f"`pip install 'ewgs_jax[{extra}]'` (or `pip install {distribution}`)")


def require(module: str, purpose: str) -> types.ModuleType:
  """Imports ``module`` (a key of :data:`OPTIONAL` or a submodule of one), or raises
  :class:`MissingExtraError` naming the extra to install.

  Only a missing top-level package is translated: an import that fails inside an installed package
  (a broken install, a version clash) keeps its own error.

  Args:
    module: the module to import.
    purpose: what needs it, for the error message.

  Returns:
    The imported module.
  """
  top = module.split(".")[0]
  try:
    importlib.import_module(top)
  except ModuleNotFoundError as e:
    if e.name != top:
      raise
    raise MissingExtraError(missing_message(top, purpose)) from e
  return importlib.import_module(module)


def pyplot() -> types.ModuleType:
  """``matplotlib.pyplot`` on the non-interactive Agg backend (extra ``plots``)."""
  matplotlib = require("matplotlib", "plotting")
  matplotlib.use("Agg")
  return importlib.import_module("matplotlib.pyplot")
