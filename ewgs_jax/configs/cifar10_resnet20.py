"""CIFAR-10 ResNet-20, the setting of EWGS Sec. 4.1 (batch 256, Adam 1e-3, 400 epochs).

PEGE Table 1 uses the same network but trains with batch 64; its variants here keep EWGS's batch of
256 so that the rules are compared in one setting. ``--config.batch_size=64`` gives PEGE's.

Variants (``--config configs/cifar10_resnet20.py:VARIANT``):
  fp         full-precision pretraining (SGD 0.1, momentum 0.9, wd 1e-4, 400 epochs: the reference
             ``train_fp.py``)
  w2a2_ste   W2A2 interval quantizer, STE
  w2a2_ewgs  W2A2, EWGS rule, delta from the Hessian every 10 epochs (default)
  w2a2_ewgs_fixed  W2A2, EWGS rule with a fixed delta of 1e-3 (EWGS Table 4)
  w2a2_pege  W2A2, PEGE rule with logarithmic replacement and exponential mu
  wXaY_<rule>  any bit widths, e.g. w1a1_ewgs, w4a4_pege
QAT variants warm start from ``--config.init_from=<fp workdir>``.
"""

from ewgs_jax.config import apply_bits_variant, default_config


def get_config(variant: str | None = None):
  c = default_config()
  c.dataset = "cifar10"
  c.model = "resnet20"
  c.batch_size = 256
  c.num_epochs = 400
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-4
  c.ewgs.every_epochs = 10
  variant = variant or "w2a2_ewgs"
  if variant == "fp":
    c.quant.enabled = False
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    return c
  if apply_bits_variant(c, variant, "_fixed") and c.quant.rule == "ewgs":
    c.ewgs.mode = "fixed"
  return c
