"""What a comparison runs: presets, rule specs, baselines, the runs and their configs, checked before any trains.

A comparison is one full-precision run plus, per rule and seed, one QAT run warm-started from it,
plus one evaluation per *baseline* (a row that is not a training run, e.g. ``ptq``). Every run is a
config file, a variant and overrides, exactly what the training command line is given; the same
config is resolved here in-process (:func:`resolve_config`, the training command line's own parsing)
and validated (:func:`ewgs_jax.config.validate`) for every run before the first one trains
(:func:`check`), so a bad key in the last rule's overrides costs nothing.

Rule names come from the registry (:data:`ewgs_jax.rules.RULES`); baselines from :data:`BASELINES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import re
import warnings
from typing import Any, Mapping, NamedTuple

from absl import flags
import ml_collections
from ml_collections import config_flags

from ewgs_jax import config as config_lib, rules

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")  # ewgs_jax/configs


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
                "keep_checkpoints": 1, "progress_bar": False, "ewgs.batch_size": 128,
                "ewgs.num_batches": 1, "ewgs.max_samples": 10, "ewgs.every_epochs": 1},
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
                "ewgs.batch_size": 64, "ewgs.num_batches": 1, "ewgs.max_samples": 2,
                "ewgs.every_epochs": 1, "validation_examples": 0},
        fp={"num_epochs": 1, "num_train_steps": 8}, qat={"num_epochs": 2, "num_train_steps": 6},
        about="one-stage ResNet-8 (8 channels) on the bundled digits; a few steps (tests)"),
}

# Keys the comparison sets itself, per run: an override of them is refused with where to set them.
OWNED_KEYS = {
    "seed": "compare gives the runs seeds K..K+N-1: use --seed-offset K (and --fp-seed for the full-precision run)",
    "init_from": "compare warm-starts every run from its full-precision run: use --init-from DIR for another one",
    "quant.rule": "compare sets each run's rule: name it in --rules",
}


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A row of the comparison that is not a training run: an evaluation of the full-precision run.

  Attributes:
    name: its name in ``--rules`` (not a registered rule's).
    module: the module that implements it, imported only when it is used; its
      ``evaluate(fp_workdir, config) -> summary`` returns a dict shaped like a training run's
      ``summary.json`` (``final_<split>_accuracy``, ``eval_split``, ``config``, ``wall_time_s``, ...).
    about: one line for ``results.md`` and for the refusal when ``module`` is missing.
  """
  name: str
  module: str
  about: str


BASELINES: dict[str, Baseline] = {}


def register_baseline(baseline: Baseline) -> Baseline:
  """Makes ``baseline`` a name ``--rules`` accepts.

  Args:
    baseline: the baseline; its name must differ from every registered rule's.

  Returns:
    ``baseline``.
  """
  if baseline.name in rules.RULES:
    raise ValueError(f"baseline {baseline.name!r}: a registered rule has that name")
  BASELINES[baseline.name] = baseline
  return baseline


register_baseline(Baseline(
    "ptq", "ewgs_jax.ptq",
    "post-training quantization of the full-precision run (data-driven ranges from a few training batches, "
    "no training)"))


def baseline_missing(name: str) -> str | None:
  """Why baseline ``name`` cannot be used here, or ``None`` when its module is installed.

  Args:
    name: a key of :data:`BASELINES`.

  Returns:
    One line naming the baseline and the missing module, or ``None``.
  """
  baseline = BASELINES[name]
  try:
    found = importlib.util.find_spec(baseline.module) is not None
  except ImportError:   # a parent package that is missing
    found = False
  return None if found else (f"--rules {name} needs the module {baseline.module}, which this installation of "
                             f"ewgs_jax does not have ({name}: {baseline.about})")


@dataclasses.dataclass(frozen=True)
class RuleSpec:
  """A backward rule or a baseline (its name) plus config overrides; ``label`` names its rows.

  Attributes:
    label: the spec as given, e.g. ``"pege:pege.mu_ramp=0.2"``.
    rule: the registered rule's name, or the baseline's.
    overrides: the config overrides, ``{key: value string}``.
  """
  label: str
  rule: str
  overrides: dict

  @property
  def baseline(self) -> bool:
    """Whether this is a baseline (evaluated once on the full-precision run), not a training rule."""
    return self.rule in BASELINES


