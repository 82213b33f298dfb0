"""A finished training run as export reads it: its config, its latest checkpoint's variables, its summary.

Every way a workdir can be unfit for export is one :class:`RunError` line naming the workdir, what
is wrong and what to do: not a workdir, an unfinished (or preempted) run, a full-precision run, an
unreadable checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from ewgs_jax import checkpoints, reporting


class RunError(ValueError):
  """A workdir that cannot be exported; the message is one line saying why and what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished run.

  Attributes:
    workdir: its directory.
    config: its resolved config (``config.json``).
    variables: ``{"params", "batch_stats"}`` of its latest checkpoint (host numpy).
    step: that checkpoint's step.
    summary: its ``summary.json``.
  """
  workdir: str
  config: ml_collections.ConfigDict
  variables: dict
  step: int
  summary: dict


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run stored in ``workdir/config.json``.

  Args:
    workdir: the run's directory.

  Returns:
    The config.

  Raises:
    RunError: when ``workdir`` is missing or holds no (readable) ``config.json``.
  """
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir}: no such directory; pass the --workdir of a finished training run")
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      stored = json.load(f)
  except FileNotFoundError:
    raise RunError(f"{workdir}: not a training workdir (no config.json); pass the --workdir of a finished "
                   "training run") from None
  except (OSError, ValueError) as e:
    raise RunError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(stored, dict) or not isinstance(stored.get("quant"), dict):
    raise RunError(f"{path}: not a training run's config (no quant section)")
  old = (any(v is not None for v in (stored.get("delta") or {}).values())
         or stored["quant"].get("backward") is not None or "ewgs" not in stored)
  if old:   # keys renamed in 0.2.0 (CHANGELOG.md); 0.2 keeps them, unset, for the deprecation messages
    raise RunError(f"{path}: written by ewgs_jax 0.1 (keys delta.*, quant.backward); this version reads runs "
                   "trained with 0.2 or later: re-run the training command with this version in a new workdir")
  return ml_collections.ConfigDict(stored)


def load_run(workdir: str, config=None, *, quantized: bool = True) -> Run:
  """Reads a finished run for export (or, with ``quantized=False``, a finished full-precision run for PTQ).

  Args:
    workdir: the run's directory.
    config: its config, if already at hand; read from ``config.json`` otherwise.
    quantized: require a quantized run (``True``) or a full-precision one (``False``).

  Returns:
    The :class:`Run`.

  Raises:
    RunError: one line naming the problem: unfinished or preempted, of the wrong kind, no or an
      unreadable checkpoint.
  """
  config = read_config(workdir) if config is None else config
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(dict(config))
  summary = reporting.read_summary(workdir)
  if summary is None or summary.get("preempted"):
    why = "was stopped early" if summary else "has not finished (no summary.json)"
    raise RunError(f"{workdir}: the run {why}; re-run its training command to finish it, then export")
  if bool(config.quant.enabled) != quantized:
    raise RunError(f"{workdir}: a full-precision run has no quantized layers to export; train a quantized run "
                   "(--config.init_from=this workdir) or quantize it after training with ewgs_jax.ptq"
                   if quantized else f"{workdir}: already a quantized run; PTQ starts from a full-precision run")
  steps = checkpoints.committed_steps(workdir)
  if not steps:
    raise RunError(f"{workdir}: no checkpoint; re-run its training command")
  if steps[-1] != summary.get("train_steps"):
    raise RunError(f"{workdir}: the latest checkpoint (step {steps[-1]}) is not the run's last step "
                   f"({summary.get('train_steps')}); re-run its training command to finish it")
  try:
    variables = checkpoints.load_variables(workdir)
  except Exception as e:   # orbax raises many types for a damaged checkpoint; the message says which
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise RunError(f"{workdir}: checkpoint {steps[-1]} is unreadable ({type(e).__name__}: {first}); "
                   "re-run its training command (a damaged latest checkpoint is set aside on resume)") from None
  return Run(workdir=workdir, config=config, variables=variables, step=steps[-1], summary=summary)
