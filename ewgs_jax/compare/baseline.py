"""A baseline's child process: ``python -m ewgs_jax.compare.baseline WORKDIR``.

Reads ``WORKDIR/job.json`` (written by :func:`ewgs_jax.compare.execute.write_job`: the baseline's
name and module, the config file and variant, the overrides), resolves the config exactly as a training run's
(:func:`ewgs_jax.compare.plan.resolve_config`), evaluates the baseline on the full-precision run the
config's ``init_from`` names, and writes ``WORKDIR/summary.json``. Exit status 0, or 1 with the error
on the last line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

from ewgs_jax import reporting
from ewgs_jax.compare import plan as plan_lib


def main(argv: list[str] | None = None) -> int:
  """Evaluates the baseline described in ``WORKDIR/job.json`` and writes its summary.

  Args:
    argv: ``[WORKDIR]``; ``None`` for ``sys.argv[1:]``.

  Returns:
    The exit status: 0 written, 1 an error (the traceback, then one line saying what failed).
  """
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print("usage: python -m ewgs_jax.compare.baseline WORKDIR (a workdir with job.json)", file=sys.stderr)
    return 2
  workdir, name = argv[0], "the baseline"
  try:
    with open(os.path.join(workdir, "job.json")) as f:
      job = json.load(f)
    name = job["baseline"]
    config = plan_lib.resolve_config(job["config"], job["overrides"])
    evaluate = importlib.import_module(job["module"]).evaluate
    summary = dict(evaluate(config.init_from, config))
  except Exception as e:  # noqa: BLE001 (a child: the whole story goes to its log, the last line says what)
    traceback.print_exc()
    print(f"error: {name} in {workdir}: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  summary["baseline"] = {"name": name, "module": job["module"], "fp_workdir": config.init_from}
  reporting.write_summary(workdir, summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
