"""``python train.py ...`` in a checkout: the same command as ``ewgs-jax-train`` / ``python -m ewgs_jax.train``.

See :mod:`ewgs_jax.train` for the flags and exit codes (0 finished, 1 an error, 2 a bad command line,
75 stopped early by SIGTERM / Ctrl-C with a checkpoint saved, 130 aborted by a second Ctrl-C).
"""

from ewgs_jax.train import run

if __name__ == "__main__":
  run()
