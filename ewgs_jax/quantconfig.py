"""The quantization setting of a model, in plain Python: per-quantizer specs, per-layer overrides and
the rules' settings.

:class:`QuantConfig` is the network-wide setting (forward method, backward rule and bit width of the
weight and activation quantizers), regular-expression overrides per layer (so mixed precision and
mixed rules need no model edits; :meth:`QuantConfig.resolve` gives a layer's setting), and the
settings of the backward rules (``settings={"pege": {"granularity": "tensor"}}``: each rule's own
config section, :mod:`ewgs_jax.rules`). Method and rule names are checked against the registries.
Knows nothing of Flax.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping

from ewgs_jax import estimators, quantizers, rules

OVERRIDE_KEYS = ("enabled", "bits", "weight_bits", "act_bits", "method", "weight_method", "act_method", "rule",
                 "weight_rule", "act_rule", "weight_per_channel")
_RENAMED_OVERRIDE_KEYS = {"backward": "rule"}   # renamed in 0.2.0; the old name works for one release


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """One quantizer's setting: forward method, backward rule, bit width, per-tensor or per-channel ranges.

  Attributes:
    method: a forward method (:data:`ewgs_jax.quantizers.METHODS`) or ``"none"`` (full precision).
    rule: a backward rule (:data:`ewgs_jax.rules.RULES`).
    bits: the bit width, 1..16.
    per_channel: weights only: one set of learned parameters per output channel (the kernel's last
      axis), each initialised from its channel's weights (EWGS Sec. 4.1's statistics per channel), and
      the layer's output scale alpha per output channel too. Both papers use per-tensor ranges (the
      default); this is our extension. Needs a method with learned parameters (not DoReFa).
  """
  method: str = "interval"
  rule: str = "ste"
  bits: int = 2
  per_channel: bool = False

  def __post_init__(self):
    if self.method != quantizers.NONE:
      quantizers.get_method(self.method)
    rules.get(self.rule)
    estimators.check_bits(self.bits)
    if not isinstance(self.per_channel, bool):
      raise ValueError(f"per_channel={self.per_channel!r} is invalid; valid choices: [False, True]")
    if self.per_channel and self.active and not quantizers.get_method(self.method).params:
      with_params = [name for name, m in quantizers.METHODS.items() if m.params]
      raise ValueError(f"per-channel ranges need a forward method with learned parameters ({', '.join(with_params)}); "
                       f"{self.method!r} has none: use per-tensor ranges (an override: weight_per_channel=False) "
                       "or another method")

  @property
  def active(self) -> bool:
    """Whether the quantizer quantizes (its method is not ``"none"``)."""
    return self.method != quantizers.NONE

  def describe(self) -> str:
    """``"interval/ewgs/2b"`` (``"interval/ewgs/2b/per-channel"``) or ``"fp"``, for logs."""
    if not self.active:
      return "fp"
    return f"{self.method}/{self.rule}/{self.bits}b" + ("/per-channel" if self.per_channel else "")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """The resolved setting of one layer: its weight and activation quantizers."""
  weight: QuantizerSpec
  act: QuantizerSpec

  @property
  def active(self) -> bool:
    """Whether either quantizer quantizes."""
    return self.weight.active or self.act.active

  def rules(self) -> set[str]:
    """The backward rules of the active quantizers."""
    return {spec.rule for spec in (self.weight, self.act) if spec.active}


def _freeze(value: Any) -> Any:
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Network-wide quantization setting, per-layer overrides and the rules' settings.

  Attributes:
    weight: the weight quantizers' setting.
    act: the activation quantizers' setting (per-tensor: ``act.per_channel`` is refused).
    quantize_first_last: quantize the model's first and last layers too (they stay full precision
      otherwise, as both papers; the shipped models and :func:`ewgs_jax.quantize` honour it; a model
      written by hand applies it with :func:`first_last_quant`).
    overrides: ``((regex, {key: value}), ...)``; an override applies to every quantized layer whose
      module path (``"stage1_block0/conv1"``) matches ``re.search(regex, path)``, later ones
      winning. Keys: :data:`OVERRIDE_KEYS` (``enabled=False``: full precision;
      ``weight_per_channel``: :attr:`QuantizerSpec.per_channel` of the weights). An override that
      matches no layer is an error at start-up.
    enabled: ``False`` makes every layer full precision (parameter names unchanged).
    settings: ``{rule name: {key: value}}``: settings of the backward rules, each checked against
      its rule's config section (defaults for the rest).
  """
  weight: QuantizerSpec = QuantizerSpec()
  act: QuantizerSpec = QuantizerSpec()
  quantize_first_last: bool = False
  overrides: Any = ()
  enabled: bool = True
  settings: Any = ()

  def __post_init__(self):
    if self.act.per_channel:
      raise ValueError("per-channel ranges are for weight quantizers only (one range per output channel); the "
                       "activation quantizer is per tensor: set per_channel=False on act")
    frozen = []
    for pattern, given in self.overrides:
      re.compile(pattern)
      given = dict(given)
      for old, new in _RENAMED_OVERRIDE_KEYS.items():
        if old in given:
          warnings.warn(f"override key {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
          given[new] = given.pop(old)
      unknown = set(given) - set(OVERRIDE_KEYS)
      if unknown:
        raise ValueError(f"override {pattern!r} has unknown keys {sorted(unknown)}; valid: {list(OVERRIDE_KEYS)}")
      frozen.append((pattern, tuple(sorted(given.items()))))
    object.__setattr__(self, "overrides", tuple(frozen))
    settings = dict(self.settings)
    for name, values in settings.items():
      rules.get(name).resolve(dict(values))            # unknown rules, keys and bad values raise now
    object.__setattr__(self, "settings", _freeze(settings))
    for pattern, given in self.overrides:   # validates the override values now, not at the first call
      try:
        _apply_overrides(self.weight, self.act, dict(given))
      except ValueError as e:
        raise ValueError(f"override {pattern!r}: {e}") from None

  def resolve(self, path: str) -> LayerQuant:
    """The setting of the layer at ``path`` after every matching override.

    Args:
      path: the layer's module path, ``"stage1_block0/conv1"``.

    Returns:
      Its :class:`LayerQuant`.
    """
    weight, act = self.weight, self.act
    if not self.enabled:
      return LayerQuant(dataclasses.replace(weight, method="none"), dataclasses.replace(act, method="none"))
    for pattern, given in self.overrides:
      if re.search(pattern, path):
        weight, act = _apply_overrides(weight, act, dict(given))
    return LayerQuant(weight, act)

  def unmatched(self, paths) -> list[str]:
    """The override patterns that match none of ``paths``.

    Args:
      paths: module paths of the quantizable layers.

    Returns:
      The patterns, in order.
    """
    paths = list(paths)
    return [pattern for pattern, _ in self.overrides if not any(re.search(pattern, p) for p in paths)]

  def rule_names(self) -> list[str]:
    """Every rule this setting can resolve to: the global ones and those the overrides name.

    Returns:
      Rule names, in registration order.
    """
    if not self.enabled:
      return []
    # A global rule counts when its quantizer is on, or when an override may turn a method on.
    turns_on = any(key in ("method", "weight_method", "act_method") for _, given in self.overrides for key, _ in given)
    named = {spec.rule for spec in (self.weight, self.act) if spec.active or turns_on}
    for _, given in self.overrides:
      named |= {value for key, value in given if key in ("rule", "weight_rule", "act_rule")}
    return [name for name in rules.RULES if name in named]

  def rule_settings(self, name: str) -> dict[str, Any]:
    """The full settings of rule ``name``: its defaults with this config's settings applied.

    Args:
      name: a rule name.

    Returns:
      Every key of the rule's section.
    """
    given = dict(self.settings).get(name, ())
    rule = rules.get(name)
    return rule.resolve({k: dict(v) if rule.settings[k].free_form else v for k, v in dict(given).items()})

  def options(self, name: str) -> rules.RuleOptions:
    """The static options of rule ``name`` the layers read (variant, replacement granularity, ...).

    Args:
      name: a rule name.

    Returns:
      Its :class:`~ewgs_jax.rules.RuleOptions`.
    """
    return _options(self, name)

  def discretizer(self, spec: QuantizerSpec, value=None) -> estimators.Discretizer:
    """The discretizer of a quantizer with this setting.

    Args:
      spec: the quantizer's resolved setting.
      value: its rule's factor (see :meth:`ewgs_jax.rules.Rule.bind`).

    Returns:
      ``(x, bits) -> x_q`` with the rule's variant chosen by its settings.
    """
    return rules.get(spec.rule).bind(value, self.options(spec.rule).variant)


_OPTIONS: dict[tuple[Any, str, int], rules.RuleOptions] = {}


def _options(quant: QuantConfig, name: str) -> rules.RuleOptions:
  """``quant.options(name)``, computed once per setting (layers ask at every trace)."""
  key = (quant.settings, name, id(rules.get(name)))
  if key not in _OPTIONS:
    _OPTIONS[key] = rules.get(name).rule_options(quant.rule_settings(name))
  return _OPTIONS[key]


def _apply_overrides(weight: QuantizerSpec, act: QuantizerSpec, o: dict) -> tuple[QuantizerSpec, QuantizerSpec]:
  """The two quantizer settings after one override."""
  w, a = {}, {}
  for key in ("bits", "method", "rule"):
    if key in o:
      w[key] = a[key] = o[key]
  for key, value in o.items():
    if key.startswith("weight_"):
      w[key[len("weight_"):]] = value
    elif key.startswith("act_"):
      a[key[len("act_"):]] = value
  if o.get("enabled") is False:
    w["method"] = a["method"] = "none"
  return dataclasses.replace(weight, **w), dataclasses.replace(act, **a)


def first_last_quant(quant: QuantConfig | None) -> QuantConfig | None:
  """The setting of a model's first and last layers: full precision unless ``quantize_first_last``.

  Args:
    quant: the model's quantization setting, or ``None``.

  Returns:
    ``quant`` if it is set and ``quant.quantize_first_last``, otherwise ``None``.
  """
  return quant if quant is not None and quant.quantize_first_last else None
