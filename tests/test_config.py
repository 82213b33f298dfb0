"""Config validation fails fast, naming the bad key or value and listing what is valid."""

import re

import pytest

from ewgs_jax import config as config_lib
from tests.training_configs import load_config


@pytest.mark.parametrize("name,variants", [
    ("quickstart", ["fp", "w2a2_ste", "w2a2_ewgs", "w2a2_pege"]),
    ("cifar10_resnet20", ["fp", "w2a2_ste", "w2a2_ewgs", "w2a2_ewgs_fixed", "w2a2_pege", "w1a1_ewgs", "w4a4_pege"]),
    ("imagenet_resnet18", ["fp", "w4a4_pege_pact", "w2a2_ewgs", "w1a32_ste"]),
    ("fashion_mnist_resnet20", ["fp", "w2a2_ste", "w2a2_ewgs", "w2a2_ewgs_fixed", "w2a2_pege", "w1a1_ewgs",
                                "w4a4_pege", "w1a32_ste"]),
])
def test_shipped_configs_are_valid(name, variants):
  for variant in variants:
    config = load_config(name, variant)
    config_lib.validate(config)


def test_variant_sets_what_it_says():
  c = load_config("cifar10_resnet20", "w4a4_pege")
  # ewgs.mode "hessian" in every QAT variant: the refresh follows the layers' resolved rules, so an
  # EWGS per-layer rule under a PEGE variant gets its delta (issue 13), and a pure PEGE run refreshes nothing
  assert (c.quant.weight_bits, c.quant.act_bits, c.quant.rule, c.ewgs.mode) == (4, 4, "pege", "hessian")
  c = load_config("cifar10_resnet20", "w2a2_ewgs_fixed")
  assert (c.quant.rule, c.ewgs.mode) == ("ewgs", "fixed")
  c = load_config("quickstart", "w1a1_pege")   # any w<b>a<b>_<rule> variant, as the paper configs
  assert (c.quant.weight_bits, c.quant.act_bits, c.quant.rule) == (1, 1, "pege")
  assert not load_config("cifar10_resnet20", "fp").quant.enabled
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("cifar10_resnet20", "w2a2_bogus")


def test_unknown_key_is_named_with_suggestion():
  c = config_lib.default_config()
  c.quant.rulez = "ewgs"
  with pytest.raises(ValueError, match=r"unknown config keys: quant\.rulez \(did you mean quant\.rule\?\)"):
    config_lib.validate(c)


@pytest.mark.parametrize("key,value,pattern", [
    ("quant.weight_bits", 0, r"quant\.weight_bits=0 is invalid; valid choices: integers 1\.\.16"),
    ("quant.act_bits", 17, r"quant\.act_bits=17"),
    ("quant.rule", "sste", r"quant\.rule='sste' is invalid; valid choices: \['ewgs', 'pege', 'ste'\] \(did you mean 'ste'\?\)"),
    ("quant.weight_method", "apot", r"valid choices: \['interval', 'pact', 'lsq', 'dorefa', 'none'\]"),
    ("quant.weight_per_channel", None, r"quant\.weight_per_channel=None is invalid; valid choices: \[False, True\]"),
    ("model", "resnet21", r"config\.model='resnet21' is invalid; valid choices: \[.*'resnet20'"),
    ("optimizer", "lamb", r"valid choices: \['adam', 'sgd'\]"),
    ("pege.rate_schedule", "step", r"valid choices: \['constant', 'cosine', 'exponential', 'linear', 'logarithmic'\]"),
    ("pege.granularity", "layer", r"valid choices: \['network', 'tensor', 'element'\]"),
    ("ewgs.mode", "auto", r"valid choices: \['hessian', 'fixed', 'off'\]"),
    ("ewgs.batch_size", 0, r"config\.ewgs\.batch_size=0 is invalid: it must be a positive integer"),
    ("ewgs.tolerance", -1.0, r"config\.ewgs\.tolerance=-1\.0 is invalid"),
    ("batch_size", 0, r"config\.batch_size=0 is invalid"),
])
def test_invalid_values_list_valid_choices(key, value, pattern):
  c = config_lib.default_config()
  section, _, leaf = key.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate(c)


