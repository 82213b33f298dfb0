"""Replacement-rate and mu schedules (PEGE Eq. 4, Sec. 3.2, Table 4-5) against their closed forms."""

import math

import jax
import numpy as np
import pytest

from ewgs_jax import schedules

STEPS = [0, 1, 10, 100, 1000, 5000, 100_000]


@pytest.mark.parametrize("name,kwargs,closed_form", [
    ("constant", dict(rate=0.8), lambda t: 0.8),
    ("linear", dict(initial_rate=0.2, transition_steps=1000), lambda t: min(0.2 + 0.8 * t / 1000, 1)),
    ("logarithmic", dict(base=10.0, k=0.01, b=2.0), lambda t: min(math.log(0.01 * t + 2) / math.log(10), 1)),
    ("exponential", dict(initial_rate=0.1, k=0.001), lambda t: min(0.1 * math.exp(0.001 * t), 1)),
    ("cosine", dict(initial_rate=0.3, transition_steps=2000),
     lambda t: 0.3 + 0.7 * 0.5 * (1 - math.cos(math.pi * min(t / 2000, 1)))),
])
def test_rate_schedules(name, kwargs, closed_form):
  schedule = schedules.rate_schedule(name, **kwargs)
  jitted = jax.jit(schedule)
  values = [float(schedule(t)) for t in STEPS]
  np.testing.assert_allclose(values, [closed_form(t) for t in STEPS], rtol=1e-5)
  np.testing.assert_allclose([float(jitted(t)) for t in STEPS], values, rtol=1e-6)
  assert all(0 < v <= 1 for v in values)
  assert all(a <= b + 1e-7 for a, b in zip(values, values[1:]))


def test_logarithmic_reaches_one_at_closed_form_step():
  base, k, b = 10.0, 0.01, 2.0
  schedule = schedules.logarithmic_rate(base, k, b)
  t_star = (base - b) / k
  assert float(schedule(t_star - 10)) < 1.0
  assert float(schedule(t_star)) == pytest.approx(1.0)
  assert float(schedule(t_star * 3)) == 1.0


