"""A finished run's ``summary.json``: written atomically, read back, announced, with its software versions.

Two runs of one config give different numbers under different jax / flax / optax / numpy releases
(README's quickstart table moved by 3 points between two installs), so every summary records them
(:func:`environment`) and the results table prints them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

#: The distributions whose versions a summary records (besides Python and ewgs_jax).
ENVIRONMENT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def device() -> str:
  """The devices a run used, for its ``summary.json`` (key ``"device"``).

  Returns:
    ``"gpu NVIDIA H100 80GB HBM3 x 8"``, or ``"cpu x 1"`` where the kind only repeats the platform.
  """
  import jax
  first = jax.devices()[0]
  kind = "" if first.device_kind.lower() == first.platform.lower() else f" {first.device_kind}"
  return f"{first.platform}{kind} x {jax.device_count()}"


def environment() -> dict[str, str | None]:
  """The versions a run's numbers depend on, for its ``summary.json`` (key ``"environment"``).

  Returns:
    ``{"python": ..., "ewgs_jax": ..., "jax": ..., "jaxlib": ..., "flax": ..., "optax": ...,
    "numpy": ...}``; a distribution that is not installed maps to ``None``.
  """
  from ewgs_jax import __version__   # the package's own version (one source: ewgs_jax/__init__.py)
  versions: dict[str, str | None] = {"python": platform.python_version(), "ewgs_jax": __version__}
  for name in ENVIRONMENT_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def write_summary(workdir: str, summary: dict) -> str:
  """Writes ``workdir/summary.json`` atomically.

  Args:
    workdir: the run's directory.
    summary: the summary (JSON-serialisable; other values are written through ``float``).

  Returns:
    The path of ``summary.json``.
  """
  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=float)
  os.replace(path + ".tmp", path)
  return path


def read_summary(workdir: str) -> dict | None:
  """``workdir/summary.json``, or ``None`` if the run has not written one.

  Args:
    workdir: the run's directory.

  Returns:
    The summary as a dict, or ``None``.
  """
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:   # a torn or edited file: one line naming it (callers report ValueErrors so)
    raise ValueError(f"{path} is not valid JSON ({e}); move it aside to continue") from None


def final_message(workdir: str, summary: dict) -> str:
  """The line printed when a run ends: its accuracies and where its outputs are.

  Args:
    workdir: the run's directory.
    summary: the run's summary (``train_steps``, ``epochs``, ``final_*_accuracy``).

  Returns:
    The line, with each final accuracy in percent and the outputs present in ``workdir``.
  """
  accuracies = ", ".join(f"{k[len('final_'):-len('_accuracy')]} {100 * v:.2f} %" for k, v in sorted(summary.items())
                         if k.startswith("final_") and k.endswith("_accuracy") and v is not None)
  outputs = [f for f in ("summary.json", "curves.png", "deltas.png", "metrics.jsonl", "checkpoints")
             if os.path.exists(os.path.join(workdir, f))]
  return (f"finished {summary['train_steps']} steps ({summary['epochs']:g} epochs): final accuracy {accuracies or '-'}; "
          f"outputs in {os.path.abspath(workdir)}: {', '.join(outputs)}")
