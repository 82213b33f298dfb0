"""The training configuration: every key, its default and meaning, and validation before compiling.

The core keys are defined here, one comment each (``--config_keys`` prints them); each backward rule
adds its own section ``config.<rule>`` from its declared settings (:mod:`ewgs_jax.rules`), so a new
rule brings its keys, meanings and checks with it. Config files (``ewgs_jax/configs``) start from
:func:`default_config` and override what they need. :func:`validate` rejects unknown keys (with a
near-miss suggestion) and invalid values (with the valid choices) before any JAX work starts;
:func:`quant_config` turns the ``quant`` section and the rules' sections into a
:class:`~ewgs_jax.quantconfig.QuantConfig`.

Renamed keys (0.2.0) keep working for one release with a deprecation warning: ``quant.backward`` ->
``quant.rule``, ``quant.rules`` -> ``quant.overrides``, ``delta.*`` -> ``ewgs.*``.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from typing import Any

import ml_collections

from ewgs_jax import quantizers, rules
from ewgs_jax.estimators import MAX_BITS, MIN_BITS
from ewgs_jax.hostmem import MODES as HOST_ALLOCATORS
from ewgs_jax.ops import IMPLS as CONV_IMPLS
from ewgs_jax.quantconfig import QuantConfig, QuantizerSpec

log = logging.getLogger(__name__)
MATMUL_PRECISIONS = ("default", "high", "highest")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "cosine_epochs", "constant")
#: old key -> new key (renamed in 0.2.0; the old ones work for one release, with a warning).
RENAMED = {"quant.backward": "quant.rule", "quant.rules": "quant.overrides",
           **{f"delta.{key}": f"ewgs.{key}" for key in ("mode", "every_epochs", "fixed_value", "hessian_mode", "hvp",
                                                        "num_batches", "batch_size", "max_samples", "tolerance")}}
_PLACEHOLDER_TYPES = {str: str, int: int, float: float, bool: bool, tuple: tuple}


def default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults (the EWGS CIFAR-10 ResNet-20 QAT setting where one applies).

  Returns:
    A new ``ConfigDict``: the core keys below plus one section per registered rule with settings.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0                    # initialisation, data order and PEGE replacement masks
  # Data.
  c.dataset = "digits"          # 'digits' (bundled), 'mnist', 'fashion_mnist' (IDX or tfds), 'npz:PATH', a tfds name
  c.data_dir = ml_collections.config_dict.placeholder(str)   # where the dataset's files are (tfds data_dir, IDX files)
  c.validation_examples = 0     # > 0: hold out this many training examples and evaluate on them, not on test
  c.train_examples = 0          # > 0: train on a fixed subset of this many examples
  c.augment = True              # random crop (and flip where it preserves the image), on the device
  c.batch_size = 256            # global training batch, over all devices and hosts
  c.eval_batch_size = 500       # global evaluation batch
  c.num_epochs = 400            # length of the run in passes over the training split
  c.num_train_steps = -1        # > 0 caps the run at this many steps (tests, benchmarks)
  c.data_workers = 2            # worker processes decoding ImageNet-style images (0: none); threads otherwise
  # Model.
  c.model = "resnet20"          # a name in ewgs_jax.models.MODELS
  c.model_kwargs = ml_collections.ConfigDict()   # the model's keyword arguments (e.g. stage_widths)
  c.half_precision = False      # bfloat16 activations/compute, float32 params
  c.conv_impl = "auto"          # 'fast' custom-VJP conv on CPU, XLA's elsewhere (ewgs_jax.ops)
  c.host_allocator = "auto"     # 'tuned' glibc malloc for XLA:CPU (ewgs_jax.hostmem); applied by train.py
  c.matmul_precision = "default"  # 'default' (TF32 on recent GPUs), 'high', 'highest' (full float32 everywhere)
  c.deterministic = False       # GPU: deterministic XLA ops (bit-exact resume; slower); set by train.py at start
  # Quantization (EWGS Sec. 3.1; PEGE Sec. 3.1).
  c.quant = ml_collections.ConfigDict()
  c.quant.enabled = True        # False: train full precision
  c.quant.weight_method = "interval"   # forward method of the weight quantizers (interval, pact, lsq, dorefa, none)
  c.quant.act_method = "interval"      # forward method of the activation quantizers
  c.quant.weight_bits = 2       # bit width of the weight quantizers
  c.quant.act_bits = 2          # bit width of the activation quantizers
  c.quant.weight_per_channel = False   # weight ranges (and alpha) per output channel, not per tensor (the papers')
  c.quant.rule = "ewgs"         # backward rule of every quantizer: ste | ewgs | pege | any registered rule
  c.quant.quantize_first_last = False   # quantize the first and last layers too (full precision otherwise)
  c.quant.overrides = ()        # ((regex on the layer path, {"bits": 4, "rule": "ste", ...}), ...) per-layer settings
  c.quant.backward = ml_collections.config_dict.placeholder(str)   # deprecated: use quant.rule
  c.quant.rules = ml_collections.config_dict.placeholder(tuple)    # deprecated: use quant.overrides
  c.init_from = ml_collections.config_dict.placeholder(str)   # full-precision workdir to warm start from
  # Optimisers (EWGS Sec. 4.1): network weights and quantizer parameters separately.
  c.optimizer = "adam"          # network weights: adam (CIFAR ResNet-20) | sgd (ImageNet)
  c.learning_rate = 1e-3        # network weights' initial learning rate
  c.momentum = 0.9              # SGD momentum
  c.nesterov = False            # SGD with Nesterov momentum
  c.weight_decay = 1e-4         # coupled L2 on every network parameter (PyTorch's weight_decay)
  c.lr_schedule = "cosine"      # 'cosine' to 0 per step; 'cosine_epochs' per epoch (the official code); 'constant'
  c.quant_learning_rate = 1e-5  # quantizer parameters (bounds, output scale): Adam, no weight decay
  # Checkpoints, logging, distribution.
  c.checkpoint_every_steps = 0  # 0: a checkpoint every epoch only; > 0: also every this many steps
  c.keep_checkpoints = 2        # how many recent checkpoints to keep (plus the best)
  c.log_every_steps = 50        # fetch and log training metrics every this many steps
  c.eval_every_epochs = 1       # evaluate every this many epochs (and at the end)
  c.progress_bar = True         # a progress line on the terminal
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False   # call jax.distributed.initialize (several hosts)
  c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)   # process 0's host:port if not given
  c.distributed.num_processes = ml_collections.config_dict.placeholder(int)   # number of processes, if not given
  c.distributed.process_id = ml_collections.config_dict.placeholder(int)   # this process's index, if not given
  c.distributed.heartbeat_timeout_seconds = 100   # a process silent this long is lost: the others stop (exit 75)
  for rule in rules.RULES.values():   # each rule's own section, from its declared settings
    if rule.settings:
      c[rule.name] = _section(rule)
  c.delta = ml_collections.ConfigDict({old.split(".", 1)[1]: _placeholder(c.ewgs[new.split(".", 1)[1]])
                                       for old, new in RENAMED.items() if old.startswith("delta.")})
  return c


def _placeholder(value):
  return ml_collections.config_dict.placeholder(_PLACEHOLDER_TYPES.get(type(value), object))


def _section(rule: rules.Rule) -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict()
  for key, value in rule.defaults().items():
    if rule.settings[key].free_form:   # every keyword settable from the command line; unset ones are None
      section[key] = ml_collections.ConfigDict({k: (ml_collections.config_dict.placeholder(float) if v is None else v)
                                                for k, v in value.items()})
    else:
      section[key] = value
  return section


def _core_meanings() -> dict[str, str]:
  """``{key: meaning}`` from the comment on each core key's line in :func:`default_config`."""
  meanings = {}
  for line in inspect.getsource(default_config).splitlines():
    match = re.match(r"\s*c\.([\w.]+)\s*=.*?#\s*(.*)$", line)
    if match:
      meanings[match[1]] = match[2].strip()
  return meanings


