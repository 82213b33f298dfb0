"""A seeded comparison of backward rules on real data, in one command.

``python -m ewgs_jax.compare --preset cpu --workdir runs/compare`` trains one full-precision model,
then one QAT run per rule and seed (``W{b}A{b}`` with ``--bits``; ``--set`` changes every run), each
warm-started from it, every run through the training command line (``python -m ewgs_jax.train``,
i.e. ``ewgs-jax-train``) in its own workdir, so an interrupted comparison resumes where it stopped:
finished runs are skipped, unfinished ones resume from their checkpoints. It then writes, in
``--workdir``:

* ``results.md``: per-seed accuracies, mean +- sd per rule, and each rule against the reference (the
  first rule of ``--rules``): the mean of the per-seed differences (runs with the same seed share the
  warm start, data order and initialisation, so they are paired), its 95 % confidence interval and
  a paired t-test.
* ``curves_<rule>.png``: accuracy against the epoch, one line per seed.
* ``traces.png``: the metrics the rules declare worth plotting (:class:`ewgs_jax.rules.Trace`) that
  the runs logged, against the epoch.

Rules are any registered rule (:data:`ewgs_jax.rules.RULES`), each optionally with config overrides,
e.g. ``NAME:key=value,key=value`` (the label of that rule is the whole string), and baselines
(:data:`ewgs_jax.compare.plan.BASELINES`, e.g. ``ptq``, post-training quantization): rows evaluated
once on the full-precision run, without training. With ``--validation N`` the runs hold out N
training examples and are judged on them; the test split is evaluated once at the end and reported
beside, for choosing nothing (how the defaults were calibrated, README "Calibration").

One job per module: :mod:`~ewgs_jax.compare.plan` (presets, rule specs, runs, every config checked
before any run trains), :mod:`~ewgs_jax.compare.execute` (child processes, resumability, signals),
:mod:`~ewgs_jax.compare.stats` (mean, sd, the paired t-test), :mod:`~ewgs_jax.compare.report`
(``results.md``, plots), :mod:`~ewgs_jax.compare.cli` (the command line and exit codes).
"""

from ewgs_jax.compare.stats import mean_sd, paired_test  # noqa: F401 (the public API)
from ewgs_jax.compare.plan import (  # noqa: F401
    BASELINES, PRESETS, Baseline, Preset, RuleSpec, parse_rule, register_baseline)
from ewgs_jax.compare.cli import main, parse_args, run  # noqa: F401
