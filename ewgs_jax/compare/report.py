"""The comparison's report: ``results.md`` (tables and paired tests) and the plots, from finished runs.

Everything here reads what the runs wrote (``summary.json``, ``metrics.jsonl``): the precision in
the title is the runs' resolved config (``W1A32`` when activations stay full precision), the traces
are those the rules declare (:class:`ewgs_jax.rules.Trace`) *and* the runs logged, and a baseline
row (e.g. ``ptq``) is one evaluation shown once, compared with every seed of the reference rule.
"""

from __future__ import annotations

import math
import os
from typing import Mapping

from ewgs_jax import extras, reporting, rules
from ewgs_jax.reporting import tables
from ewgs_jax.compare import plan as plan_lib
from ewgs_jax.compare.stats import mean_sd, paired_test

FULL_PRECISION_BITS = 32   # how a side left at full precision is written (W1A32)


def precision(config: Mapping) -> str:
  """``W<bits>A<bits>`` of a run's config, 32 for a side left at full precision.

  Args:
    config: the run's config as ``summary.json`` stores it.

  Returns:
    E.g. ``"W2A2"``, ``"W1A32"``; ``"full precision"`` when quantization is off.
  """
  q = config.get("quant", {})
  if not q.get("enabled", True):
    return "full precision"
  bits = [q.get(f"{side}_bits") if q.get(f"{side}_method") != "none" else FULL_PRECISION_BITS
          for side in ("weight", "act")]
  return f"W{bits[0]}A{bits[1]}"


def describe_precision(label: str) -> str:
  """``label`` with what a 32 on either side means.

  Args:
    label: a :func:`precision` label.

  Returns:
    E.g. ``"W1A32 (activations at full precision)"``.
  """
  if not label.startswith("W") or "A" not in label:
    return label
  weights, acts = label[1:].split("A")
  full = [side for side, bits in (("weights", weights), ("activations", acts)) if bits == str(FULL_PRECISION_BITS)]
  return f"{label} ({' and '.join(full)} at full precision)" if full else label


def _pct(x: float | None) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _group(finished: list) -> dict[str, list]:
  """``{label: [(rule, seed, run, summary), ...]}`` in the plan's order."""
  groups: dict[str, list] = {}
  for item in finished:
    groups.setdefault(item[0].label, []).append(item)
  return groups


def reference_label(finished: list) -> str:
  """The row every other is compared with: the first training rule given (the first row without one).

  Args:
    finished: ``(rule, seed, run, summary)`` of every row, in the plan's order.

  Returns:
    Its label.
  """
  return next((rule.label for rule, *_ in finished if not rule.baseline), finished[0][0].label)


def _records(finished: list) -> dict[str, list]:
  """Per training label, ``(rule, seed, records, steps_per_epoch, summary)`` of each of its runs."""
  out: dict[str, list] = {}
  for rule, seed, run, summary in finished:
    path = os.path.join(run.workdir, "metrics.jsonl")
    if rule.baseline or not os.path.exists(path):
      continue
    steps_per_epoch = summary["train_steps"] / summary["epochs"] if summary.get("epochs") else 1.0
    out.setdefault(rule.label, []).append((rule, seed, reporting.read_metrics(path), steps_per_epoch, summary))
  return out


def traces_present(finished: list, records: dict[str, list] | None = None) -> list[rules.Trace]:
  """The traces to plot: those the compared rules declare that their first seed's runs logged.

  A declared trace no run logged (EWGS's activation delta with no activation quantizers, say) is
  left out rather than drawn as an empty or zero panel.

  Args:
    finished: ``(rule, seed, run, summary)`` of every row.
    records: :func:`_records` of ``finished`` when already read.

  Returns:
    The traces, each once, in the rules' order.
  """
  records = _records(finished) if records is None else records
  found: dict[str, rules.Trace] = {}
  for members in records.values():
    rule, _, first_records, *_ = members[0]
    for trace in rules.get(rule.rule).traces:
      if any(trace.metric in r for r in first_records):
        found.setdefault(trace.metric, trace)
  return list(found.values())


def _split_values(groups: dict[str, list], key: str) -> dict[str, list[float]]:
  return {label: [s[key] for *_, s in members] for label, members in groups.items()
          if all(s.get(key) is not None for *_, s in members)}


