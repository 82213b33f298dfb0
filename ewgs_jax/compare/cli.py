"""The comparison's command line: parse, plan, check every config, execute, report.

Exit status: 0 the report is written; 1 a run failed; 2 a bad command line, a config a run would
refuse (checked for every run before any trains), a missing ``--init-from`` run or baseline module;
75 stopped by SIGTERM or Ctrl-C with the running runs' checkpoints saved (re-run the same command to
resume); 130 aborted by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

from ewgs_jax import rules
from ewgs_jax.compare import execute as execute_lib, plan as plan_lib, report

PROG = "python -m ewgs_jax.compare"
EXIT_FAILED, EXIT_USAGE = 1, 2


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses and checks the comparison's command line.

  Args:
    argv: the arguments, without the program name.

  Returns:
    The namespace, with ``argv`` added; invalid values exit through ``parser.error``.
  """
  from ewgs_jax import compare   # the package docstring describes the command
  parser = argparse.ArgumentParser(prog=PROG, description=compare.__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="where the runs, results.md and plots go")
  parser.add_argument("--preset", choices=sorted(plan_lib.PRESETS), default="cpu")
  parser.add_argument("--rules", nargs="+", default=list(rules.RULES),
                      help=f"registered rules ({' '.join(rules.RULES)}), each optionally with config overrides "
                           "after a colon ('NAME:key=value,key=value'), and baselines evaluated on the full-precision "
                           f"run without training ({' '.join(plan_lib.BASELINES)}); the first rule is the reference "
                           "of the paired tests (default: every registered rule)")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per rule")
  parser.add_argument("--seed-offset", type=int, default=0, help="the first seed: seeds K .. K+N-1 (default 0)")
  parser.add_argument("--bits", type=int, default=2,
                      help="weight and activation bits (W{b}A{b}; --set quant.act_method=none keeps activations "
                           "at full precision)")
  parser.add_argument("--fp-seed", type=int, default=0, help="seed of the full-precision run")
  parser.add_argument("--validation", type=int, default=0,
                      help="hold out this many training examples and judge runs on them (for calibration)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
  parser.add_argument("--fp-epochs", type=int, default=0,
                      help="epochs of the full-precision run (default: the preset's)")
  parser.add_argument("--qat-epochs", type=int, default=0, help="epochs of each QAT run (default: the preset's)")
  parser.add_argument("--init-from", default=None,
                      help="a finished full-precision workdir to warm start from instead of training one")
  parser.add_argument("--jobs", type=int, default=1,
                      help="runs at once (on one GPU each gets 1/jobs of its memory; on a CPU they share the cores)")
  args = parser.parse_args(argv)
  args.argv = argv
  if args.seeds < 1 or args.jobs < 1 or args.fp_epochs < 0 or args.qat_epochs < 0 or args.seed_offset < 0:
    parser.error("--seeds and --jobs must be >= 1, --fp-epochs, --qat-epochs and --seed-offset >= 0")
  if not 1 <= args.bits <= 16:
    parser.error("--bits must be in 1..16")
  try:
    specs = [plan_lib.parse_rule(spec) for spec in args.rules]
    plan_lib.key_values(args.set, "--set ")
  except ValueError as e:
    parser.error(str(e))
  if len(set(args.rules)) != len(args.rules):
    parser.error("a rule is given twice")
  for spec in specs:
    missing = plan_lib.baseline_missing(spec.rule) if spec.baseline else None
    if missing:
      parser.error(missing)
  return args


def _error(message: str, code: int) -> int:
  print(f"{PROG}: error: {message}", file=sys.stderr)
  return code


def main(argv: list[str] | None = None) -> int:
  """Checks every run's config, trains the full-precision run and every rule and seed, then reports.

  Args:
    argv: the command line arguments; ``None`` for ``sys.argv[1:]``.

  Returns:
    The exit status (the module docstring lists them).
  """
  args = parse_args(sys.argv[1:] if argv is None else argv)
  fp, runs = plan_lib.plan(args)
  if args.init_from and fp.summary() is None:
    return _error(f"--init-from {args.init_from}: no finished run there (summary.json)", EXIT_USAGE)
  try:
    # a given --init-from run was trained as its user chose: it is used, not checked against the preset
    plan_lib.check(fp, runs, check_fp=not args.init_from)
  except ValueError as e:
    return _error(str(e), EXIT_USAGE)
  os.makedirs(args.workdir, exist_ok=True)
  supervisor = execute_lib.Supervisor().install()
  try:
    outcome = execute_lib.execute_all(fp, runs, log_dir=os.path.join(args.workdir, "logs"), jobs=args.jobs,
                                      supervisor=supervisor, train_fp=not args.init_from)
  finally:
    supervisor.restore()
  for message in outcome.failed:
    print(f"[compare] {message}", file=sys.stderr)
  if outcome.failed:
    return EXIT_FAILED
  if supervisor.stopping or outcome.stopped:
    unfinished = len(outcome.stopped)
    runs_left = f"{unfinished} run{'' if unfinished == 1 else 's'} unfinished"
    state = "aborted" if supervisor.aborting else "stopped"
    print(f"[compare] {state} ({runs_left}); re-run the same command to resume",
          file=sys.stderr)
    return supervisor.exit_code()
  assert outcome.fp is not None   # the planned runs ran, so the full-precision one finished
  finished = [(*planned, summary) for planned, summary in zip(runs, outcome.summaries)]
  text = report.write_results(args, outcome.fp, finished)
  print(text)
  try:
    report.plot_all(args, finished)
  except ImportError as e:   # matplotlib is an extra; the tables are written without it
    print(f"[compare] wrote {os.path.join(args.workdir, 'results.md')}; no plots: {e}", file=sys.stderr)
    return 0
  print(f"[compare] wrote {os.path.join(args.workdir, 'results.md')} and plots", flush=True)
  return 0


def run() -> None:
  """The ``ewgs-jax-compare`` console script and ``python -m ewgs_jax.compare``."""
  sys.exit(main())
