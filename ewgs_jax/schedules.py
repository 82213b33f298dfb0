"""Step-dependent values: PEGE replacement rate ``p_T`` and gradient factor ``mu_T`` (pure, reusable by any rule).

Every factory returns a pure, jittable ``step -> value`` function (the shape of an
``optax.Schedule``); ``step`` may be a Python int or a traced integer array. Invalid arguments
raise ``ValueError`` naming the argument.

Replacement-rate schedulers (PEGE Eq. 4 and Fig. 1) all return values in (0, 1]:

* :func:`constant_rate`     ``p``
* :func:`linear_rate`       ``p_0 + (1 - p_0) T / T_1``
* :func:`logarithmic_rate`  ``min(log_B(k T + b), 1)``  (PEGE Eq. 4, the paper's choice)
* :func:`exponential_rate`  ``p_0 exp(k T)``
* :func:`cosine_rate`       ``p_0 + (1 - p_0) (1 - cos(pi T / T_1)) / 2``

each capped at 1. ``mu`` schedules (PEGE Sec. 3.2 and Table 5) return values in [0, mu_max]:

* :func:`constant_mu`, :func:`linear_mu` (``mu_max T / T_1``),
  :func:`logarithmic_mu` (``mu_max min(log_B(k T + 1), 1)``),
  :func:`exponential_mu` (``mu_max (1 - exp(-k T))``, the paper's choice).

The per-step constants (``k``, ``transition_steps``) make a schedule mean different curricula in
runs of different lengths. :func:`rate_schedule_over` and :func:`mu_schedule_over` build the same
schedules from the step at which they finish ramping (``p`` reaches 1; ``mu`` reaches ``mu_max``,
or 99 % of it for the exponential, which never does), so a ramp can be given as a fraction of the
run (config ``pege.rate_ramp`` / ``pege.mu_ramp``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from ewgs_jax.estimators import Array

Schedule = Callable[[Array | int], Array]


def _require(ok: bool, name: str, value, rule: str) -> None:
  if not ok:
    raise ValueError(f"{name} must be {rule}, got {value!r}")


def _t(step) -> Array:
  return jnp.asarray(step, jnp.float32)


def _check_rate(name: str, value: float) -> None:
  _require(0.0 < value <= 1.0, name, value, "in (0, 1]")


# --- replacement rate p_T -----------------------------------------------------------------------


def constant_rate(rate: float = 1.0) -> Schedule:
  """``p_T = rate`` (PEGE Table 4, "Constant").

  Args:
    rate: the rate, in (0, 1].

  Returns:
    The schedule, ``step -> p_T`` (float32).
  """
  _check_rate("rate", rate)
  return lambda step: jnp.full((), rate, jnp.float32) + 0.0 * _t(step)


def linear_rate(initial_rate: float, transition_steps: int) -> Schedule:
  """``p_T = min(p_0 + (1 - p_0) T / T_1, 1)`` (PEGE Table 4, "Linear").

  Args:
    initial_rate: ``p_0``, in (0, 1].
    transition_steps: ``T_1``, the step at which ``p_T`` reaches 1 (> 0).

  Returns:
    The schedule, ``step -> p_T``.
  """
  _check_rate("initial_rate", initial_rate)
  _require(transition_steps > 0, "transition_steps", transition_steps, "> 0")
  return lambda step: jnp.minimum(initial_rate + (1.0 - initial_rate) * _t(step) / transition_steps, 1.0)


def logarithmic_rate(base: float, k: float, b: float) -> Schedule:
  """``p_T = min(log_B(k T + b), 1)`` (PEGE Eq. 4).

  ``log_B(b)`` is the rate at step 0, so ``b > 1`` keeps it positive; it reaches 1 at
  ``T = (B - b) / k``.

  Args:
    base: the logarithm's base ``B`` (> 1).
    k: the slope ``k`` (> 0).
    b: the offset ``b``, in (1, base].

  Returns:
    The schedule, ``step -> p_T``.
  """
  _require(base > 1.0, "base", base, "> 1")
  _require(k > 0.0, "k", k, "> 0")
  _require(1.0 < b <= base, "b", b, f"in (1, base={base}]")
  log_base = math.log(base)
  return lambda step: jnp.minimum(jnp.log(k * _t(step) + b) / log_base, 1.0)


def exponential_rate(initial_rate: float, k: float) -> Schedule:
  """``p_T = min(p_0 exp(k T), 1)`` (PEGE Table 4, "Exponential"): slow start, fast finish.

  Args:
    initial_rate: ``p_0``, in (0, 1].
    k: the growth rate (> 0).

  Returns:
    The schedule, ``step -> p_T``.
  """
  _check_rate("initial_rate", initial_rate)
  _require(k > 0.0, "k", k, "> 0")
  return lambda step: jnp.minimum(initial_rate * jnp.exp(k * _t(step)), 1.0)


def cosine_rate(initial_rate: float, transition_steps: int) -> Schedule:
  """``p_T = p_0 + (1 - p_0)(1 - cos(pi min(T / T_1, 1))) / 2`` (PEGE Table 4, "Cosine").

  Args:
    initial_rate: ``p_0``, in (0, 1].
    transition_steps: ``T_1``, the step at which ``p_T`` reaches 1 (> 0).

  Returns:
    The schedule, ``step -> p_T``.
  """
  _check_rate("initial_rate", initial_rate)
  _require(transition_steps > 0, "transition_steps", transition_steps, "> 0")

  def schedule(step):
    frac = jnp.minimum(_t(step) / transition_steps, 1.0)
    return initial_rate + (1.0 - initial_rate) * 0.5 * (1.0 - jnp.cos(jnp.pi * frac))

  return schedule


# --- PEGE gradient factor mu_T ------------------------------------------------------------------


def _check_mu_max(mu_max: float) -> None:
  _require(mu_max >= 0.0, "mu_max", mu_max, ">= 0")


def constant_mu(mu_max: float) -> Schedule:
  """``mu_T = mu_max`` (PEGE Table 5, "Constant").

  Args:
    mu_max: the value (>= 0).

  Returns:
    The schedule, ``step -> mu_T`` (float32).
  """
  _check_mu_max(mu_max)
  return lambda step: jnp.full((), mu_max, jnp.float32) + 0.0 * _t(step)


def linear_mu(mu_max: float, transition_steps: int) -> Schedule:
  """``mu_T = mu_max min(T / T_1, 1)`` (PEGE Table 5, "Linear").

  Args:
    mu_max: the final value (>= 0).
    transition_steps: ``T_1``, the step at which ``mu_T`` reaches ``mu_max`` (> 0).

  Returns:
    The schedule, ``step -> mu_T``.
  """
  _check_mu_max(mu_max)
  _require(transition_steps > 0, "transition_steps", transition_steps, "> 0")
  return lambda step: mu_max * jnp.minimum(_t(step) / transition_steps, 1.0)


def logarithmic_mu(mu_max: float, base: float, k: float) -> Schedule:
  """``mu_T = mu_max min(log_B(k T + 1), 1)`` (PEGE Table 5, "Logarithmic"); 0 at step 0.

  Args:
    mu_max: the final value (>= 0).
    base: the logarithm's base ``B`` (> 1).
    k: the slope (> 0); ``mu_max`` is reached at ``T = (B - 1) / k``.

  Returns:
    The schedule, ``step -> mu_T``.
  """
  _check_mu_max(mu_max)
  _require(base > 1.0, "base", base, "> 1")
  _require(k > 0.0, "k", k, "> 0")
  log_base = math.log(base)
  return lambda step: mu_max * jnp.minimum(jnp.log1p(k * _t(step)) / log_base, 1.0)


def exponential_mu(mu_max: float, k: float) -> Schedule:
  """``mu_T = mu_max (1 - exp(-k T))`` (PEGE Sec. 3.2, "Exponential Curriculum Learning").

  Args:
    mu_max: the limit (>= 0).
    k: the rate (> 0).

  Returns:
    The schedule, ``step -> mu_T``.
  """
  _check_mu_max(mu_max)
  _require(k > 0.0, "k", k, "> 0")
  return lambda step: mu_max * -jnp.expm1(-k * _t(step))


RATE_SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant_rate,
    "linear": linear_rate,
    "logarithmic": logarithmic_rate,
    "exponential": exponential_rate,
    "cosine": cosine_rate,
}
MU_SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant_mu,
    "linear": linear_mu,
    "logarithmic": logarithmic_mu,
    "exponential": exponential_mu,
}


MU_RAMP_LEVEL = 0.99   # the exponential mu schedule "finishes" its ramp at 99 % of mu_max


def rate_schedule_over(kind: str, transition_steps: int, **shape) -> Schedule:
  """A replacement-rate schedule whose ``p`` reaches 1 at ``transition_steps`` (PEGE Eq. 4, Table 4).

  ``shape`` holds the constants that do not set the pace: ``base`` and ``b`` (logarithmic,
  ``k = (base - b) / T_1``), ``initial_rate`` (linear, cosine; exponential, ``k = -ln(p_0) / T_1``),
  ``rate`` (constant, which has no ramp).

  Args:
    kind: ``"constant"``, ``"linear"``, ``"logarithmic"``, ``"exponential"`` or ``"cosine"``.
    transition_steps: ``T_1`` (> 0).
    **shape: the constants above for ``kind``.

  Returns:
    The schedule, ``step -> p_T``.
  """
  _lookup(RATE_SCHEDULES, kind, "replacement-rate")
  _require(transition_steps > 0, "transition_steps", transition_steps, "> 0")
  t1 = float(transition_steps)
  if kind == "logarithmic":
    base, b = shape.pop("base"), shape.pop("b")
    return logarithmic_rate(base, (base - b) / t1, b, **shape)
  if kind == "exponential":
    p0 = shape.pop("initial_rate")
    _require(0.0 < p0 < 1.0, "initial_rate", p0, "in (0, 1) for a ramp")
    return exponential_rate(p0, -math.log(p0) / t1, **shape)
  if kind in ("linear", "cosine"):
    return RATE_SCHEDULES[kind](transition_steps=transition_steps, **shape)
  return constant_rate(**shape)


def mu_schedule_over(kind: str, transition_steps: int, **shape) -> Schedule:
  """A ``mu`` schedule that reaches ``mu_max`` at ``transition_steps`` (PEGE Sec. 3.2, Table 5).

  Exponential: ``k = ln(1 / (1 - 0.99)) / T_1`` (99 % at ``T_1``); logarithmic:
  ``k = (base - 1) / T_1``; linear: ``T_1``; constant: no ramp. ``shape`` holds ``mu_max`` (and
  ``base`` for the logarithmic schedule).

  Args:
    kind: ``"constant"``, ``"linear"``, ``"logarithmic"`` or ``"exponential"``.
    transition_steps: ``T_1`` (> 0).
    **shape: ``mu_max`` (and ``base``).

  Returns:
    The schedule, ``step -> mu_T``.
  """
  _lookup(MU_SCHEDULES, kind, "mu")
  _require(transition_steps > 0, "transition_steps", transition_steps, "> 0")
  t1 = float(transition_steps)
  if kind == "exponential":
    return exponential_mu(k=-math.log1p(-MU_RAMP_LEVEL) / t1, **shape)
  if kind == "logarithmic":
    return logarithmic_mu(k=(shape["base"] - 1.0) / t1, **shape)
  if kind == "linear":
    return linear_mu(transition_steps=transition_steps, **shape)
  return constant_mu(**shape)


def _lookup(table: dict, kind: str, what: str):
  try:
    return table[kind]
  except KeyError:
    raise ValueError(f"unknown {what} schedule {kind!r}; valid choices: {sorted(table)}") from None


def rate_schedule(kind: str, **kwargs) -> Schedule:
  """Builds a replacement-rate schedule by name, e.g. ``rate_schedule("logarithmic", base=..)``.

  Args:
    kind: a key of ``RATE_SCHEDULES``; unknown names raise ``ValueError`` listing them.
    **kwargs: the schedule's arguments.

  Returns:
    The schedule, ``step -> p_T``.
  """
  return _lookup(RATE_SCHEDULES, kind, "replacement-rate")(**kwargs)


def mu_schedule(kind: str, **kwargs) -> Schedule:
  """Builds a ``mu`` schedule by name, e.g. ``mu_schedule("exponential", mu_max=.., k=..)``.

  Args:
    kind: a key of ``MU_SCHEDULES``; unknown names raise ``ValueError`` listing them.
    **kwargs: the schedule's arguments.

  Returns:
    The schedule, ``step -> mu_T``.
  """
  return _lookup(MU_SCHEDULES, kind, "mu")(**kwargs)
