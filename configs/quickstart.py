"""``train.py --config configs/quickstart.py[:VARIANT]``: the config lives in the package, :mod:`ewgs_jax.configs.quickstart`
(loadable with ``ewgs_jax.configs.load_config("quickstart", variant)``)."""

from ewgs_jax.configs.quickstart import get_config  # noqa: F401
