"""A seeded comparison of backward rules on real data, in one command.

``python -m ewgs_jax.compare --preset cpu --workdir runs/compare`` trains one full-precision model,
then one W{b}A{b} QAT run per rule and seed, each warm-started from it, every run through
the training command line (``python -m ewgs_jax.train``, i.e. ``ewgs-jax-train``) in its own workdir (so an interrupted comparison resumes where it stopped: finished
runs are skipped, unfinished ones resume from their checkpoints). It then writes, in ``--workdir``:

* ``results.md``: per-seed accuracies, mean +- sd per rule, and each rule against the baseline
  (``ste`` when present): the mean of the per-seed differences (runs with the same seed share the
  warm start, data order and initialisation, so they are paired), its 95 % confidence interval and
  a paired t-test.
* ``curves_<rule>.png``: accuracy against the epoch, one line per seed.
* ``traces.png``: the PEGE replacement rate p_T and mu_T, and the EWGS delta (mean over the
  weight and the activation quantizers at each refresh), against the epoch.

Rules are ``ste``, ``ewgs``, ``pege`` or any of them with config overrides, e.g.
``pege:pege.mu_kwargs.mu_max=0.1,pege.mu_ramp=0.2`` (the label of that rule is the whole string).
With ``--validation N`` the runs hold out N training examples and are judged on them; the test
split is evaluated once at the end and reported beside, for choosing nothing (how the defaults were
calibrated, README "Calibration").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

from ewgs_jax import extras, names, reporting

# Every run goes through the training command line as a module of this very package, so that compare
# works from an installed wheel as from a checkout (the child is given this package's parent directory
# on PYTHONPATH, so it imports the same ewgs_jax as the parent).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_COMMAND = (sys.executable, "-m", "ewgs_jax.train")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")   # ewgs_jax/configs
BASE_RULES = ("ste", "ewgs", "pege")


@dataclasses.dataclass(frozen=True)
class Preset:
  """A config file plus overrides for every run, for the full-precision run and for QAT runs."""
  config: str
  common: dict
  fp: dict
  qat: dict
  about: str


PRESETS = {
    # <= 30 minutes on 2 CPU cores (FP + 3 rules x 3 seeds): a narrow ResNet-8 on 20,000 images.
    "cpu": Preset(
        config="fashion_mnist_resnet20",
        common={"model": "resnet8", "model_kwargs.stage_widths": (16, 32), "batch_size": 128,
                "eval_batch_size": 1000, "train_examples": 20000, "log_every_steps": 26,
                "keep_checkpoints": 1, "progress_bar": False, "delta.batch_size": 128,
                "delta.num_batches": 1, "delta.max_samples": 10, "delta.every_epochs": 1},
        fp={"num_epochs": 10}, qat={"num_epochs": 3},
        about="ResNet-8 (stages 16, 32) on 20,000 Fashion-MNIST training images, batch 128; FP 10 epochs, "
              "QAT 3 epochs; EWGS delta from the Hessian every epoch (1 batch, <= 10 samples)"),
    # The setting of the measurement in issue 12: ResNet-20, all 60,000 images, FP 12 + QAT 10 epochs.
    "paper": Preset(
        config="fashion_mnist_resnet20", common={"progress_bar": False}, fp={}, qat={},
        about="ResNet-20 on Fashion-MNIST (60,000 training images), batch 256; FP 12 epochs, QAT 10 "
              "epochs; EWGS delta from the Hessian every 2 epochs"),
    # Seconds per run on the bundled digits: for tests of this command.
    "tiny": Preset(
        config="quickstart",
        common={"model_kwargs.stage_widths": (8,), "batch_size": 64, "eval_batch_size": 360,
                "log_every_steps": 2, "keep_checkpoints": 1, "progress_bar": False, "data_workers": 1,
                "delta.batch_size": 64, "delta.num_batches": 1, "delta.max_samples": 2,
                "delta.every_epochs": 1, "validation_examples": 0},
        fp={"num_epochs": 1, "num_train_steps": 8}, qat={"num_epochs": 2, "num_train_steps": 6},
        about="one-stage ResNet-8 (8 channels) on the bundled digits; a few steps (tests)"),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """A backward rule plus config overrides; ``label`` names its runs."""
  label: str
  backward: str
  overrides: dict


def parse_rule(spec: str) -> Rule:
  """``NAME`` or ``NAME:key=value,key=value`` with NAME in ste | ewgs | pege.

  Args:
    spec: the rule as given on the command line, e.g. ``"pege:pege.mu_ramp=0.2"``.

  Returns:
    A :class:`Rule` labelled ``spec`` with the backward rule ``NAME`` and the overrides as strings;
    raises ``ValueError`` for an unknown name or an item that is not ``key=value``.
  """
  name, _, rest = spec.partition(":")
  if name not in BASE_RULES:
    raise ValueError(f"unknown rule {spec!r}; rules are {list(BASE_RULES)}, optionally with ':key=value,...'")
  return Rule(spec, name, _key_values(filter(None, rest.split(",")), f"rule {spec!r}: "))


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  config: str        # path.py:variant
  overrides: dict

  def command(self) -> list[str]:
    flags = [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]
    return [*TRAIN_COMMAND, "--config", self.config, "--workdir", self.workdir, *flags]

  def summary(self) -> dict | None:
    path = os.path.join(self.workdir, "summary.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      summary = json.load(f)
    return None if summary.get("preempted") else summary


def plan(args) -> tuple[Run, list[tuple[Rule, int, Run]]]:
  """The full-precision run and every (rule, seed, run) of the comparison.

  Args:
    args: the parsed command line (:func:`parse_args`).

  Returns:
    ``(fp, runs)``: the full-precision :class:`Run` (or the ``--init-from`` one) and, for each rule
    and seed ``0..seeds-1``, ``(rule, seed, run)`` warm-started from it.
  """
  preset = PRESETS[args.preset]
  config_path = os.path.join(CONFIG_DIR, f"{preset.config}.py")
  sets = _key_values(args.set, "--set ")      # the command line wins over the preset, a rule's own overrides over both
  if args.validation:
    sets["validation_examples"] = args.validation
  fp_sets = {"num_epochs": args.fp_epochs} if args.fp_epochs else {}
  qat_sets = {"num_epochs": args.qat_epochs} if args.qat_epochs else {}
  fp_dir = os.path.abspath(args.init_from or os.path.join(args.workdir, "fp"))
  fp = Run("fp", fp_dir, f"{config_path}:fp", {**preset.common, **preset.fp, **sets, **fp_sets, "seed": args.fp_seed})
  runs = []
  for spec in args.rules:
    rule = parse_rule(spec)
    variant = f"w{args.bits}a{args.bits}_{rule.backward}"
    for seed in range(args.seeds):
      workdir = os.path.join(args.workdir, "runs", _slug(f"{variant}{spec[len(rule.backward):]}"), f"seed{seed}")
      overrides = {**preset.common, **preset.qat, **sets, **qat_sets, **rule.overrides, "seed": seed,
                   "init_from": fp_dir}
      runs.append((rule, seed, Run(f"{spec} seed {seed}", workdir, f"{config_path}:{variant}", overrides)))
  return fp, runs


def _key_values(items, where: str) -> dict:
  """``{"key": "value"}`` of ``key=value`` strings (a rule's overrides, ``--set``); ``where`` prefixes errors."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"{where}{item!r} is not key=value")
    out[key.strip()] = value.strip()
  return out


def _same(planned, stored) -> bool:
  """Whether a planned override (often a command-line string) equals a stored config value."""
  if isinstance(stored, list):
    stored = tuple(stored)
  if isinstance(planned, str) and not isinstance(stored, str):
    try:
      return float(planned) == float(stored)
    except (TypeError, ValueError):
      return planned == _flag_value(stored) or planned.lower() == str(stored).lower()
  return planned == stored or _flag_value(planned) == _flag_value(stored)


def _differences(run: Run, summary: dict) -> list[str]:
  out = []
  for key, planned in run.overrides.items():
    node = summary["config"]
    for part in key.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    if not _same(planned, node):
      out.append(f"{key}: {node!r} there, {planned!r} now")
  return out


def execute(run: Run, log_dir: str, env: dict) -> dict:
  """Runs ``run`` through the training command line unless it has finished; returns its summary.

  Args:
    run: the run to train.
    log_dir: where its training log goes (``<slug>.log``, appended to).
    env: the environment of the training subprocess.

  Returns:
    The run's ``summary.json`` as a dict; raises ``RuntimeError`` if the workdir holds a finished
    run of another config, or the training stopped early or failed (with the end of its log).
  """
  done = run.summary()
  if done is not None:
    differences = _differences(run, done)
    if differences:
      raise RuntimeError(f"{run.workdir} holds a finished run of another config ({'; '.join(differences)}); "
                         "use a new --workdir")
    print(f"[compare] {run.name}: finished earlier ({run.workdir})", flush=True)
    return done
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, _slug(os.path.relpath(run.workdir, os.path.dirname(log_dir))) + ".log")
  print(f"[compare] {run.name}: training in {run.workdir} (log {log_path})", flush=True)
  start = time.time()
  with open(log_path, "a") as log:
    code = subprocess.call(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
  summary = run.summary()
  if code == 75:   # train.py: stopped early (SIGTERM / Ctrl-C) after saving; the run is resumable
    raise RuntimeError(f"run {run.name!r} stopped early (exit 75) with a checkpoint saved; re-run to resume")
  if code != 0 or summary is None:
    with open(log_path) as f:
      tail = "".join(f.readlines()[-15:])
    raise RuntimeError(f"run {run.name!r} failed (exit {code}); the end of {log_path}:\n{tail}")
  print(f"[compare] {run.name}: done in {time.time() - start:.0f} s", flush=True)
  return summary


# --- statistics ---------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``n - 1``) of ``values``.

  Args:
    values: at least one number.

  Returns:
    ``(mean, sd)``; ``sd`` is NaN for a single value.
  """
  n = len(values)
  mean = sum(values) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
  return mean, sd


def paired_test(values: list[float], baseline: list[float]) -> dict:
  """Mean difference, its 95 % t confidence interval, and the two-sided paired t-test p-value.

  Args:
    values: one rule's results, one per seed.
    baseline: the baseline rule's results for the same seeds, in the same order.

  Returns:
    ``{"diff", "low", "high", "p", "n"}``: the mean of ``values - baseline``, its 95 % confidence
    interval, the p-value and the number of pairs (the interval and p are NaN below 2 pairs).
  """
  from scipy import stats
  diffs = [a - b for a, b in zip(values, baseline)]
  n = len(diffs)
  mean, sd = mean_sd(diffs)
  if n < 2:
    return {"diff": mean, "low": float("nan"), "high": float("nan"), "p": float("nan"), "n": n}
  se = sd / math.sqrt(n)
  half = stats.t.ppf(0.975, n - 1) * se
  p = 1.0 if se == 0 and mean == 0 else (0.0 if se == 0 else float(2 * stats.t.sf(abs(mean / se), n - 1)))
  return {"diff": mean, "low": mean - half, "high": mean + half, "p": p, "n": n}


# --- report -------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _split_results(summaries: dict[str, list[dict]], key: str) -> dict[str, list[float]]:
  return {label: [s[key] for s in runs] for label, runs in summaries.items() if all(s.get(key) is not None for s in runs)}


def write_results(args, fp_summary: dict, finished: list) -> str:
  """results.md; returns its text.

  Writes ``args.workdir/results.md``: the setting, a table of final accuracies per rule and seed
  (validation, when held out, and test) with mean ± sd and the paired comparison against ``ste``
  (or the first rule), and the list of runs.

  Args:
    args: the parsed command line.
    fp_summary: the full-precision run's summary.
    finished: ``(rule, seed, run, summary)`` of every run, in :func:`plan`'s order.

  Returns:
    The text written.
  """
  preset = PRESETS[args.preset]
  summaries: dict[str, list[dict]] = {}
  for rule, _, _, summary in finished:
    summaries.setdefault(rule.label, []).append(summary)
  labels = list(summaries)
  baseline = "ste" if "ste" in labels else labels[0]
  first = next(iter(summaries.values()))[0]
  lines = [f"# Comparison: W{args.bits}A{args.bits}, {len(labels)} rules x {args.seeds} seeds",
           "",
           f"- preset `{args.preset}`: {preset.about}",
           f"- dataset `{first['config']['dataset']}`, model `{first['config']['model']}`, "
           f"QAT {first['epochs']:g} epochs ({first['train_steps']} steps), device: {first.get('device', '?')}",
           f"- full-precision warm start: {_pct(fp_summary.get('final_test_accuracy'))} % test accuracy "
           f"({fp_summary['epochs']:g} epochs)",
           f"- command: `python -m ewgs_jax.compare {' '.join(args.argv)}`",
           ""]
  splits = [("validation", "final_validation_accuracy")] if args.validation else []
  splits.append(("test", "final_test_accuracy"))
  for split, key in splits:
    values = _split_results(summaries, key)
    role = (" (used to choose defaults)" if split == "validation" else
            " (reported; not used to choose anything)" if args.validation else "")
    lines += [f"## Final {split} accuracy (%){role}", "",
              "| rule | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean ± sd | "
              f"vs {baseline}: mean diff [95 % CI] | p (paired t) |",
              "|---" * (args.seeds + 4) + "|"]
    for label, vals in values.items():
      mean, sd = mean_sd(vals)
      row = f"| `{label}` | " + " | ".join(_pct(v) for v in vals) + f" | {_pct(mean)} ± {_pct(sd)} | "
      if label == baseline or baseline not in values:
        row += "- | - |"
      else:
        t = paired_test(vals, values[baseline])
        row += f"{100 * t['diff']:+.2f} [{100 * t['low']:+.2f}, {100 * t['high']:+.2f}] | {t['p']:.3f} |"
      lines.append(row)
    lines.append("")
  lines += ["## Runs", "", "| rule | seed | workdir | best accuracy (eval split) | wall time (s) |", "|---|---|---|---|---|"]
  for rule, seed, run, s in finished:
    best = s.get("best_validation_accuracy", s.get("best_test_accuracy"))
    lines.append(f"| `{rule.label}` | {seed} | `{os.path.relpath(run.workdir, args.workdir)}` | {_pct(best)} | "
                 f"{s['wall_time_s']:.0f} |")
  lines += ["", "Plots: `curves_<rule>.png` (accuracy per epoch, one line per seed), `traces.png` "
            "(p_T, mu_T, mean delta per refresh).", ""]
  text = "\n".join(lines)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(text)
  return text


def plot_all(args, finished: list) -> list[str]:
  """``curves_<rule>.png`` per rule and ``traces.png``; returns the paths written.

  Args:
    args: the parsed command line (``workdir``, ``bits``).
    finished: ``(rule, seed, run, summary)`` of every run; the traces use seed 0.

  Returns:
    The paths of the PNG files written into ``args.workdir``.
  """
  plt = extras.pyplot()
  by_rule: dict[str, list] = {}
  for rule, seed, run, summary in finished:   # each run's metrics read once, epochs from its summary
    records = reporting.read_metrics(os.path.join(run.workdir, "metrics.jsonl"))
    by_rule.setdefault(rule.label, []).append((rule, seed, records, summary["train_steps"] / summary["epochs"]))
  written = []
  for label, members in by_rule.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, seed, records, steps_per_epoch in members:
      for split in ("validation", "test"):
        points = [(r["step"] / steps_per_epoch, 100 * r["accuracy"]) for r in records
                  if r.get("split") == split and "accuracy" in r]
        if points:
          ax.plot(*zip(*points), marker="o", label=f"seed {seed} ({split})")
    ax.set(title=f"W{args.bits}A{args.bits} {label}", xlabel="epoch", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.workdir, f"curves_{_slug(label)}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for rule, seed, records, steps_per_epoch in (m for members in by_rule.values() for m in members):
    if seed != 0:
      continue
    train = [r for r in records if r.get("split") == "train"]
    if rule.backward == "pege":
      for ax, key in zip(axes[:2], ("rate", "mu")):
        ax.plot([r["step"] / steps_per_epoch for r in train], [r[key] for r in train], label=rule.label)
    refreshes = [r for r in records if r.get("split") == "quantizers" and r.get("reason", "delta_refresh") == "delta_refresh"]
    if rule.backward == "ewgs" and refreshes:
      for kind in names.DELTA_NAMES:
        means = [sum(q[kind] for q in r["quantizers"].values() if kind in q) /
                 max(1, sum(kind in q for q in r["quantizers"].values())) for r in refreshes]
        axes[2].plot([r["step"] / steps_per_epoch for r in refreshes], means, marker="o", label=f"{rule.label} {kind}")
  for ax, title, ylabel in zip(axes, ("PEGE replacement rate p_T", "PEGE mu_T", "EWGS delta (mean over layers)"),
                               ("p_T", "mu_T (config units)", "delta")):
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(args.workdir, "traces.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return written + [path]


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses and checks the comparison's command line.

  Args:
    argv: the arguments, without the program name.

  Returns:
    The namespace, with ``argv`` added; invalid values exit through ``parser.error``.
  """
  parser = argparse.ArgumentParser(prog="python -m ewgs_jax.compare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="where the runs, results.md and plots go")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--rules", nargs="+", default=list(BASE_RULES), help="rules, e.g. ste ewgs 'pege:pege.mu_ramp=0.2'")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per rule (0 .. N-1)")
  parser.add_argument("--bits", type=int, default=2, help="weight and activation bits (W{b}A{b})")
  parser.add_argument("--fp-seed", type=int, default=0, help="seed of the full-precision run")
  parser.add_argument("--validation", type=int, default=0,
                      help="hold out this many training examples and judge runs on them (for calibration)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
  parser.add_argument("--fp-epochs", type=int, default=0, help="epochs of the full-precision run (default: the preset's)")
  parser.add_argument("--qat-epochs", type=int, default=0, help="epochs of each QAT run (default: the preset's)")
  parser.add_argument("--init-from", default=None,
                      help="a finished full-precision workdir to warm start from instead of training one")
  parser.add_argument("--jobs", type=int, default=1,
                      help="runs at once (on one GPU each gets 1/jobs of its memory; on a CPU they share the cores)")
  args = parser.parse_args(argv)
  args.argv = argv
  if args.seeds < 1 or args.jobs < 1 or args.fp_epochs < 0 or args.qat_epochs < 0:
    parser.error("--seeds and --jobs must be >= 1, --fp-epochs and --qat-epochs >= 0")
  if not 1 <= args.bits <= 16:
    parser.error("--bits must be in 1..16")
  try:
    for spec in args.rules:
      parse_rule(spec)
    _key_values(args.set, "--set ")
  except ValueError as e:
    parser.error(str(e))
  if len(set(args.rules)) != len(args.rules):
    parser.error("a rule is given twice")
  return args


def main(argv: list[str] | None = None) -> int:
  """Trains the full-precision run and every rule and seed, then writes results.md and the plots.

  Args:
    argv: the command line arguments; ``None`` for ``sys.argv[1:]``.

  Returns:
    The exit status: 0 on success, 1 if a run failed, 2 if ``--init-from`` holds no finished run.
  """
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.workdir, exist_ok=True)
  fp, runs = plan(args)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
  if args.jobs > 1:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.jobs:.3f}")
  log_dir = os.path.join(args.workdir, "logs")
  # a given --init-from run was trained as its user chose: it is used, not checked against the preset
  fp_summary = fp.summary() if args.init_from else None
  if args.init_from and fp_summary is None:
    print(f"[compare] --init-from {args.init_from}: no finished run there (summary.json)", file=sys.stderr)
    return 2
  try:
    if fp_summary is None:
      fp_summary = execute(fp, log_dir, env)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
      summaries_in_order = list(pool.map(lambda item: execute(item[2], log_dir, env), runs))
  except RuntimeError as e:
    print(f"[compare] {e}", file=sys.stderr)
    return 1
  finished = [(rule, seed, run, summary) for (rule, seed, run), summary in zip(runs, summaries_in_order)]
  text = write_results(args, fp_summary, finished)
  plot_all(args, finished)
  print(text)
  print(f"[compare] wrote {os.path.join(args.workdir, 'results.md')} and plots", flush=True)
  return 0


def run() -> None:
  """The ``ewgs-jax-compare`` console script."""
  sys.exit(main())


if __name__ == "__main__":
  run()
