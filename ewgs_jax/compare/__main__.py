"""``python -m ewgs_jax.compare``: the comparison's command line (:mod:`ewgs_jax.compare.cli`)."""

from ewgs_jax.compare.cli import run

if __name__ == "__main__":
  run()
