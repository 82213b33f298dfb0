"""Fashion-MNIST ResNet-20: the real-data setting where the estimators are compared and calibrated.

Read from the official IDX files (Debian's ``dataset-fashion-mnist`` installs them in
``/usr/share/datasets/fashion-mnist``; elsewhere put them in ``--config.data_dir``), or through tfds
when the files are absent. Adam 1e-3, weight decay 1e-4, batch 256, as the CIFAR-10 ResNet-20
setting (EWGS Sec. 4.1).

Variants (``--config configs/fashion_mnist_resnet20.py:VARIANT``):
  fp                 full-precision pretraining, 12 epochs
  w<b>a<b>_<rule>    QAT for 10 epochs with rule ste | ewgs | pege, e.g. w2a2_pege, w4a4_ewgs, w1a32_ste;
                     EWGS refreshes delta from the Hessian every 2 epochs
  ..._fixed          EWGS with a fixed delta (EWGS Table 4)
QAT variants warm start from ``--config.init_from=<fp workdir>``.
"""

from ewgs_jax.config import apply_bits_variant, default_config


def get_config(variant: str | None = None):
  c = default_config()
  c.dataset = "fashion_mnist"
  c.model = "resnet20"
  c.model_kwargs.stage_widths = (16, 32, 64)   # ResNet-20's own; explicit so the command line can change it
  c.batch_size = 256
  c.eval_batch_size = 500
  c.num_epochs = 10
  c.optimizer = "adam"
  c.learning_rate = 1e-3
  c.weight_decay = 1e-4
  c.ewgs.every_epochs = 2
  c.log_every_steps = 50
  variant = variant or "w2a2_pege"
  if variant == "fp":
    c.quant.enabled = False
    c.num_epochs = 12
    return c
  if apply_bits_variant(c, variant, "_fixed") and c.quant.rule == "ewgs":
    c.ewgs.mode = "fixed"
  return c