def test_init_from_on_a_full_precision_run_is_refused():
  c = load_config("quickstart", "fp")
  c.init_from = "runs/fp"
  with pytest.raises(ValueError, match=r"init_from='runs/fp' is set on a full-precision run"):
    config_lib.validate(c)
  c.init_from = None
  config_lib.validate(c)


def test_describe_lists_every_key_with_default_and_meaning():
  text = config_lib.describe()
  lines = {line.split(" = ")[0]: line for line in text.splitlines()}
  assert set(lines) == set(config_lib.known_keys())
  assert lines["quant.rule"].startswith("quant.rule = 'ewgs'") and "ste | ewgs | pege" in lines["quant.rule"]
  assert "epochs between Hessian refreshes" in lines["ewgs.every_epochs"]       # a rule's own settings
  assert "deprecated: use quant.rule" in lines["quant.backward"]
  assert "full-precision workdir to warm start" in lines["init_from"]
  assert all(len(line.split(None, 3)) == 4 for line in lines.values()), "every key has a meaning"


@pytest.mark.parametrize("key,value,choices", [("pege.rng_impl", "philox", "threefry2x32"),
                                               ("matmul_precision", "tf32", "highest")])
def test_precision_and_prng_choices_are_validated(key, value, choices):
  c = config_lib.default_config()
  node, leaf = (c.pege, "rng_impl") if key.startswith("pege.") else (c, key)
  node[leaf] = value
  with pytest.raises(ValueError, match=rf"config.{re.escape(key)}='{value}' is invalid; valid choices: .*{choices}"):
    config_lib.validate(c)


def test_deterministic_ops_flag_is_added_once_and_kept_with_other_flags():
  from ewgs_jax import training
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert not training.deterministic_ops_enabled(env)
  training.enable_deterministic_ops(env)
  training.enable_deterministic_ops(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", "--xla_gpu_deterministic_ops=true"]
  assert training.deterministic_ops_enabled(env)
  empty = {}
  training.enable_deterministic_ops(empty)
  assert empty == {"XLA_FLAGS": "--xla_gpu_deterministic_ops=true"}


def test_renamed_keys_still_work_with_a_warning(caplog):
  c = load_config("quickstart", "w2a2_ste")
  c.quant.backward, c.delta.mode, c.delta.every_epochs = "ewgs", "fixed", 3
  c.quant.rules = (("stage1", {"bits": 4}),)
  with caplog.at_level("WARNING"):
    config_lib.validate(c)
  assert (c.quant.rule, c.ewgs.mode, c.ewgs.every_epochs) == ("ewgs", "fixed", 3)
  assert c.quant.overrides == (("stage1", {"bits": 4}),) and c.quant.backward is None and c.delta.mode is None
  assert "config key delta.mode is deprecated" in caplog.text and "use ewgs.mode" in caplog.text


def test_a_rules_section_comes_from_its_declared_settings():
  from ewgs_jax import rules
  c = config_lib.default_config()
  for name, rule in rules.RULES.items():
    assert set(c.get(name, {})) == set(rule.settings)
  assert config_lib.quant_config(c).rule_settings("ewgs")["every_epochs"] == c.ewgs.every_epochs


def test_schedule_keyword_errors_name_the_key_and_the_fix():
  c = config_lib.default_config()
  c.pege.rate_ramp = 0.0        # the per-step constants of Eq. 4: k must be given
  with pytest.raises(ValueError, match=r"config\.pege\.rate_kwargs: the logarithmic rate schedule with rate_ramp=0 "
                                       r"\(the per-step constants\) needs k; set --config\.pege\.rate_kwargs\.k=VALUE"):
    config_lib.validate(c)
  c.pege.rate_kwargs.k = 1e-3   # every schedule keyword is a key of its own, settable from the command line
  config_lib.validate(c)
