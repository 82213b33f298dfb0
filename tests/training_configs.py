"""The shipped configs as tests and benchmarks load them, and the small training configuration
shared by the end-to-end tests."""

import pathlib

from ewgs_jax.configs import load_config  # noqa: F401 (the shipped configs load from the package)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart(variant):
  return load_config("quickstart", variant)


def small_config(overrides=None, variant="w2a2_pege"):
  """A few steps of W2A2 ResNet-8 on the bundled digits, logging every step."""
  c = quickstart(variant)
  c.batch_size = 64
  c.eval_batch_size = 120
  c.num_epochs = 1
  c.num_train_steps = 6
  c.log_every_steps = 1
  c.progress_bar = False
  c.data_workers = 1
  c.ewgs.batch_size = 64
  c.ewgs.num_batches = 1
  c.ewgs.max_samples = 3
  c.model_kwargs.stage_widths = (8,)   # one narrow stage: a fast compile
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
