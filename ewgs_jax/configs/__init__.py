"""The shipped training configs, importable from the package: ``ewgs_jax.config.load_config(name, variant)``.

Each module has ``get_config(variant=None)``; ``configs/<name>.py`` at the repository root forwards to
it so that ``train.py --config configs/<name>.py:<variant>`` keeps working.
"""

NAMES = ("cifar10_resnet20", "fashion_mnist_resnet20", "imagenet_resnet18", "quickstart")
