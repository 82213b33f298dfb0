"""What a run needs to know about a dataset, which of its examples it uses, and the input error type.

* :class:`DatasetInfo`: classes, image shape, normalisation, and how the stored pixels scale to
  [0, 1] (``pixel_max``: 255 for uint8 images, 16 for scikit-learn's digits, 1 for float images).
* :class:`Split` and :func:`hold_out`: a fixed validation hold-out of the training split and an
  optional limit on the training examples.
* :class:`DataError`: bad input data (a corrupt file, a bad label, a record of the wrong shape, a
  dead worker process); a ``ValueError``, so the command line prints it as one line.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLIT_SEED = 20211   # fixed: every run holds out the same validation examples, whatever its seed
MEAN_STD = {
    "digits": ((0.3054,), (0.3755,)),          # computed over the digits training split
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),   # as the reference EWGS code
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGENET_SIZE, IMAGENET_RESIZE = 224, 256
NO_FLIP = ("mnist", "emnist", "kmnist", "svhn_cropped")   # a mirror changes what these show
SMALL_IMAGES = ("digits",)   # 8x8: a 1-pixel shift instead of the 4-pixel pad crop


class DataError(ValueError):
  """Bad input data: the message names the file, array, record or worker, and what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset (from tfds metadata or built in).

  ``image_shape`` is the shape the model sees (after the host transforms: 224x224x3 for ImageNet);
  ``pixel_max`` the stored value of a white pixel, so that ``pixel / pixel_max`` is in [0, 1]
  before normalisation with ``mean`` and ``std``.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  pixel_max: float = 255.0

  @property
  def augmentation(self) -> str:
    """``imagenet`` (random resized crop + flip, per image on the host), ``crop_flip`` (CIFAR:
    4-pixel pad crop + flip, on the device), ``crop`` (the same without the flip, for handwritten
    digits, which a mirror does not preserve), or ``shift`` (1-pixel pad crop, for tiny 8x8 images)."""
    if self.name == "imagenet2012" or self.image_shape[0] >= 64:
      return "imagenet"
    if self.name in SMALL_IMAGES or self.image_shape[0] < 28:
      return "shift"
    return "crop" if self.name in NO_FLIP else "crop_flip"

  @property
  def per_image_host_work(self) -> bool:
    """Whether each image is decoded and cropped on the host (worth worker processes)."""
    return self.augmentation == "imagenet"


@dataclasses.dataclass(frozen=True)
class Split:
  """Which examples a run trains and evaluates on.

  ``validation``: hold out this many training examples (a fixed permutation, the same for every
  run) and evaluate on them instead of the test split (0: train on the whole training split and
  evaluate on the test split). ``train_limit``: train on at most this many of the remaining
  examples (0: all), e.g. for CPU-sized comparisons.
  """
  validation: int = 0
  train_limit: int = 0

  @property
  def eval_split(self) -> str:
    return "validation" if self.validation else "test"

  @property
  def splits_read(self) -> tuple[str, ...]:
    """Every split a run reads: training, its evaluation split, and the test split at the end."""
    return ("train", "validation", "test") if self.validation else ("train", "test")


def hold_out(num_train: int, subset: Split) -> tuple[np.ndarray, np.ndarray]:
  """The held-out validation examples and the training examples of a training split, in order.

  Args:
    num_train: the size of the dataset's training split.
    subset: the hold-out and the training limit.

  Returns:
    ``(validation, train)`` index arrays into the training split, each sorted; raises
    :class:`DataError` if the hold-out would leave no training example.
  """
  if subset.validation >= num_train:
    raise DataError(f"cannot hold out {subset.validation} validation examples of {num_train} training examples; "
                    f"choose validation_examples < {num_train}")
  order = np.random.default_rng(SPLIT_SEED).permutation(num_train)
  held, rest = order[:subset.validation], np.sort(order[subset.validation:])
  if subset.train_limit:
    rest = np.sort(np.random.default_rng(SPLIT_SEED + 1).permutation(rest)[:subset.train_limit])
  return np.sort(held), rest
