"""The quantization setting of a model, in plain Python: per-quantizer specs and per-layer rules.

:class:`QuantConfig` is the network-wide setting (forward method, backward rule and bit width of the
weight and activation quantizers) plus regular-expression rules that override it per layer, so mixed
precision and mixed rules need no model edits. :meth:`QuantConfig.resolve` gives a layer's setting.
Method and rule names are checked against the registries (:data:`ewgs_jax.quantizers.METHODS`,
:data:`ewgs_jax.estimators.RULES`). Knows nothing of Flax.
"""

from __future__ import annotations

import dataclasses
import re

from ewgs_jax import estimators, quantizers, replacement

FACTOR_TARGETS = ("both", "weights", "activations")
OVERRIDE_KEYS = ("enabled", "bits", "weight_bits", "act_bits", "method", "weight_method", "act_method",
                 "backward")


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """One quantizer's setting: forward method, backward rule, bit width."""
  method: str = "interval"
  backward: str = "ste"
  bits: int = 2

  def __post_init__(self):
    if self.method != quantizers.NONE:
      quantizers.get_method(self.method)
    estimators.get_rule(self.backward)
    estimators.check_bits(self.bits)

  @property
  def active(self) -> bool:
    return self.method != quantizers.NONE

  @property
  def rule(self) -> estimators.BackwardRule:
    """The registered backward rule (:data:`ewgs_jax.estimators.RULES`)."""
    return estimators.get_rule(self.backward)


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """The resolved setting of one layer."""
  weight: QuantizerSpec
  act: QuantizerSpec

  @property
  def active(self) -> bool:
    return self.weight.active or self.act.active


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Network-wide quantization setting plus per-layer rules.

  ``rules`` is a sequence of ``(regex, overrides)``; a rule applies to every quantizable layer whose
  module path (``"stage1_block0/conv1"``) matches ``re.search(regex, path)``, later rules winning.
  ``overrides`` keys: ``enabled`` (False = full precision), ``bits``, ``weight_bits``, ``act_bits``,
  ``method``, ``weight_method``, ``act_method``, ``backward``. First and last layers of a model stay
  full precision unless ``quantize_first_last``. ``enabled=False`` makes every layer full precision
  (parameter names unchanged).
  """
  weight: QuantizerSpec = QuantizerSpec()
  act: QuantizerSpec = QuantizerSpec()
  quantize_first_last: bool = False
  rules: tuple = ()
  replacement_granularity: str = replacement.DEFAULT_GRANULARITY
  enabled: bool = True
  pege_mu_scale: str = "gradient"   # estimators.PEGE_MU_SCALES: 'gradient' (mu in 3 sigma(g) units) | 'absolute'
  rule_variants: tuple = ()         # ((rule name, variant name), ...): BackwardRule.variants to use
  context_factor_on: str = "both"   # quantizers whose per-step factor (PEGE mu) is applied: both | weights | activations

  def __post_init__(self):
    frozen = []
    for pattern, overrides in self.rules:
      re.compile(pattern)
      overrides = dict(overrides)
      unknown = set(overrides) - set(OVERRIDE_KEYS)
      if unknown:
        raise ValueError(f"rule {pattern!r} has unknown keys {sorted(unknown)}; valid: {list(OVERRIDE_KEYS)}")
      frozen.append((pattern, tuple(sorted(overrides.items()))))
    object.__setattr__(self, "rules", tuple(frozen))
    replacement.check_granularity(self.replacement_granularity)
    if self.pege_mu_scale not in estimators.PEGE_MU_SCALES:
      raise ValueError(f"unknown pege_mu_scale {self.pege_mu_scale!r}; valid: {sorted(estimators.PEGE_MU_SCALES)}")
    if self.context_factor_on not in FACTOR_TARGETS:
      raise ValueError(f"unknown context_factor_on {self.context_factor_on!r}; valid: {list(FACTOR_TARGETS)}")
    variants = dict(self.rule_variants)
    variants.setdefault("pege", self.pege_mu_scale)   # the PEGE rule's variants are its mu scales
    for rule, variant in variants.items():
      estimators.get_rule(rule).bind(variant=variant)   # raises for an unknown rule or variant
    object.__setattr__(self, "rule_variants", tuple(sorted(variants.items())))
    for _, overrides in self.rules:  # validates the override values now, not at the first call
      _apply_overrides(self.weight, self.act, dict(overrides))

  def factor_applies(self, kind: str) -> bool:
    """Whether the per-step factor of a ``context`` rule (PEGE's mu) reaches quantizer ``kind``
    (``"w"`` weights, ``"a"`` activations); elsewhere the factor is 0."""
    return self.context_factor_on == "both" or self.context_factor_on == {"w": "weights", "a": "activations"}[kind]

  def resolve(self, path: str) -> LayerQuant:
    """The setting of the layer at ``path`` after every matching rule."""
    weight, act = self.weight, self.act
    if not self.enabled:
      return LayerQuant(dataclasses.replace(weight, method="none"), dataclasses.replace(act, method="none"))
    for pattern, overrides in self.rules:
      if re.search(pattern, path):
        weight, act = _apply_overrides(weight, act, dict(overrides))
    return LayerQuant(weight, act)

  def discretizer(self, spec: QuantizerSpec, value=None) -> estimators.Discretizer:
    """The discretizer of a quantizer with this setting.

    Args:
      spec: the quantizer's resolved setting.
      value: its rule's hyper-parameter (see :meth:`ewgs_jax.estimators.BackwardRule.bind`).

    Returns:
      ``(x, bits) -> x_q`` with the rule's variant chosen by ``rule_variants``.
    """
    return spec.rule.bind(value, dict(self.rule_variants).get(spec.backward))


def _apply_overrides(weight: QuantizerSpec, act: QuantizerSpec, o: dict) -> tuple[QuantizerSpec, QuantizerSpec]:
  """The two quantizer settings after one rule's overrides."""
  w, a = {}, {}
  if "bits" in o:
    w["bits"] = a["bits"] = o["bits"]
  if "method" in o:
    w["method"] = a["method"] = o["method"]
  if "backward" in o:
    w["backward"] = a["backward"] = o["backward"]
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
