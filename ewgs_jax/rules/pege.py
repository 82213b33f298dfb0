"""PEGE (Zhao): progressive replacement (Eq. 3-4) and the gradient ``g_c = g_q + mu (x_c - x_q)`` (Eq. 5).

What the rule declares (:mod:`ewgs_jax.rules.base`):

* discretizer: :func:`ewgs_jax.estimators.pege_relative` (``mu`` in units of ``3 sigma(g_q)``,
  the default ``mu_scale="gradient"``) or :func:`ewgs_jax.estimators.pege` (Eq. 5 as written,
  ``mu_scale="absolute"``);
* per-step factors (``step_factors``): ``mu`` = mu_T (Sec. 3.2, Table 5) and ``rate`` = p_T
  (Eq. 4, Table 4), from :mod:`ewgs_jax.schedules`; ``rate`` drives the replacement (Eq. 3) at the
  granularity of ``config.pege.granularity``;
* no actions, and the traces p_T and mu_T.

The paper gives no values for B, b, k, mu_max. Ramps are fractions of the run, so that a 10-epoch
and a 400-epoch run follow the same curriculum: p starts at log_10(2) = 0.3 and reaches 1 at 10 % of
the run; mu reaches 99 % of mu_max at 10 %. A ramp of 0 takes the paper's per-step constants from
``rate_kwargs`` / ``mu_kwargs`` instead (README, "Choices where the papers are open").
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from ewgs_jax import estimators, replacement, schedules
from ewgs_jax.rules import base

MU_MAX = 1e-2   # in units of 3 sigma(g_q): chosen by the Fashion-MNIST sweep (README, "Calibration")
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
#: How mu is measured (``config.pege.mu_scale``): the discretizer for each choice.
MU_SCALES: dict[str, Callable] = {"gradient": estimators.pege_relative, "absolute": estimators.pege}

# Every keyword any schedule takes, so that each can be set from the command line; unset ones are
# None and not passed on.
_RATE_KWARGS = {"base": 10.0, "b": 2.0, "k": None, "rate": None, "initial_rate": None, "transition_steps": None}
_MU_KWARGS = {"mu_max": MU_MAX, "k": None, "base": None, "transition_steps": None}


def _fraction(value) -> str | None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
  return None if ok else "it must be a fraction of the run in (0, 1], or 0 for the per-step constants in the kwargs"


SETTINGS = {
    "rate_schedule": base.Setting("logarithmic", "replacement-rate scheduler p_T (PEGE Eq. 4, Table 4)",
                                  choices=sorted(schedules.RATE_SCHEDULES)),
    "rate_kwargs": base.Setting(_RATE_KWARGS, "its arguments: base B and offset b of Eq. 4 (p_0 = log_B b); k, "
                                "initial_rate, rate, transition_steps for the other schedulers or rate_ramp=0"),
    "rate_ramp": base.Setting(0.1, "fraction of the run at which p_T reaches 1 (0: per-step k from rate_kwargs)",
                              check=_fraction),
    "mu_schedule": base.Setting("exponential", "mu_T scheduler (PEGE Sec. 3.2, Table 5)",
                                choices=sorted(schedules.MU_SCHEDULES)),
    "mu_kwargs": base.Setting(_MU_KWARGS, "its arguments: mu_max (in units of 3 sigma(g_q) with mu_scale="
                              "gradient); k, base, transition_steps for the other schedules or mu_ramp=0"),
    "mu_ramp": base.Setting(0.1, "fraction of the run at which mu_T reaches mu_max (99 % for the exponential; "
                            "0: per-step k from mu_kwargs)", check=_fraction),
    "mu_scale": base.Setting("gradient", "'gradient': mu in units of 3 sigma(g_q) per quantizer (invariant to "
                             "the loss scale); 'absolute': Eq. 5 as written", choices=sorted(MU_SCALES)),
    "mu_on": base.Setting("both", "quantizers that get the mu term: both (Eq. 5: weights/activations), "
                          "weights, activations", choices=base.FACTOR_TARGETS),
    "granularity": base.Setting(replacement.DEFAULT_GRANULARITY, "replacement granularity (Eq. 3): a "
                                "Bernoulli draw per element, per tensor or one for the network",
                                choices=replacement.GRANULARITIES),
    "rng_impl": base.Setting("threefry2x32", "PRNG of the replacement masks (rbg, unsafe_rbg: cheaper per "
                             "element, another random stream)", choices=RNG_IMPLS),
}


#: The keywords each schedule takes when its pace comes from a ramp (``schedules.*_schedule_over``).
RAMP_KEYS = {
    "rate": {"logarithmic": ("base", "b"), "exponential": ("initial_rate",), "linear": ("initial_rate",),
             "cosine": ("initial_rate",), "constant": ("rate",)},
    "mu": {"exponential": ("mu_max",), "logarithmic": ("mu_max", "base"), "linear": ("mu_max",),
           "constant": ("mu_max",)},
}


def _schedule(settings: Mapping[str, Any], what: str, total_steps: int) -> Callable:
  """One schedule (``what`` = ``"rate"`` or ``"mu"``) from the settings, with errors naming the keys.

  Only the keywords the chosen schedule takes are passed on (``rate_kwargs`` holds every keyword of
  every rate schedule, so that each can be set from the command line).
  """
  kind, ramp = settings[f"{what}_schedule"], settings[f"{what}_ramp"]
  given = {k: v for k, v in dict(settings[f"{what}_kwargs"]).items() if v is not None}
  table = schedules.RATE_SCHEDULES if what == "rate" else schedules.MU_SCHEDULES
  if ramp > 0:
    wanted = RAMP_KEYS[what][kind]
    paced = sorted({"k", "transition_steps"} & set(given))   # the pace of the per-step form: the ramp sets it
    if paced:
      raise ValueError(f"config.pege.{what}_kwargs.{paced[0]} sets the per-step pace, which {what}_ramp={ramp} "
                       f"replaces; drop it, or set --config.pege.{what}_ramp=0 to use it")
  else:
    wanted = tuple(inspect.signature(table[kind]).parameters)
  missing = [name for name in wanted if name not in given]
  if missing:
    how = f"{what}_ramp={ramp}" if ramp > 0 else f"{what}_ramp=0 (the per-step constants)"
    raise ValueError(f"config.pege.{what}_kwargs: the {kind} {what} schedule with {how} needs "
                     f"{', '.join(missing)}; set --config.pege.{what}_kwargs.{missing[0]}=VALUE"
                     + ("" if ramp > 0 else f", or give a ramp, e.g. --config.pege.{what}_ramp=0.1"))
  kwargs = {name: given[name] for name in wanted}
  if ramp > 0:
    over = schedules.rate_schedule_over if what == "rate" else schedules.mu_schedule_over
    return over(kind, max(1, round(ramp * total_steps)), **kwargs)
  return (schedules.rate_schedule if what == "rate" else schedules.mu_schedule)(kind, **kwargs)


def step_schedules(settings: Mapping[str, Any], total_steps: int) -> dict[str, Callable]:
  """``{"rate": p_T, "mu": mu_T}`` as functions of the step for a run of ``total_steps`` (Eq. 4, Sec. 3.2).

  A ramp given as a fraction of the run (``rate_ramp``, ``mu_ramp`` > 0) ends at
  ``max(1, round(fraction * total_steps))``; a ramp of 0 uses the per-step constants in the kwargs.

  Args:
    settings: the ``config.pege`` section (every key).
    total_steps: the run's number of training steps.

  Returns:
    The two schedules, each ``step -> value`` (jittable).
  """
  return {"rate": _schedule(settings, "rate", total_steps), "mu": _schedule(settings, "mu", total_steps)}


def _validate(settings: Mapping[str, Any]) -> None:
  for what, known in (("rate", _RATE_KWARGS), ("mu", _MU_KWARGS)):
    unknown = sorted(set(dict(settings[f"{what}_kwargs"])) - set(known))
    if unknown:
      raise ValueError(f"config.pege.{what}_kwargs has unknown keys {unknown}; valid: {sorted(known)}")
    try:
      _schedule(settings, what, total_steps=1000)
    except (TypeError, ValueError) as e:
      message = str(e)
      if not message.startswith("config."):
        message = f"config.pege.{what}_schedule={settings[f'{what}_schedule']!r} with its {what}_kwargs: {message}"
      raise ValueError(message) from None


def _options(settings: Mapping[str, Any]) -> base.RuleOptions:
  return base.RuleOptions(variant=settings["mu_scale"], granularity=settings["granularity"],
                          factor_on=settings["mu_on"], rng_impl=settings["rng_impl"])


RULE = base.register(base.Rule(
    "pege", estimators.pege, factor="mu", source="context", variants=MU_SCALES,
    settings=SETTINGS, validate=_validate, options=_options, step_factors=step_schedules, replacement="rate",
    traces=(base.Trace(base.metric_key("pege", "rate"), "PEGE replacement rate p_T", "p_T"),
            base.Trace(base.metric_key("pege", "mu"), "PEGE mu_T", "mu_T (config units)")),
    summary="PEGE: progressive replacement (Eq. 3-4) and g_c = g_q + mu (x_c - x_q) (Eq. 5)"))