def meanings() -> dict[str, str]:
  """Every flattened key's meaning: the core keys' comments and the rules' declared settings.

  Returns:
    ``{key: one line}``.
  """
  out = _core_meanings()
  for rule in rules.RULES.values():
    for key, setting in rule.settings.items():
      out[f"{rule.name}.{key}"] = setting.meaning
      if setting.free_form:
        for sub in setting.default:
          out[f"{rule.name}.{key}.{sub}"] = f"{sub}: one of the arguments above ({key})"
  for old, new in RENAMED.items():
    out[old] = f"deprecated: use {new}"
  return out


def describe() -> str:
  """Every config key with its default and meaning (``python train.py --config_keys`` prints this).

  Returns:
    One line per key.
  """
  known = meanings()
  rows = []
  for key, value in _flatten(default_config()).items():
    shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    rows.append((key, repr(shown), known.get(key, "")))
  width = max(len(k) + len(v) for k, v, _ in rows) + 4
  return "\n".join(f"{f'{k} = {v}':<{width}} {m}".rstrip() for k, v, m in rows)


def known_keys() -> list[str]:
  """Every valid (flattened) config key.

  Returns:
    The sorted keys.
  """
  return sorted(_flatten(default_config()))


FREE_FORM = ("model_kwargs",)   # sub-dicts whose keys are forwarded as keyword arguments, checked by their consumer