def write_results(args, fp_summary: dict, finished: list) -> str:
  """results.md; returns its text.

  Writes ``args.workdir/results.md``: the setting (its precision read from the runs' configs), a
  table of final accuracies per rule and seed (validation, when held out, and test) with mean ± sd
  and the paired comparison against the reference rule (the first training rule of ``--rules``),
  baseline rows shown once, and the list of runs.

  Args:
    args: the parsed command line.
    fp_summary: the full-precision run's summary.
    finished: ``(rule, seed, run, summary)`` of every row, in the plan's order.

  Returns:
    The text written.
  """
  preset = plan_lib.PRESETS[args.preset]
  groups = _group(finished)
  reference = reference_label(finished)
  seeds = plan_lib.seeds(args)
  trained = [label for label, members in groups.items() if not members[0][0].baseline]
  baselines = [label for label in groups if label not in trained]
  first = groups[trained[0]][0][3] if trained else finished[0][3]
  precisions = list(dict.fromkeys(precision(s["config"]) for *_, s in finished))
  title = (f"# Comparison: {' / '.join(describe_precision(p) for p in precisions)}, {_count(len(trained), 'rule')} x "
           f"{_count(len(seeds), 'seed')}" + (f", and {', '.join(baselines)}" if baselines else ""))
  setting = f"- dataset `{first['config']['dataset']}`, model `{first['config']['model']}`"
  if trained:
    setting += f", QAT {first['epochs']:g} epochs ({first['train_steps']} steps)"
  lines = [title, "",
           f"- preset `{args.preset}`: {preset.about}",
           setting + f", seeds {seeds[0]}..{seeds[-1]}, device: {first.get('device', '?')}",
           f"- full-precision warm start: {_pct(fp_summary.get('final_test_accuracy'))} % test accuracy "
           f"({fp_summary['epochs']:g} epochs)"]
  for label in baselines:
    baseline = plan_lib.BASELINES[groups[label][0][0].rule]
    lines.append(f"- `{label}`: {baseline.about}; one evaluation (seed {seeds[0]}), shown once and compared "
                 f"with each seed's `{reference}` (its interval and p take that one value as fixed: the spread "
                 f"of its own calibration is not in them)")
  environments = sorted({tables.versions_line(s["environment"]) for *_, s in finished
                          if isinstance(s.get("environment"), dict)})
  for versions in environments:   # one line per set of versions the runs used (one, normally)
    lines.append(f"- versions: {versions}")
  lines += [f"- command: `python -m ewgs_jax.compare {' '.join(args.argv)}`", ""]
  splits = [("validation", "final_validation_accuracy")] if args.validation else []
  splits.append(("test", "final_test_accuracy"))
  for split, key in splits:
    values = _split_values(groups, key)
    role = (" (used to choose defaults)" if split == "validation" else
            " (reported; not used to choose anything)" if args.validation else "")
    lines += [f"## Final {split} accuracy (%){role}", "",
              "| rule | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | "
              f"vs {reference}: mean diff [95 % CI] | p (paired t) |",
              "|---" * (len(seeds) + 4) + "|"]
    for label, vals in values.items():
      if label in baselines:   # one evaluation: shown once, paired with every seed of the reference
        row = f"| `{label}` | " + " | ".join("" for _ in seeds) + f" | {_pct(vals[0])} (once) | "
        vals = vals * len(seeds)
      else:
        mean, sd = mean_sd(vals)
        row = f"| `{label}` | " + " | ".join(_pct(v) for v in vals) + f" | {_pct(mean)} ± {_pct(sd)} | "
      if label == reference or reference not in values:
        row += "- | - |"
      else:
        t = paired_test(vals, values[reference])
        row += f"{100 * t['diff']:+.2f} [{100 * t['low']:+.2f}, {100 * t['high']:+.2f}] | {t['p']:.3f} |"
      lines.append(row)
    lines.append("")
  lines += ["## Runs", "", "| rule | seed | workdir | best accuracy (eval split) | wall time (s) |",
            "|---|---|---|---|---|"]
  for rule, seed, run, s in finished:
    best = s.get("best_validation_accuracy", s.get("best_test_accuracy"))
    where = os.path.relpath(run.workdir, args.workdir)
    lines.append(f"| `{rule.label}` | {'-' if seed is None else seed} | `{where}` | {_pct(best)} | "
                 f"{s.get('wall_time_s', float('nan')):.0f} |")
  traces = traces_present(finished)
  lines += ["", "Plots: `curves_<rule>.png` (accuracy per epoch, one line per seed), `traces.png` ("
            + ("; ".join(t.title for t in traces) if traces else "no rule here logged a trace")
            + f"; seed {seeds[0]}).", ""]
  text = "\n".join(lines)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(text)
  return text


def plot_all(args, finished: list) -> list[str]:
  """``curves_<rule>.png`` per training rule and ``traces.png``; returns the paths written.

  Args:
    args: the parsed command line (``workdir``).
    finished: ``(rule, seed, run, summary)`` of every row; the traces use each rule's first seed,
      baselines (no training curve) are left out.

  Returns:
    The paths of the PNG files written into ``args.workdir``.
  """
  plt = extras.pyplot()
  by_rule = _records(finished)   # each run's metrics read once
  written = []
  for label, members in by_rule.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, seed, records, steps_per_epoch, _ in members:
      for split in ("validation", "test"):
        points = [(r["step"] / steps_per_epoch, 100 * r["accuracy"]) for r in records
                  if r.get("split") == split and "accuracy" in r]
        if points:
          ax.plot(*zip(*points), marker="o", label=f"seed {seed} ({split})")
    ax.set(title=f"{precision(members[0][4]['config'])} {label}", xlabel="epoch", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.workdir, f"curves_{plan_lib.slug(label)}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  traces = traces_present(finished, by_rule)
  fig, axes = plt.subplots(1, max(len(traces), 1), figsize=(5 * max(len(traces), 1), 4), squeeze=False)
  for ax, trace in zip(axes[0], traces):
    for members in by_rule.values():
      rule, _, records, steps_per_epoch, _ = members[0]
      points = [(r["step"] / steps_per_epoch, r[trace.metric]) for r in records if trace.metric in r]
      if points:
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=rule.label)
    ax.set(title=trace.title, xlabel="epoch", ylabel=trace.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if not traces:
    axes[0][0].set(title="no rule in this comparison logged a trace")
  fig.tight_layout()
  path = os.path.join(args.workdir, "traces.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return written + [path]
