"""The results table of finished runs (from their ``summary.json``) and where and with what they ran."""

from __future__ import annotations

import os
import time

from ewgs_jax.reporting.summary import ENVIRONMENT_PACKAGES, read_summary


def _percent(value: object) -> str:
  return f"{100 * value:.2f} %" if isinstance(value, (int, float)) else "-"


def results_table(workdirs: list[str]) -> str:
  """A Markdown table of the runs' test accuracies, from their ``summary.json``.

  Runs without a summary (unfinished) or stopped early (preempted) get a row saying so. With a
  validation split, the best accuracy is the validation one (marked "(val.)"): the test split is
  evaluated once, at the end.

  Args:
    workdirs: the runs' directories, one row each in this order.

  Returns:
    The table's text.
  """
  rows = ["| run | rule | W/A bits | final test acc. | best test acc. | epochs | images/s |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
  for workdir in workdirs:
    name = os.path.basename(os.path.normpath(workdir))
    s = read_summary(workdir)
    if s is None:
      rows.append(f"| {name} (not finished: no summary.json) | - | - | - | - | - | - |")
      continue
    q = s.get("config", {}).get("quant", {})
    enabled = q.get("enabled", False)
    bits = f"W{q.get('weight_bits')}A{q.get('act_bits')}" if enabled else "32/32"
    rule = q.get("rule", q.get("backward", "-")) if enabled else "full precision"   # "backward" before 0.2.0
    speed = f"{s['train_images_per_s']:,.0f}" if s.get("train_images_per_s") else "-"
    if s.get("preempted"):
      name += f" (stopped early at step {s.get('train_steps', '?')})"
    eval_split = s.get("eval_split", "test")
    best = _percent(s.get(f"best_{eval_split}_accuracy"))
    if eval_split != "test" and best != "-":
      best += f" ({eval_split[:3]}.)"
    epochs = f"{s['epochs']:g}" if isinstance(s.get("epochs"), (int, float)) else "-"
    rows.append(f"| {name} | {rule} | {bits} | {_percent(s.get('final_test_accuracy'))} | {best} | "
                f"{epochs} | {speed} |")
  return "\n".join(rows)


def versions_line(environment: dict) -> str:
  """The versions a run used, as one line.

  Args:
    environment: a summary's ``environment`` (:func:`ewgs_jax.reporting.environment`).

  Returns:
    ``"python 3.11.7, ewgs_jax 0.2.0, jax ..."``.
  """
  keys = ("python", "ewgs_jax", *ENVIRONMENT_PACKAGES)
  return ", ".join(f"{k} {environment[k]}" for k in keys if environment.get(k))


def provenance(workdirs: list[str]) -> str:
  """When, on what and with which software the runs of a table were measured (from their summaries).

  Args:
    workdirs: the runs' directories.

  Returns:
    The date of the newest ``summary.json``, the devices, this machine's CPU count, the summed
    training wall time, and the versions the runs recorded (python, ewgs_jax, jax, jaxlib, flax,
    optax, numpy): one line when every run used the same, else one line per set of versions
    naming its runs; runs written before versions were recorded are named as such.
  """
  found = [(w, s) for w, s in ((w, read_summary(w)) for w in workdirs) if s is not None]
  devices = sorted({s.get("device", "?") for _, s in found})
  wall = sum(s.get("wall_time_s") or 0.0 for _, s in found)
  when = max((os.path.getmtime(os.path.join(w, "summary.json")) for w, _ in found), default=time.time())
  lines = [f"Measured {time.strftime('%Y-%m-%d', time.localtime(when))} on {', '.join(devices) or '?'} "
           f"({os.cpu_count()} CPU cores); {wall / 60:.1f} min of training wall time in all."]
  groups: dict[str, list[str]] = {}
  for workdir, s in found:
    versions = versions_line(s["environment"]) if isinstance(s.get("environment"), dict) else ""
    groups.setdefault(versions, []).append(os.path.basename(os.path.normpath(workdir)))
  if len(groups) == 1 and "" not in groups:
    lines.append(f"Versions: {next(iter(groups))}.")
  else:
    for versions, runs in groups.items():
      lines.append(f"Versions of {', '.join(runs)}: {versions or 'not recorded'}.")
  return "\n".join(lines)
