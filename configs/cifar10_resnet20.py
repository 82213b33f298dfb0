"""``train.py --config configs/cifar10_resnet20.py[:VARIANT]``: the config lives in the package, :mod:`ewgs_jax.configs.cifar10_resnet20`
(loadable with ``ewgs_jax.configs.load_config("cifar10_resnet20", variant)``)."""

from ewgs_jax.configs.cifar10_resnet20 import get_config  # noqa: F401