def unknown_key_message(keys: list[str]) -> str:
  """``unknown config keys: a (did you mean b?), ...`` with where to find the valid ones.

  Args:
    keys: the unknown flattened keys.

  Returns:
    The message, with a close match per key (``difflib``) and the list of valid keys.
  """
  known = known_keys()
  hints = []
  for key in keys:
    close = difflib.get_close_matches(key, known, n=1)
    hints.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
  return (f"unknown config keys: {', '.join(hints)}; valid keys: {', '.join(known)} "
          f"(with defaults and meanings: python train.py --config_keys)")


def migrate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Moves values given under renamed keys (:data:`RENAMED`) to their new keys, warning once each.

  Args:
    config: the config (changed in place; the old keys are reset to ``None``).

  Returns:
    ``config``.
  """
  with config.unlocked():
    for old, new in RENAMED.items():
      old_section, old_key = old.split(".", 1)
      value = config[old_section][old_key] if old_section in config else None
      if value is None:
        continue
      new_section, new_key = new.split(".", 1)
      log.warning("config key %s is deprecated and will be removed; use %s (set %s=%r)", old, new, new, value)
      config[new_section][new_key] = value
      config[old_section][old_key] = None
  return config


def apply_bits_variant(config: ml_collections.ConfigDict, variant: str, suffix: str) -> bool:
  """Sets bits and backward rule from a ``w<bits>a<bits>_<rule>[suffix]`` variant name.

  ``<rule>`` is any registered backward rule (:data:`ewgs_jax.rules.RULES`). A side with 32 bits
  stays full precision (``W1A32``).

  Args:
    config: the config to change in place.
    variant: e.g. ``"w2a2_ewgs"``.
    suffix: an optional suffix the caller handles (e.g. ``"_fixed"``).

  Returns:
    Whether ``suffix`` was present.
  """
  names = "|".join(re.escape(name) for name in sorted(rules.RULES, key=len, reverse=True))
  match = re.fullmatch(rf"w(\d+)a(\d+)_({names})({re.escape(suffix)})?", variant)
  if match is None:
    raise ValueError(f"unknown variant {variant!r}; valid: fp, w<bits>a<bits>_<{'|'.join(rules.RULES)}>"
                     f"[{suffix}]")
  for side, bits in (("weight", int(match[1])), ("act", int(match[2]))):
    if bits == 32:
      config.quant[f"{side}_method"] = "none"
    else:
      config.quant[f"{side}_bits"] = bits
  config.quant.rule = match[3]
  return match[4] is not None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and key not in FREE_FORM:
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"config.{name}={value!r} is invalid; valid choices: {list(choices)}{hint}")


def _positive_int(config, name: str) -> None:
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.{name}={value!r} is invalid; it must be a positive integer")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for unknown keys or invalid values, listing what is valid.

  Renamed keys are migrated first (:func:`migrate`).

  Args:
    config: the full config to check.
  """
  migrate(config)
  known = _flatten(default_config())
  given = _flatten(config)
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(unknown_key_message(unknown))
  from ewgs_jax.models import MODELS  # late import: models pull in Flax
  _choice("model", config.model, sorted(MODELS))
  q = config.quant
  _choice("quant.weight_method", q.weight_method, quantizers.method_names())
  _choice("quant.act_method", q.act_method, quantizers.method_names())
  _choice("quant.rule", q.rule, sorted(rules.RULES))
  for name in ("weight_bits", "act_bits"):
    bits = q[name]
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
      raise ValueError(f"config.quant.{name}={bits!r} is invalid; valid choices: integers {MIN_BITS}..{MAX_BITS}")
  if not isinstance(q.weight_per_channel, bool):
    raise ValueError(f"config.quant.weight_per_channel={q.weight_per_channel!r} is invalid; "
                     "valid choices: [False, True]")
  if q.weight_per_channel and q.weight_method != quantizers.NONE and not quantizers.get_method(q.weight_method).params:
    raise ValueError(f"config.quant.weight_per_channel=True needs a weight method with learned parameters "
                     f"({', '.join(n for n, m in quantizers.METHODS.items() if m.params)}); "
                     f"quant.weight_method={q.weight_method!r} has none: set quant.weight_per_channel=False")
  for rule in rules.RULES.values():
    if rule.settings:
      rule.check(_rule_settings(config, rule))
  if q.enabled:
    try:
      quant_config(config)
    except ValueError as e:
      raise ValueError(f"config.quant: {e}") from None
  _choice("matmul_precision", config.matmul_precision, MATMUL_PRECISIONS)
  for name in ("validation_examples", "train_examples", "seed"):
    if isinstance(config[name], bool) or not isinstance(config[name], int) or config[name] < 0:
      raise ValueError(f"config.{name}={config[name]!r} is invalid; it must be an integer >= 0")
  _choice("optimizer", config.optimizer, OPTIMIZERS)
  _choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
  _choice("conv_impl", config.conv_impl, CONV_IMPLS)
  _choice("host_allocator", config.host_allocator, HOST_ALLOCATORS)
  for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "keep_checkpoints",
               "eval_every_epochs"):
    _positive_int(config, name)
  if config.init_from and not config.quant.enabled:
    raise ValueError(f"config.init_from={config.init_from!r} is set on a full-precision run "
                     "(quant.enabled=False), which does not warm start; drop init_from, or enable quant")
  for name in ("learning_rate", "quant_learning_rate", "weight_decay"):
    if config[name] < 0:
      raise ValueError(f"config.{name}={config[name]!r} is invalid; it must be >= 0")


def _rule_settings(config: ml_collections.ConfigDict, rule: rules.Rule) -> dict[str, Any]:
  section = config[rule.name].to_dict()
  return {k: ({sub: v for sub, v in value.items()} if rule.settings[k].free_form else value)
          for k, value in section.items()}


def quant_config(config: ml_collections.ConfigDict) -> QuantConfig | None:
  """The model's quantization setting from ``config.quant`` and the rules' sections.

  Args:
    config: the run's config.

  Returns:
    The :class:`~ewgs_jax.quantconfig.QuantConfig`, or ``None`` for a full-precision run.
  """
  migrate(config)
  q = config.quant
  if not q.enabled:
    return None
  return QuantConfig(
      weight=QuantizerSpec(method=q.weight_method, rule=q.rule, bits=q.weight_bits, per_channel=q.weight_per_channel),
      act=QuantizerSpec(method=q.act_method, rule=q.rule, bits=q.act_bits),
      quantize_first_last=q.quantize_first_last,
      overrides=tuple((pattern, dict(values)) for pattern, values in q.overrides),
      settings={rule.name: _rule_settings(config, rule) for rule in rules.RULES.values() if rule.settings})

