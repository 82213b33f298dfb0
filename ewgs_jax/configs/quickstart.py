"""Offline quickstart: a small CIFAR-style ResNet on scikit-learn's bundled 8x8 digits.

Runs on a laptop CPU in minutes with no download. Variants: ``fp`` (full precision) and
``w2a2_ste``, ``w2a2_ewgs`` (delta from the Hessian every 2 epochs), ``w2a2_pege``, or any
``w<bits>a<bits>_<rule>``; ``make train`` runs the first four, warm starting the quantized ones from
the full-precision run.
"""

from ewgs_jax.config import apply_bits_variant, default_config


def get_config(variant: str | None = None):
  c = default_config()
  c.dataset = "digits"
  c.model = "resnet8"
  c.model_kwargs.stage_widths = (16, 32)   # two stages suffice for 8x8 images and compile faster
  c.batch_size = 128
  c.eval_batch_size = 360
  c.num_epochs = 10
  c.log_every_steps = 20
  c.optimizer = "adam"
  c.learning_rate = 3e-3
  c.weight_decay = 1e-4
  c.quant_learning_rate = 1e-4
  c.keep_checkpoints = 1
  c.ewgs.every_epochs = 2
  c.ewgs.batch_size = 128
  c.ewgs.max_samples = 20
  variant = variant or "w2a2_ewgs"
  if variant == "fp":
    c.quant.enabled = False
    c.num_epochs = 15
    return c
  if apply_bits_variant(c, variant, "_fixed") and c.quant.rule == "ewgs":
    c.ewgs.mode = "fixed"
  return c
