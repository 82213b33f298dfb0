"""``train.py --config configs/imagenet_resnet18.py[:VARIANT]``: the config lives in the package, :mod:`ewgs_jax.configs.imagenet_resnet18`
(loadable with ``ewgs_jax.configs.load_config("imagenet_resnet18", variant)``)."""

from ewgs_jax.configs.imagenet_resnet18 import get_config  # noqa: F401
