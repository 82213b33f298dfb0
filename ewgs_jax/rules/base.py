"""The rule contract: everything a backward rule declares, and the registry that layers, config,
training, compare and reporting read.

A *rule* is a gradient estimator for the rounding step: its discretizer (the forward rounding of
EWGS Eq. 2 with the rule's backward pass as a ``jax.custom_vjp``) plus the machinery it needs around
it. A rule is one module plus one :func:`register` call; nothing else in the library names it:

* ``factor`` / ``source``: the discretizer's hyper-parameter and where it comes from: ``"none"``,
  a ``"constant"``, per-quantizer ``"quant_state"`` written only by the rule's own action (EWGS's
  delta), or the per-step ``"context"`` computed by the rule's own ``step_factors`` (PEGE's mu_T).
  A factor that nothing provides is refused when the rule is registered or, for a config that
  does not provide it, at start-up (:func:`check_provided`), never a silent 0.
* ``settings``: its config section ``config.<name>`` (default, one-line meaning and check per key)
  and ``validate`` for checks across keys; ``options`` turns the section into the static
  :class:`RuleOptions` the layers read.
* ``step_factors``: ``(settings, total_steps) -> {name: step -> value}`` (PEGE: mu_T, p_T).
  ``replacement`` names the step factor that is a replacement rate p_T (PEGE Eq. 3); the layers
  then mix full-precision values in at that rate.
* ``actions``: between-step :class:`Action` s (EWGS: the delta refresh and when it is due).
* ``traces``: the metrics worth plotting over a run (compare's ``traces.png``).

Metric keys are ``"<rule>/<name>"`` (:func:`metric_key`), so the training program, the metrics
files and the comparison need no edit for a new rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax

Array = jax.Array

FACTOR_SOURCES = ("none", "constant", "quant_state", "context")
FACTOR_TARGETS = ("both", "weights", "activations")
KIND_TARGET = {"w": "weights", "a": "activations"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One key of a rule's config section.

  Attributes:
    default: its default value (a dict for a free-form group of keyword arguments).
    meaning: one line for ``--config_keys``.
    choices: the valid values, if it is a choice.
    check: ``check(value) -> message or None``: a further check of the value alone.
  """
  default: Any
  meaning: str
  choices: Sequence[Any] | None = None
  check: Callable[[Any], str | None] | None = None

  @property
  def free_form(self) -> bool:
    """Whether the value is a dict of keyword arguments checked by its consumer."""
    return isinstance(self.default, dict)


@dataclasses.dataclass(frozen=True)
class RuleOptions:
  """The static part of a rule's settings that the quantized layers read (hashable).

  Attributes:
    variant: which of the rule's ``variants`` discretizers to use (``None``: the default one).
    granularity: the replacement granularity (PEGE Eq. 3; :mod:`ewgs_jax.replacement`).
    factor_on: which quantizers get the rule's per-step factor: ``both``, ``weights`` or
      ``activations`` (0 elsewhere).
    rng_impl: the PRNG of the per-step replacement key (``threefry2x32``, ``rbg``, ``unsafe_rbg``).
  """
  variant: str | None = None
  granularity: str = "element"
  factor_on: str = "both"
  rng_impl: str = "threefry2x32"

  def factor_applies(self, kind: str) -> bool:
    """Whether the per-step factor reaches quantizer ``kind`` (``"w"`` or ``"a"``).

    Args:
      kind: ``"w"`` or ``"a"``.

    Returns:
      True if ``factor_on`` is ``both`` or names that kind.
    """
    return self.factor_on in ("both", KIND_TARGET[kind])


@dataclasses.dataclass(frozen=True)
class Clock:
  """Where a run stands, for deciding whether an action is due.

  Attributes:
    step: training steps done.
    steps_per_epoch: steps in one epoch (a user's loop without epochs may pass its run length).
    total_steps: the run's length.
  """
  step: int
  steps_per_epoch: int
  total_steps: int


