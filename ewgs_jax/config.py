"""The training configuration: every key, its default, and validation that fails before compiling.

Config files in ``configs/`` start from :func:`default_config` and override what they need, so the
set of keys is defined in one place. :func:`validate` rejects unknown keys (with a near-miss
suggestion) and invalid values (with the list of valid choices) before any JAX work starts.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import ml_collections

from ewgs_jax import estimators, quantizers, schedules
from ewgs_jax.estimators import MAX_BITS, MIN_BITS, PEGE_MU_SCALES
from ewgs_jax.hessian import HESSIAN_MODES, HVP_METHODS
from ewgs_jax.hostmem import MODES as HOST_ALLOCATORS
from ewgs_jax.ops import IMPLS as CONV_IMPLS
from ewgs_jax.quantconfig import FACTOR_TARGETS
from ewgs_jax.replacement import GRANULARITIES
from ewgs_jax.schedules import DELTA_MODES, MU_SCHEDULES, RATE_SCHEDULES

PEGE_MU_MAX = 1e-2   # in units of 3 sigma(g_q): chosen by the Fashion-MNIST sweep (README, "Calibration")
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
MATMUL_PRECISIONS = ("default", "high", "highest")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "constant")


def default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults (the EWGS CIFAR-10 ResNet-20 QAT setting where one applies)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                    # initialisation, data order and PEGE replacement masks
  # Data.
  c.dataset = "digits"          # 'digits' (bundled), 'mnist'/'fashion_mnist' (IDX files or tfds), 'npz:PATH', any tfds name
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.validation_examples = 0     # > 0: hold out this many training examples and evaluate on them, not on test
  c.train_examples = 0          # > 0: train on a fixed subset of this many examples
  c.augment = True
  c.batch_size = 256            # global, over all devices and hosts
  c.eval_batch_size = 500
  c.num_epochs = 400
  c.num_train_steps = -1        # > 0 caps the run (tests, benchmarks)
  c.data_workers = 2
  # Model.
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict()
  c.half_precision = False      # bfloat16 activations/compute, float32 params
  c.conv_impl = "auto"          # 'fast' custom-VJP conv on CPU, XLA's elsewhere
  c.host_allocator = "auto"     # 'tuned' glibc malloc for XLA:CPU (ewgs_jax.hostmem); applied by train.py
  c.matmul_precision = "default"  # 'default' (TF32 on recent GPUs), 'high', 'highest' (full float32 everywhere)
  c.deterministic = False       # GPU: deterministic XLA ops (bit-exact resume; slower); set by train.py at start
  # Quantization (EWGS Sec. 3.1; PEGE Sec. 3.1). quant.enabled=False trains full precision.
  c.quant = ml_collections.ConfigDict()
  c.quant.enabled = True
  c.quant.weight_method = "interval"
  c.quant.act_method = "interval"
  c.quant.weight_bits = 2
  c.quant.act_bits = 2
  c.quant.backward = "ewgs"     # ste | ewgs | pege | any rule in estimators.RULES
  c.quant.quantize_first_last = False
  c.quant.rules = ()            # ((regex, {"bits": 4, ...}), ...) per-layer overrides
  c.init_from = ml_collections.config_dict.placeholder(str)   # full-precision workdir to warm start
  # EWGS delta (EWGS Sec. 3.2, 4.1): Hessian refresh every k epochs, delta = 0 before the first.
  c.delta = ml_collections.ConfigDict()
  c.delta.mode = "hessian"      # hessian | fixed | off
  c.delta.every_epochs = 10
  c.delta.fixed_value = 1e-3    # EWGS Table 4 "fixed"
  c.delta.hessian_mode = "joint"
  c.delta.hvp = "linearize"      # 'linearize': one gradient pass per batch, HVPs reuse it; 'jvp': less memory
  c.delta.num_batches = 3
  c.delta.batch_size = 256
  c.delta.max_samples = 50
  c.delta.tolerance = 1e-3
  # PEGE (PEGE Sec. 3.2). The paper gives no values for B, b, k, mu_max. Ramps are fractions of the
  # run (so a 10-epoch and a 400-epoch run follow the same curriculum): p starts at log_10(2) = 0.3
  # and reaches 1 at 10 % of the run; mu reaches 99 % of mu_max at 10 %. rate_ramp / mu_ramp = 0
  # takes the paper's per-step constants from rate_kwargs (base, k, b) / mu_kwargs (mu_max, k).
  # mu_scale 'gradient': mu in units of 3 sigma(g_q) per quantizer (invariant to loss scale, batch
  # and layer size; estimators.pege_relative); 'absolute': PEGE Eq. 5 as written.
  c.pege = ml_collections.ConfigDict()
  c.pege.rate_schedule = "logarithmic"
  c.pege.rate_kwargs = ml_collections.ConfigDict({"base": 10.0, "b": 2.0})
  c.pege.rate_ramp = 0.1
  c.pege.mu_schedule = "exponential"
  c.pege.mu_kwargs = ml_collections.ConfigDict({"mu_max": PEGE_MU_MAX})
  c.pege.mu_ramp = 0.1
  c.pege.mu_scale = "gradient"
  c.pege.mu_on = "both"         # quantizers that get the mu term: both (PEGE Eq. 5: weights/activations) | weights | activations
  c.pege.granularity = "element"
  c.pege.rng_impl = "threefry2x32"  # PRNG of the replacement masks: threefry2x32 | rbg | unsafe_rbg (cheaper)
  # Optimisers (EWGS Sec. 4.1): network weights and quantizer parameters separately.
  c.optimizer = "adam"          # adam (CIFAR ResNet-20) | sgd (ImageNet)
  c.learning_rate = 1e-3
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.lr_schedule = "cosine"      # cosine decay to 0 over the run
  c.quant_learning_rate = 1e-5  # Adam, no weight decay
  # Checkpoints, logging, distribution.
  c.checkpoint_every_steps = 0  # 0: every epoch
  c.keep_checkpoints = 2
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.progress_bar = True
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
  c.distributed.process_id = ml_collections.config_dict.placeholder(int)
  c.distributed.heartbeat_timeout_seconds = 100   # a process silent this long is lost: the others stop (exit 75)
  return c


def describe() -> str:
  """Every config key with its default and meaning (from the comments in :func:`default_config`).

  A key without its own comment gets its section's (the comment line above a group of keys).
  ``python train.py --config_keys`` prints this.
  """
  import inspect
  meanings: dict[str, str] = {}
  section, in_comment = "", False
  for line in inspect.getsource(default_config).splitlines():
    stripped = line.strip()
    if stripped.startswith("#"):   # a section comment, possibly over several lines
      text = stripped.lstrip("# ").rstrip()
      section, in_comment = (f"{section} {text}" if in_comment else text), True
      continue
    in_comment = False
    match = re.match(r"c\.([\w.]+)\s*=\s*(.*?)\s*(?:#\s*(.*))?$", stripped)
    if match:
      meanings[match[1]] = match[3] or section
  rows = []
  for key, value in _flatten(default_config()).items():
    meaning = meanings.get(key) or meanings.get(key.rsplit(".", 1)[0], "")
    rows.append((key, repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value), meaning))
  width = max(len(k) + len(v) for k, v, _ in rows) + 4
  return "\n".join(f"{f'{k} = {v}':<{width}} {m}".rstrip() for k, v, m in rows)


def known_keys() -> list[str]:
  """Every valid (flattened) config key."""
  return sorted(_flatten(default_config()))


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


def pege_schedules(pege: ml_collections.ConfigDict, total_steps: int):
  """``(p_T, mu_T)`` step functions from ``config.pege`` for a run of ``total_steps`` (PEGE Eq. 4, Sec. 3.2).

  A ramp given as a fraction of the run (``rate_ramp``, ``mu_ramp`` > 0) ends at
  ``max(1, round(fraction * total_steps))``; a ramp of 0 uses the per-step constants in the kwargs.

  Args:
    pege: the ``config.pege`` section.
    total_steps: the run's number of training steps.

  Returns:
    ``(rate_fn, mu_fn)``, each mapping a step to ``p_T`` and ``mu_T`` respectively.
  """
  def build(kind, kwargs, ramp, absolute, over):
    kwargs = dict(kwargs)
    if ramp > 0:
      return over(kind, max(1, round(ramp * total_steps)), **kwargs)
    return absolute(kind, **kwargs)

  return (build(pege.rate_schedule, pege.rate_kwargs, pege.rate_ramp, schedules.rate_schedule,
                schedules.rate_schedule_over),
          build(pege.mu_schedule, pege.mu_kwargs, pege.mu_ramp, schedules.mu_schedule,
                schedules.mu_schedule_over))


def apply_bits_variant(config: ml_collections.ConfigDict, variant: str, suffix: str) -> bool:
  """Sets bits and backward rule from a ``w<bits>a<bits>_<rule>[suffix]`` variant name.

  ``<rule>`` is any registered backward rule (:data:`ewgs_jax.estimators.RULES`). A side with 32
  bits stays full precision (``W1A32``). Rules whose factor lives in ``quant_state`` (EWGS) get
  Hessian deltas, the others none.

  Args:
    config: the config to change in place.
    variant: e.g. ``"w2a2_ewgs"``.
    suffix: an optional suffix the caller handles (e.g. ``"_ft"``).

  Returns:
    Whether ``suffix`` was present.
  """
  rules = "|".join(re.escape(name) for name in sorted(estimators.RULES, key=len, reverse=True))
  match = re.fullmatch(rf"w(\d+)a(\d+)_({rules})({re.escape(suffix)})?", variant)
  if match is None:
    raise ValueError(f"unknown variant {variant!r}; valid: fp, w<bits>a<bits>_<{'|'.join(estimators.RULES)}>"
                     f"[{suffix}]")
  for side, bits in (("weight", int(match[1])), ("act", int(match[2]))):
    if bits == 32:
      config.quant[f"{side}_method"] = "none"
    else:
      config.quant[f"{side}_bits"] = bits
  config.quant.backward = match[3]
  # delta.mode stays "hessian": the refresh runs only where a layer's resolved rule reads quant_state
  # (EWGS), so it costs nothing in STE/PEGE runs and a per-layer EWGS rule under them still gets delta.
  config.delta.mode = "hessian"
  return match[4] is not None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and key not in _FREE_FORM:
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


# Sub-dicts whose keys are forwarded as keyword arguments and checked by their consumer.
_FREE_FORM = ("model_kwargs", "rate_kwargs", "mu_kwargs")


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config.{name}={value!r} is invalid; valid choices: {list(choices)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` for unknown keys or invalid values, listing what is valid.

  Args:
    config: the full config to check.
  """
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
  _choice("quant.backward", q.backward, sorted(estimators.RULES))
  for name in ("weight_bits", "act_bits"):
    bits = q[name]
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
      raise ValueError(f"config.quant.{name}={bits!r} is invalid; valid choices: integers {MIN_BITS}..{MAX_BITS}")
  _choice("delta.mode", config.delta.mode, DELTA_MODES)
  _choice("delta.hessian_mode", config.delta.hessian_mode, HESSIAN_MODES)
  _choice("delta.hvp", config.delta.hvp, HVP_METHODS)
  _choice("pege.rate_schedule", config.pege.rate_schedule, sorted(RATE_SCHEDULES))
  _choice("pege.mu_schedule", config.pege.mu_schedule, sorted(MU_SCHEDULES))
  _choice("pege.granularity", config.pege.granularity, GRANULARITIES)
  _choice("pege.mu_scale", config.pege.mu_scale, sorted(PEGE_MU_SCALES))
  _choice("pege.rng_impl", config.pege.rng_impl, RNG_IMPLS)
  _choice("pege.mu_on", config.pege.mu_on, FACTOR_TARGETS)
  _choice("matmul_precision", config.matmul_precision, MATMUL_PRECISIONS)
  for name in ("rate_ramp", "mu_ramp"):
    if not 0.0 <= config.pege[name] <= 1.0:
      raise ValueError(f"config.pege.{name}={config.pege[name]!r} is invalid; it must be a fraction of the run "
                       "in (0, 1], or 0 for the per-step constants in the kwargs")
  try:
    pege_schedules(config.pege, total_steps=1000)
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"config.pege schedules are invalid: {e}") from None
  for name in ("validation_examples", "train_examples"):
    if not isinstance(config[name], int) or config[name] < 0:
      raise ValueError(f"config.{name}={config[name]!r} is invalid; it must be an integer >= 0")
  _choice("optimizer", config.optimizer, OPTIMIZERS)
  _choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
  _choice("conv_impl", config.conv_impl, CONV_IMPLS)
  _choice("host_allocator", config.host_allocator, HOST_ALLOCATORS)
  for name in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "keep_checkpoints",
               "eval_every_epochs"):
    if not isinstance(config[name], int) or config[name] <= 0:
      raise ValueError(f"config.{name}={config[name]!r} is invalid; it must be a positive integer")
  if config.delta.every_epochs <= 0 or config.delta.num_batches <= 0 or config.delta.max_samples <= 0:
    raise ValueError("config.delta.every_epochs, num_batches and max_samples must be positive integers")
  if config.init_from and not config.quant.enabled:
    raise ValueError(f"config.init_from={config.init_from!r} is set on a full-precision run "
                     "(quant.enabled=False), which does not warm start; drop init_from, or enable quant")
  for name in ("learning_rate", "quant_learning_rate", "weight_decay"):
    if config[name] < 0:
      raise ValueError(f"config.{name}={config[name]!r} is invalid; it must be >= 0")


def load_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """A shipped config, as ``train.py --config configs/<name>.py:<variant>`` loads it.

  Args:
    name: a module of :mod:`ewgs_jax.configs` (``"cifar10_resnet20"``, ``"quickstart"``, ...).
    variant: the variant argument of its ``get_config`` (``"w2a2_ewgs"``, ``"fp"``, ...).

  Returns:
    The config.
  """
  import importlib
  from ewgs_jax import configs
  if name not in configs.NAMES:
    raise ValueError(f"unknown config {name!r}; valid choices: {list(configs.NAMES)}")
  return importlib.import_module(f"ewgs_jax.configs.{name}").get_config(variant)
