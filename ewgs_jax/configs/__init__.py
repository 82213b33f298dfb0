"""The shipped training configs, importable from the package: :func:`load_config` (name, variant).

Each module has ``get_config(variant=None)``; ``configs/<name>.py`` at the repository root forwards to
it so that ``train.py --config configs/<name>.py:<variant>`` keeps working.
"""

import importlib

import ml_collections

NAMES = ("cifar10_resnet20", "fashion_mnist_resnet20", "imagenet_resnet18", "quickstart")


def load_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """A shipped config, as ``train.py --config configs/<name>.py:<variant>`` loads it.

  Args:
    name: one of :data:`NAMES` (``"cifar10_resnet20"``, ``"quickstart"``, ...).
    variant: the variant argument of its ``get_config`` (``"w2a2_ewgs"``, ``"fp"``, ...).

  Returns:
    The config.
  """
  if name not in NAMES:
    raise ValueError(f"unknown config {name!r}; valid choices: {list(NAMES)}")
  return importlib.import_module(f"ewgs_jax.configs.{name}").get_config(variant)