@dataclasses.dataclass(frozen=True)
class ActionInput:
  """What an action gets when it runs (:meth:`ewgs_jax.qat.QAT.run_due`).

  Attributes:
    clock: the run's position.
    state: the pytree that holds the model's variables (Linen variables, an ``nnx.State``, ...).
    loss_fn: ``loss_fn(state, batch) -> scalar``, the user's training loss without the per-step
      context (no replacement).
    batches: the batches to use (it reads at most the action's ``num_batches``; it may get fewer).
    key: a random key for the action.
    stop: polled between units of work; when it returns True the action gives up and returns the
      state unchanged (a preemption during a long action).
  """
  clock: Clock
  state: Any
  loss_fn: Callable[[Any, Any], Array]
  batches: Iterable[Any]
  key: Any
  stop: Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class Action:
  """A rule's between-step action.

  Attributes:
    name: its name, unique within the rule (metrics and logs say ``<rule>/<name>``).
    due: ``due(clock) -> bool``: whether it runs before step ``clock.step``.
    run: ``run(ActionInput) -> (state, metrics)``; ``state`` is ``None`` when it was stopped. An
      action writes only the ``quant_state`` collection (the rules' per-quantizer state): the
      training program keeps that collection of the returned state and nothing else.
    batch_size: the batch size it wants (``None``: batches of the training batch size).
    num_batches: how many batches it reads at most (it may be given fewer; 0: none).
    describe: one line saying what it does, for the progress messages.
  """
  name: str
  due: Callable[[Clock], bool]
  run: Callable[[ActionInput], tuple[Any, Mapping[str, float]]]
  batch_size: int | None = None
  num_batches: int = 0
  describe: str = ""


@dataclasses.dataclass(frozen=True)
class Trace:
  """A metric worth plotting over a run (the comparison's ``traces.png``).

  Attributes:
    metric: the metric's key (``"<rule>/<name>"``).
    title: the panel's title.
    ylabel: the y axis label.
  """
  metric: str
  title: str
  ylabel: str


@dataclasses.dataclass(frozen=True)
class Rule:
  """A backward rule and its machinery (see the module docstring).

  Attributes:
    name: the name configs and per-layer rules use (``quant.rule``), a lower-case identifier.
    discretizer: ``discretizer(x, bits, **{factor: value})`` (``discretizer(x, bits)`` without a
      factor), with the contract of :data:`ewgs_jax.estimators.Discretizer`.
    factor: the keyword of its hyper-parameter, ``None`` for none.
    source: where the hyper-parameter comes from, one of :data:`FACTOR_SOURCES`.
    value: the hyper-parameter for ``source="constant"`` (required there, unused otherwise).
    variants: alternative discretizers chosen by ``RuleOptions.variant``.
    settings: its config section, ``{key: Setting}``.
    validate: ``validate(settings)``: raises ``ValueError`` for a bad combination of keys.
    options: ``options(settings) -> RuleOptions`` for the layers (default: ``RuleOptions()``).
    step_factors: ``step_factors(settings, total_steps) -> {name: step -> value}``.
    replacement: the step factor that is a replacement rate (PEGE Eq. 3), or ``None``.
    actions: ``actions(settings) -> [Action, ...]``.
    traces: metrics worth plotting over a run.
    summary: one line saying what the rule is (help texts).
  """
  name: str
  discretizer: Callable[..., Array]
  factor: str | None = None
  source: str = "none"
  value: float | None = None
  variants: Mapping[str, Callable[..., Array]] = dataclasses.field(default_factory=dict)
  settings: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
  validate: Callable[[Mapping[str, Any]], None] | None = None
  options: Callable[[Mapping[str, Any]], RuleOptions] | None = None
  step_factors: Callable[[Mapping[str, Any], int], Mapping[str, Callable]] | None = None
  replacement: str | None = None
  actions: Callable[[Mapping[str, Any]], Sequence[Action]] | None = None
  traces: Sequence[Trace] = ()
  summary: str = ""

  def __post_init__(self):
    if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
      raise ValueError(f"rule names are lower-case identifiers, got {self.name!r}")
    if self.source not in FACTOR_SOURCES:
      raise ValueError(f"rule {self.name!r}: unknown factor source {self.source!r}; valid: {list(FACTOR_SOURCES)}")
    if (self.factor is None) != (self.source == "none"):
      raise ValueError(f"rule {self.name!r}: a factor needs a source other than 'none', and 'none' no factor")
    if self.source == "constant" and self.value is None:
      raise ValueError(f"rule {self.name!r}: its factor {self.factor!r} is a constant, but no value is given")
    if self.source == "context" and self.step_factors is None:
      raise ValueError(f"rule {self.name!r}: its factor {self.factor!r} comes from the per-step context, but the "
                       "rule declares no step_factors to compute it")
    if self.source == "quant_state" and self.actions is None:
      raise ValueError(f"rule {self.name!r}: its factor {self.factor!r} lives in quant_state, but the rule declares "
                       "no actions to write it")
    if self.replacement is not None and self.step_factors is None:
      raise ValueError(f"rule {self.name!r}: replacement rate {self.replacement!r} needs step_factors")

  # --- settings ---------------------------------------------------------------------------------

  def defaults(self) -> dict[str, Any]:
    """The default settings (a fresh dict)."""
    return {key: (dict(s.default) if s.free_form else s.default) for key, s in self.settings.items()}

  def resolve(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full, checked settings: the defaults with ``overrides`` applied.

    Args:
      overrides: some keys of the section (unknown keys raise ``ValueError`` with a near miss).

    Returns:
      Every key of the section.
    """
    settings = self.defaults()
    for key, value in (overrides or {}).items():
      if key not in self.settings:
        close = difflib.get_close_matches(key, list(self.settings), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"rule {self.name!r} has no setting {key!r}{hint}; valid: {sorted(self.settings)}")
      settings[key] = dict(value) if self.settings[key].free_form else value
    self.check(settings)
    return settings

  def check(self, settings: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming ``config.<rule>.<key>``, the valid values and the fix.

    Args:
      settings: a full section.
    """
    for key, spec in self.settings.items():
      value = settings[key]
      if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"config.{self.name}.{key}={value!r} is invalid; valid choices: {list(spec.choices)}")
      problem = spec.check(value) if spec.check is not None else None
      if problem:
        raise ValueError(f"config.{self.name}.{key}={value!r} is invalid: {problem}")
    if self.validate is not None:
      self.validate(settings)

  def rule_options(self, settings: Mapping[str, Any]) -> RuleOptions:
    """The static options the layers read, from full settings.

    Args:
      settings: a full section (:meth:`resolve`).

    Returns:
      ``self.options(settings)``, or the default :class:`RuleOptions`.
    """
    return self.options(settings) if self.options is not None else RuleOptions()

  # --- the discretizer ----------------------------------------------------------------------------

  def bind(self, value=None, variant: str | None = None) -> Callable[[Array, int], Array]:
    """The discretizer ``(x, bits) -> x_q`` with its hyper-parameter bound.

    Args:
      value: the hyper-parameter (an array, traced); ignored for ``source="none"``; for
        ``"constant"``, ``None`` means ``self.value``.
      variant: a name in ``variants``; ``None`` for ``discretizer``.

    Returns:
      The bound discretizer.
    """
    fn = self.discretizer
    if variant is not None:
      try:
        fn = self.variants[variant]
      except KeyError:
        raise ValueError(f"rule {self.name!r} has no variant {variant!r}; valid: {sorted(self.variants)}") from None
    if self.factor is None:
      return fn
    if value is None:
      if self.source != "constant":
        raise ValueError(f"rule {self.name!r}: no value for its factor {self.factor!r}")
      value = self.value
    return functools.partial(fn, **{self.factor: value})


