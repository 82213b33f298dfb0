"""Trains (and evaluates) a quantized network: ``python train.py --config CONFIG[:VARIANT] --workdir DIR``.

Any config key can be overridden on the command line, e.g. ``--config.quant.backward=pege``.
Re-running the same command resumes from the latest checkpoint in ``--workdir``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ewgs_jax import hostmem, training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally 'path.py:variant'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("verbose", False, "Log library INFO messages (orbax, ...) as well.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  # Before anything starts the JAX backend: the allocator settings only reach threads created later.
  if hostmem.tune(FLAGS.config.host_allocator):
    logging.info("host allocator tuned for XLA:CPU (ewgs_jax.hostmem)")
  training.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
