"""The public QAT API (ewgs_jax.QAT) and the rule contract it reads (ewgs_jax.rules)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ewgs_jax as ej
from ewgs_jax import estimators, rules

PEGE = ej.QuantConfig(weight=ej.QuantizerSpec("interval", "pege", 2), act=ej.QuantizerSpec("interval", "pege", 2))
MIXED = ej.QuantConfig(weight=ej.QuantizerSpec("interval", "ewgs", 2), act=ej.QuantizerSpec("interval", "ewgs", 2),
                       overrides=(("conv2", {"rule": "pege"}),), settings={"ewgs": {"every_epochs": 2}})


def test_context_carries_each_rules_factors_and_a_step_key_under_jit():
  qat = ej.QAT(PEGE, total_steps=100)
  key = jax.random.key(3)
  ctx = jax.jit(qat.context)(jnp.int32(5), key)
  schedules = rules.get("pege").step_factors(PEGE.rule_settings("pege"), 100)
  assert set(ctx.factors) == {"pege"}
  np.testing.assert_allclose(ctx.factors["pege"]["mu"], schedules["mu"](5), rtol=1e-6)
  np.testing.assert_allclose(ctx.factors["pege"]["rate"], schedules["rate"](5), rtol=1e-6)
  np.testing.assert_array_equal(jax.random.key_data(ctx.key), jax.random.key_data(jax.random.fold_in(key, 5)))
  assert set(qat.metrics(ctx)) == {"pege/mu", "pege/rate"}
  assert ej.QAT(PEGE, total_steps=100).context(5).key is None           # no key: no replacement


def test_rules_in_use_decide_the_machinery():
  qat = ej.QAT(MIXED, total_steps=40, steps_per_epoch=10)
  assert [r.name for r in qat.rules] == ["ewgs", "pege"]                # the global rule and the override's
  assert [d.name for d in qat.actions] == ["ewgs/delta_refresh"]
  assert [s for s in range(40) if qat.due(s)] == [20]                    # every_epochs=2 from the settings
  only_ste = ej.QAT(MIXED, total_steps=40, rules=["ste"])                # what the layers actually resolve to
  assert not only_ste.actions and only_ste.context(3, jax.random.key(0)) == ej.QuantContext(factors={}, key=None)


def test_a_rule_whose_factor_nothing_provides_is_refused_with_one_line():
  with pytest.raises(ValueError, match="its factor 'lam' comes from the per-step context, but the rule declares no "
                                       "step_factors"):
    rules.Rule("lonely", estimators.ewgs, factor="lam", source="context")
  with pytest.raises(ValueError, match="lives in quant_state, but the rule declares no actions"):
    rules.Rule("stateless", estimators.ewgs, factor="delta", source="quant_state")
  wrong = rules.register(rules.Rule("misnamed", estimators.pege, factor="mu", source="context",
                                    step_factors=lambda settings, total: {"nu": lambda step: 0.1}), replace=True)
  try:
    quant = ej.QuantConfig(weight=ej.QuantizerSpec("interval", "misnamed", 2))
    with pytest.raises(ValueError) as error:
      ej.QAT(quant, total_steps=10)
    assert str(error.value) == "rule 'misnamed': nothing provides its per-step factor(s) ['mu']; its step_factors give ['nu']"
  finally:
    rules.unregister(wrong.name)


def test_settings_are_checked_against_the_rules_section():
  with pytest.raises(ValueError, match=r"rule 'ewgs' has no setting 'every_epoch' \(did you mean every_epochs\?\)"):
    ej.QuantConfig(settings={"ewgs": {"every_epoch": 2}})
  with pytest.raises(ValueError, match=r"unknown rule 'pegee' \(did you mean pege\?\)"):
    ej.QuantConfig(settings={"pegee": {}})
  with pytest.raises(ValueError, match=r"config\.ewgs\.num_batches=0 is invalid: it must be a positive integer"):
    ej.QuantConfig(settings={"ewgs": {"num_batches": 0}})
  assert MIXED.rule_settings("ewgs")["every_epochs"] == 2 and MIXED.rule_settings("ewgs")["num_batches"] == 3


def test_run_due_runs_only_due_actions_reports_them_and_honours_skip_and_stop():
  calls = []

  def action(inp):
    calls.append((inp.clock.step, inp.key))
    return jax.tree.map(lambda x: x + 1.0, inp.state), {"seen": float(len(list(inp.batches)))}

  ticking = rules.register(rules.Rule(
      "ticking", estimators.ewgs, factor="delta", source="quant_state",
      actions=lambda settings: [rules.Action("tick", lambda clock: clock.step % 2 == 0, action)]), replace=True)
  try:
    qat = ej.QAT(ej.QuantConfig(weight=ej.QuantizerSpec("interval", "ticking", 2)), total_steps=10)
    state = {"x": jnp.zeros(())}
    key = jax.random.key(1)
    new, metrics = qat.run_due(1, state, None, [0, 1], key)
    assert new is state and metrics == {} and not calls                  # nothing due at step 1
    new, metrics = qat.run_due(2, state, None, [0, 1, 2], key)
    assert float(new["x"]) == 1.0 and metrics == {"ticking/tick": 1.0, "ticking/seen": 3.0}
    assert calls[-1][0] == 2 and calls[-1][1] is key                      # the first due action gets the key itself
    assert qat.run_due(4, state, None, [], key, skip=["ticking/tick"]) == (state, {})
    rules.register(rules.Rule(
        "ticking", estimators.ewgs, factor="delta", source="quant_state",
        actions=lambda settings: [rules.Action("tick", lambda clock: True, lambda inp: (None, {}))]), replace=True)
    qat = ej.QAT(ej.QuantConfig(weight=ej.QuantizerSpec("interval", "ticking", 2)), total_steps=10)
    new, metrics = qat.run_due(3, state, None, [], key)
    assert new is state and metrics == {"ticking/tick": 0.0}             # stopped: the state is left as it was
  finally:
    rules.unregister(ticking.name)


def test_registry_refuses_bad_rules_and_duplicates():
  with pytest.raises(ValueError, match="already registered"):
    rules.register(rules.Rule("ste", estimators.ste))
  with pytest.raises(ValueError, match="lower-case identifiers"):
    rules.Rule("Bad-Name", estimators.ste)
  with pytest.raises(ValueError, match="a factor needs a source other than 'none'"):
    rules.Rule("half", estimators.ewgs, factor="delta")
  assert list(rules.RULES)[:3] == ["ste", "ewgs", "pege"]
  assert rules.get("pege").bind(0.5, "absolute").func is estimators.pege
  assert rules.get("pege").bind(0.5).func is estimators.pege


def test_rules_in_use_count_a_global_rule_an_override_turns_on_and_none_when_disabled():
  off = ej.QuantizerSpec("none", "ewgs", 2)
  turned_on = ej.QuantConfig(weight=off, act=off, overrides=(("Conv", {"method": "interval"}),))
  assert turned_on.rule_names() == ["ewgs"]
  assert [d.name for d in ej.QAT(turned_on, total_steps=10).actions] == ["ewgs/delta_refresh"]
  assert ej.QuantConfig(weight=ej.QuantizerSpec("interval", "ewgs", 2), enabled=False).rule_names() == []
  with pytest.raises(ValueError, match="its factor 'scale' is a constant, but no value is given"):
    rules.Rule("valueless", estimators.ewgs, factor="scale", source="constant")


def test_a_replacement_key_of_another_prng_and_a_jitted_refresh_loss_are_refused():
  rbg = ej.QuantConfig(weight=ej.QuantizerSpec("interval", "pege", 2), settings={"pege": {"rng_impl": "rbg"}})
  qat = ej.QAT(rbg, total_steps=10)
  assert qat.key_impl == "rbg"
  assert str(jax.random.key_impl(qat.context(1, jax.random.key(0, impl="rbg")).key)) == "rbg"
  with pytest.raises(ValueError, match=r"a threefry2x32 key, but the rules asked for rbg .*impl='rbg'"):
    qat.context(1, jax.random.key(0))
  ewgs = ej.QAT(MIXED, total_steps=4, steps_per_epoch=1)
  with pytest.raises(ValueError, match="loss_fn is wrapped in jax.jit"):
    ewgs.run_due(2, {}, jax.jit(lambda v, b: 0.0), [])


def test_a_gradient_without_the_quant_state_collection_raises_instead_of_training_as_ste():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))

  quant = ej.QuantConfig(weight=ej.QuantizerSpec("interval", "ewgs", 2), act=ej.QuantizerSpec("interval", "ewgs", 2),
                         quantize_first_last=True)
  model = ej.quantize(Net(), quant)
  x = jax.random.normal(jax.random.key(0), (8, 5))
  variables = model.init(jax.random.key(1), x)
  np.testing.assert_array_equal(model.apply({"params": variables["params"]}, x), model.apply(variables, x))
  missing = r"QuantDense 'Dense_\d': its rule reads its factor from the 'quant_state' collection"
  with pytest.raises(ValueError, match=missing):
    jax.grad(lambda p: model.apply({"params": p}, x).sum())(variables["params"])
  jax.grad(lambda p: model.apply({**variables, "params": p}, x).sum())(variables["params"])