@pytest.mark.parametrize("name,kwargs,closed_form", [
    ("constant", dict(mu_max=0.5), lambda t: 0.5),
    ("linear", dict(mu_max=0.5, transition_steps=1000), lambda t: 0.5 * min(t / 1000, 1)),
    ("logarithmic", dict(mu_max=0.5, base=100.0, k=0.1), lambda t: 0.5 * min(math.log(0.1 * t + 1) / math.log(100), 1)),
    ("exponential", dict(mu_max=0.5, k=0.002), lambda t: 0.5 * (1 - math.exp(-0.002 * t))),
])
def test_mu_schedules(name, kwargs, closed_form):
  schedule = schedules.mu_schedule(name, **kwargs)
  values = [float(jax.jit(schedule)(t)) for t in STEPS]
  np.testing.assert_allclose(values, [closed_form(t) for t in STEPS], rtol=1e-5, atol=1e-7)
  assert all(0 <= v <= 0.5 + 1e-7 for v in values)
  assert all(a <= b + 1e-7 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("factory,kwargs,name", [
    (schedules.logarithmic_rate, dict(base=1.0, k=0.1, b=1.5), "base"),
    (schedules.logarithmic_rate, dict(base=10.0, k=0.0, b=2.0), "k"),
    (schedules.logarithmic_rate, dict(base=10.0, k=0.1, b=1.0), "b"),
    (schedules.constant_rate, dict(rate=0.0), "rate"),
    (schedules.linear_rate, dict(initial_rate=1.5, transition_steps=10), "initial_rate"),
    (schedules.cosine_rate, dict(initial_rate=0.5, transition_steps=0), "transition_steps"),
    (schedules.exponential_mu, dict(mu_max=-1.0, k=0.1), "mu_max"),
    (schedules.logarithmic_mu, dict(mu_max=1.0, base=0.5, k=0.1), "base"),
    (schedules.exponential_rate, dict(initial_rate=0.5, k=-1.0), "k"),
])
def test_invalid_arguments_name_the_argument(factory, kwargs, name):
  with pytest.raises(ValueError, match=rf"^{name} must be"):
    factory(**kwargs)


def test_unknown_schedule_lists_choices():
  with pytest.raises(ValueError, match=r"valid choices: \['constant', 'exponential', 'linear', 'logarithmic'\]"):
    schedules.mu_schedule("step", mu_max=1.0)


@pytest.mark.parametrize("factory,kwargs,name", [
    (schedules.exponential_mu, dict(mu_max=1.0, k=0.0), "k"),
    (schedules.logarithmic_mu, dict(mu_max=1.0, base=10.0, k=-0.1), "k"),
    (schedules.logarithmic_mu, dict(mu_max=-0.1, base=10.0, k=0.1), "mu_max"),
    (schedules.constant_mu, dict(mu_max=-1e-3), "mu_max"),
    (schedules.linear_mu, dict(mu_max=1.0, transition_steps=-5), "transition_steps"),
    (schedules.logarithmic_rate, dict(base=0.5, k=0.1, b=0.7), "base"),
    (schedules.logarithmic_rate, dict(base=10.0, k=0.1, b=11.0), "b"),
    (schedules.exponential_rate, dict(initial_rate=0.0, k=0.1), "initial_rate"),
    (schedules.cosine_rate, dict(initial_rate=-0.2, transition_steps=10), "initial_rate"),
    (schedules.linear_rate, dict(initial_rate=0.5, transition_steps=0), "transition_steps"),
    (schedules.constant_rate, dict(rate=float("nan")), "rate"),
])
def test_more_invalid_arguments_name_the_argument(factory, kwargs, name):
  with pytest.raises(ValueError, match=rf"^{name} must be"):
    factory(**kwargs)


def test_unknown_rate_schedule_lists_choices():
  with pytest.raises(ValueError, match=r"valid choices: \['constant', 'cosine', 'exponential', 'linear', 'logarithmic'\]"):
    schedules.rate_schedule("step", rate=1.0)


def test_traced_step_arrays_under_jit_and_vmap():
  steps = jax.numpy.arange(0, 3000, 7)
  rate = schedules.logarithmic_rate(base=10.0, k=0.01, b=2.0)
  mu = schedules.exponential_mu(mu_max=2.0, k=0.002)
  r = np.asarray(jax.jit(jax.vmap(rate))(steps))
  m = np.asarray(jax.jit(mu)(steps))
  t = np.arange(0, 3000, 7)
  np.testing.assert_allclose(r, np.minimum(np.log(0.01 * t + 2) / np.log(10), 1), rtol=1e-5)
  np.testing.assert_allclose(m, 2.0 * (1 - np.exp(-0.002 * t)), rtol=1e-5, atol=1e-7)
  assert np.all((r > 0) & (r <= 1)) and np.all(np.diff(r) >= 0)
  assert np.all((m >= 0) & (m <= 2.0)) and np.all(np.diff(m) >= 0)


# --- ramps as fractions of the run (config pege.rate_ramp / pege.mu_ramp) ------------------------


def _pege_config(**changes):
  from ewgs_jax import config as config_lib
  c = config_lib.default_config().pege
  for key, value in changes.items():
    c[key] = value
  return c


def pege_schedules(section, total_steps):
  """(p_T, mu_T) of the PEGE rule from a config section, as training builds them."""
  from ewgs_jax import rules
  schedules_ = rules.get("pege").step_factors(rules.get("pege").resolve(section.to_dict()), total_steps)
  return schedules_["rate"], schedules_["mu"]


@pytest.mark.parametrize("total_steps", [120, 48_000])
def test_fraction_ramps_reach_their_values_at_the_same_fraction_of_any_run(total_steps):
  from ewgs_jax import config as config_lib
  c = _pege_config(rate_ramp=0.25, mu_ramp=0.5)
  mu_max = c.mu_kwargs.mu_max
  rate, mu = pege_schedules(c, total_steps)
  end_rate, end_mu = round(0.25 * total_steps), round(0.5 * total_steps)
  assert float(rate(0)) == pytest.approx(np.log10(2.0), rel=1e-6)       # B = 10, b = 2: p_0 = log_10 2
  assert float(rate(end_rate - 2)) < 1.0 and float(rate(end_rate)) == pytest.approx(1.0, abs=1e-6)
  assert float(rate(total_steps)) == 1.0
  # halfway through the ramp: the same p in both run lengths (log_10(2 + 8 * 0.5) = log_10 6)
  assert float(rate(end_rate / 2)) == pytest.approx(np.log10(6.0), rel=1e-5)
  assert float(mu(0)) == 0.0
  assert float(mu(end_mu)) == pytest.approx(0.99 * mu_max, rel=1e-5)
  assert float(mu(end_mu / 2)) == pytest.approx(0.9 * mu_max, rel=1e-5)    # 1 - sqrt(0.01)


@pytest.mark.parametrize("kind,shape", [("linear", {"initial_rate": 0.2}), ("cosine", {"initial_rate": 0.2}),
                                        ("exponential", {"initial_rate": 0.2}),
                                        ("logarithmic", {"base": 10.0, "b": 3.0})])
def test_every_rate_ramp_reaches_one_at_its_transition(kind, shape):
  for t1 in (10, 1000):
    f = schedules.rate_schedule_over(kind, t1, **shape)
    assert float(f(int(0.9 * t1))) < 1.0 - 1e-3
    assert float(f(t1)) == pytest.approx(1.0, abs=1e-5) and float(f(3 * t1)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind,shape,level", [("linear", {}, 1.0), ("logarithmic", {"base": 10.0}, 1.0),
                                              ("exponential", {}, 0.99)])
def test_every_mu_ramp_reaches_its_level_at_its_transition(kind, shape, level):
  for t1 in (10, 1000):
    f = schedules.mu_schedule_over(kind, t1, mu_max=2.0, **shape)
    assert float(f(0)) == 0.0 and float(f(int(0.8 * t1))) < 2.0 * level
    assert float(f(t1)) == pytest.approx(2.0 * level, rel=1e-5)


def test_per_step_constants_stay_available_and_mixing_them_with_a_ramp_is_refused():
  from ewgs_jax import config as config_lib
  c = _pege_config(rate_ramp=0.0, mu_ramp=0.0)
  c.rate_kwargs = {"base": 10.0, "k": 1e-3, "b": 2.0}
  c.mu_kwargs = {"mu_max": 0.5, "k": 1e-3}
  for total in (100, 100_000):   # absolute: the run length does not matter
    rate, mu = pege_schedules(c, total)
    assert float(rate(8000)) == pytest.approx(1.0) and float(rate(4000)) == pytest.approx(np.log10(6.0), rel=1e-5)
    assert float(mu(1000)) == pytest.approx(0.5 * (1 - np.exp(-1.0)), rel=1e-5)
  full = config_lib.default_config()
  full.pege.rate_kwargs = {"base": 10.0, "k": 1e-3, "b": 2.0}     # k with a ramp: the ramp sets k
  with pytest.raises(ValueError, match=r"config\.pege\.rate_kwargs\.k sets the per-step pace, which rate_ramp=0\.1 "
                                       r"replaces; drop it"):
    config_lib.validate(full)
  full = config_lib.default_config()
  full.pege.mu_ramp = 1.5
  with pytest.raises(ValueError, match=r"pege\.mu_ramp=1\.5 is invalid"):
    config_lib.validate(full)
