"""ImageNet ResNet-18 (EWGS Sec. 4.1; PEGE Table 2).

Variants: ``fp``, ``w<b>a<b>_<ste|ewgs|pege>`` (e.g. ``w4a4_pege``), with ``_pact`` appended to use
the PACT forward method as PEGE Table 2 does (``w4a4_pege_pact``). SGD lr 1e-2, momentum 0.9,
wd 1e-4, cosine over 100 epochs, batch 256; delta refreshed every epoch. Warm start from a
full-precision workdir with ``--config.init_from``. ImageNet must be prepared for tfds first
(see README).
"""

import re

from ewgs_jax.config import default_config


def get_config(variant: str | None = None):
  c = default_config()
  c.dataset = "imagenet2012"
  c.model = "resnet18"
  c.batch_size = 256
  c.eval_batch_size = 250
  c.num_epochs = 100
  c.optimizer = "sgd"
  c.learning_rate = 1e-2
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.delta.every_epochs = 1
  c.log_every_steps = 100
  variant = variant or "w2a2_ewgs"
  if variant == "fp":
    c.quant.enabled = False
    c.learning_rate = 0.1
    c.num_epochs = 90
    c.delta.mode = "off"
    return c
  pact = variant.endswith("_pact")
  match = re.fullmatch(r"w(\d+)a(\d+)_(ste|ewgs|pege)", variant.removesuffix("_pact"))
  if match is None:
    raise ValueError(f"unknown variant {variant!r}; valid: fp, w<bits>a<bits>_<ste|ewgs|pege>[_pact]")
  for side, bits in (("weight", int(match[1])), ("act", int(match[2]))):
    if bits == 32:   # e.g. W1A32: that side stays full precision
      c.quant[f"{side}_method"] = "none"
    else:
      c.quant[f"{side}_bits"] = bits
  c.quant.backward = match[3]
  if pact:
    c.quant.weight_method = c.quant.act_method = "pact"
    c.nesterov = True  # PEGE Sec. 4: Nesterov SGD on ImageNet
  c.delta.mode = "hessian" if c.quant.backward == "ewgs" else "off"
  return c