def parse_rule(spec: str) -> RuleSpec:
  """``NAME`` or ``NAME:key=value,key=value`` with NAME a registered rule or a baseline.

  Args:
    spec: the rule as given on the command line, e.g. ``"pege:pege.mu_ramp=0.2"``.

  Returns:
    A :class:`RuleSpec` labelled ``spec`` with the name ``NAME`` and the overrides as strings;
    raises ``ValueError`` for an unknown name, an item that is not ``key=value`` or a key compare
    sets itself (:data:`OWNED_KEYS`).
  """
  name, _, rest = spec.partition(":")
  if name not in rules.RULES and name not in BASELINES:
    raise ValueError(f"unknown rule {spec!r}; rules are {list(rules.RULES)} and baselines {list(BASELINES)}, "
                     "optionally with ':key=value,...'")
  return RuleSpec(spec, name, key_values(filter(None, rest.split(",")), f"rule {spec!r}: "))


def key_values(items, where: str) -> dict:
  """``{"key": "value"}`` of ``key=value`` strings (a rule's overrides, ``--set``).

  Args:
    items: the ``key=value`` strings.
    where: prefixes the error messages (``"--set "``, ``"rule 'pege:...': "``).

  Returns:
    The overrides as strings; raises ``ValueError`` for an item that is not ``key=value`` or that
    sets a key compare owns (:data:`OWNED_KEYS`).
  """
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"{where}{item!r} is not key=value")
    if key in OWNED_KEYS:
      raise ValueError(f"{where}{item!r}: {OWNED_KEYS[key]}")
    out[key] = value.strip()
  return out


def slug(text: str) -> str:
  """``text`` as a file name: runs of other characters than ``[A-Za-z0-9._=-]`` become ``_``.

  Args:
    text: a label.

  Returns:
    The file-name-safe text.
  """
  return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


def flag_value(value) -> str:
  """A config value as the training command line parses it (a tuple as ``(a,b,)``).

  Args:
    value: an override's value.

  Returns:
    Its ``--config.key=`` text.
  """
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


