"""ImageNet ResNet-18 (EWGS Sec. 4.1; PEGE Table 2).

Variants: ``fp``, ``w<b>a<b>_<ste|ewgs|pege>`` (e.g. ``w4a4_pege``), with ``_pact`` appended to use
the PACT forward method as PEGE Table 2 does (``w4a4_pege_pact``). SGD lr 1e-2, momentum 0.9,
wd 1e-4, cosine over 100 epochs, batch 256; delta refreshed every epoch. Warm start from a
full-precision workdir with ``--config.init_from``. ImageNet must be prepared for tfds first
(see README).
"""

from ewgs_jax.config import apply_bits_variant, default_config


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
  c.ewgs.every_epochs = 1
  c.log_every_steps = 100
  variant = variant or "w2a2_ewgs"
  if variant == "fp":
    c.quant.enabled = False
    c.learning_rate = 0.1
    c.num_epochs = 90
    return c
  if apply_bits_variant(c, variant, "_pact"):
    c.quant.weight_method = c.quant.act_method = "pact"
    c.nesterov = True  # PEGE Sec. 4: Nesterov SGD on ImageNet
  return c