#: The registered rules by name, in registration order. Add one with :func:`register`.
RULES: dict[str, Rule] = {}


def register(rule: Rule, *, replace: bool = False) -> Rule:
  """Makes a rule available to the layers, configs (``quant.rule``, per-layer rules), training and compare.

  Args:
    rule: the rule.
    replace: allow replacing a registered rule of the same name.

  Returns:
    ``rule``, so the call can be used as an expression.
  """
  if rule.name in RULES and not replace:
    raise ValueError(f"rule {rule.name!r} is already registered")
  rule.check(rule.defaults())   # a rule's own defaults must pass its checks
  RULES[rule.name] = rule
  return rule


def unregister(name: str) -> None:
  """Removes a registered rule (tests and notebooks that register temporary rules).

  Args:
    name: the rule's name.
  """
  RULES.pop(name, None)


def get(name: str) -> Rule:
  """Looks a rule up by name.

  Args:
    name: a registered name.

  Returns:
    The :class:`Rule`.

  Raises:
    ValueError: listing the registered names (and a near miss).
  """
  try:
    return RULES[name]
  except KeyError:
    close = difflib.get_close_matches(str(name), list(RULES), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"unknown rule {name!r}{hint}; valid choices: {sorted(RULES)}") from None


def metric_key(rule: str, name: str) -> str:
  """The key of a rule's metric in the training metrics (``"pege/mu"``).

  Args:
    rule: the rule's name.
    name: the metric's name within the rule.

  Returns:
    ``"<rule>/<name>"``.
  """
  return f"{rule}/{name}"


def check_provided(rule: Rule, factors: Mapping[str, Any]) -> None:
  """Refuses a rule whose per-step factor its step factors do not provide.

  Args:
    rule: the rule.
    factors: what its ``step_factors`` returned.

  Raises:
    ValueError: one line naming the rule, the factor and what is provided.
  """
  wanted = [name for name in (rule.factor if rule.source == "context" else None, rule.replacement) if name]
  missing = [name for name in wanted if name not in factors]
  if missing:
    raise ValueError(f"rule {rule.name!r}: nothing provides its per-step factor(s) {missing}; its step_factors give "
                     f"{sorted(factors)}")