@dataclasses.dataclass
class Run:
  """One training run or baseline evaluation: what the training command line would be given.

  Attributes:
    name: how messages name it (``"pege seed 0"``).
    workdir: its directory (``summary.json`` there means finished).
    config: ``path.py:variant``.
    overrides: ``{key: value}`` applied to the config, as ``--config.key=value``.
    baseline: the :data:`BASELINES` name for a baseline evaluation, ``None`` for a training run.
  """
  name: str
  workdir: str
  config: str
  overrides: dict
  baseline: str | None = None

  def config_flags(self) -> list[str]:
    """The overrides as training command-line flags.

    Returns:
      ``["--config.key=value", ...]``.
    """
    return [f"--config.{k}={flag_value(v)}" for k, v in self.overrides.items()]

  def summary(self) -> dict | None:
    """The run's ``summary.json``, or ``None`` when it has not finished (or was preempted).

    Returns:
      The summary as a dict, or ``None``.
    """
    path = os.path.join(self.workdir, "summary.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      summary = json.load(f)
    return None if summary.get("preempted") else summary


class Planned(NamedTuple):
  """A row's run: its rule (or baseline), its seed (``None`` for a baseline) and the run."""
  rule: RuleSpec
  seed: int | None
  run: Run


def seeds(args) -> list[int]:
  """The seeds of the QAT runs: ``--seed-offset`` .. ``--seed-offset + --seeds - 1``.

  Args:
    args: the parsed command line.

  Returns:
    The seeds, in order.
  """
  return list(range(args.seed_offset, args.seed_offset + args.seeds))


def plan(args) -> tuple[Run, list[Planned]]:
  """The full-precision run and every (rule, seed, run) of the comparison, baselines included.

  Args:
    args: the parsed command line (:func:`ewgs_jax.compare.cli.parse_args`).

  Returns:
    ``(fp, runs)``: the full-precision :class:`Run` (or the ``--init-from`` one) and, for each
    training rule and seed, a :class:`Planned` run warm-started from it; a baseline is planned once,
    with the first seed (it trains nothing; the seed only orders its calibration data).
  """
  preset = PRESETS[args.preset]
  config_path = os.path.join(CONFIG_DIR, f"{preset.config}.py")
  sets = key_values(args.set, "--set ")      # the command line wins over the preset, a rule's own overrides over both
  if args.validation:
    sets["validation_examples"] = args.validation
  fp_sets = {"num_epochs": args.fp_epochs} if args.fp_epochs else {}
  qat_sets = {"num_epochs": args.qat_epochs} if args.qat_epochs else {}
  fp_dir = os.path.abspath(args.init_from or os.path.join(args.workdir, "fp"))
  fp = Run("fp", fp_dir, f"{config_path}:fp", {**preset.common, **preset.fp, **sets, **fp_sets, "seed": args.fp_seed})
  specs = [parse_rule(spec) for spec in args.rules]
  trained = [spec.rule for spec in specs if not spec.baseline]
  # A baseline's config is a QAT run's (methods, bits, data); its rule trains nothing, so any will do.
  baseline_rule = trained[0] if trained else next(iter(rules.RULES))
  runs = []
  for spec in specs:
    variant = f"w{args.bits}a{args.bits}_{baseline_rule if spec.baseline else spec.rule}"
    common = {**preset.common, **preset.qat, **sets, **qat_sets, **spec.overrides, "init_from": fp_dir}
    if spec.baseline:
      workdir = os.path.join(args.workdir, "runs", slug(f"w{args.bits}a{args.bits}_{spec.label}"))
      seed = seeds(args)[0]
      runs.append(Planned(spec, None, Run(spec.label, workdir, f"{config_path}:{variant}", {**common, "seed": seed},
                                          baseline=spec.rule)))
      continue
    for seed in seeds(args):
      workdir = os.path.join(args.workdir, "runs", slug(f"{variant}{spec.label[len(spec.rule):]}"), f"seed{seed}")
      runs.append(Planned(spec, seed, Run(f"{spec.label} seed {seed}", workdir, f"{config_path}:{variant}",
                                          {**common, "seed": seed})))
  return fp, runs


def _unknown_keys(keys: list[str]) -> list[str]:
  known = set(config_lib.known_keys())
  return [k for k in keys if k not in known and not any(k.startswith(f"{free}.") for free in config_lib.FREE_FORM)]


def resolve_config(config: str, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a run's training command line would train with, loaded in-process and validated.

  Parses ``--config PATH:VARIANT --config.key=value ...`` with ``ml_collections``' own config flag,
  as the training command line does, then :func:`ewgs_jax.config.validate`.

  Args:
    config: ``path.py:variant``.
    overrides: ``{key: value}``, as ``--config.key=value``.

  Returns:
    The validated config; raises ``ValueError`` with one line naming the key for anything the
    training command line would refuse.
  """
  argv = ["compare", "--config", config, *(f"--config.{k}={flag_value(v)}" for k, v in overrides.items())]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "the run's config", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    with warnings.catch_warnings():   # ml_collections loads the config file with a deprecated importlib call
      warnings.filterwarnings("ignore", r"the load_module\(\) method is deprecated", DeprecationWarning)
      values(argv)
  except flags.Error as e:
    message = str(e)
    if "Traceback" in message:   # the config file raised: its last line says why
      message = [line for line in message.splitlines() if line.strip()][-1]
    unknown = _unknown_keys([k.split("=", 1)[0] for k in overrides]) if "Unknown command line flag" in message else []
    raise ValueError(_unknown_message(unknown) if unknown else message.replace("flag --config.", "config.")) from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # raised by ml_collections' overrides
    unknown = _unknown_keys(list(overrides))
    raise ValueError(_unknown_message(unknown) if unknown else f"bad config ({type(e).__name__}: {e})") from None
  config = values.config
  config_lib.validate(config)
  return config


def _unknown_message(keys: list[str]) -> str:
  known = config_lib.known_keys()
  hints = []
  for key in keys:
    close = difflib.get_close_matches(key, known, n=1)
    hints.append(key + (f" (did you mean {close[0]}?)" if close else ""))
  return (f"unknown config key{'s' if len(keys) > 1 else ''} {', '.join(hints)} "
          "(every key with its meaning: python -m ewgs_jax.train --config_keys)")


def check(fp: Run, runs: list[Planned], *, check_fp: bool = True) -> dict[str, ml_collections.ConfigDict]:
  """Resolves and validates every run's config before any trains.

  Args:
    fp: the full-precision run.
    runs: the planned QAT runs and baselines.
    check_fp: whether to check ``fp`` too (not for a given ``--init-from`` run, trained as its user chose).

  Returns:
    ``{run name: config}``; raises ``ValueError`` with one line naming the rule (or ``--set``) and
    the key of the first run whose config the training command line would refuse.
  """
  todo: list[tuple[RuleSpec | None, Run]] = [(None, fp)] if check_fp else []
  todo += [(p.rule, p.run) for p in runs]
  configs = {}
  for rule, run in todo:
    try:
      configs[run.name] = resolve_config(run.config, run.overrides)
    except ValueError as e:
      where = "the full-precision run (from --set or the preset)" if rule is None else f"rule {rule.label!r}"
      raise ValueError(f"{where}: {e}") from None
  return configs
