"""The built-in dataset kinds, each one function plus one registration (:func:`sources.register`).

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images shipped inside the
  installed package, no download); stored values 0..16, so ``pixel_max`` is 16.
* ``"mnist"`` / ``"fashion_mnist"``: the official IDX files (:mod:`ewgs_jax.data.idx`) when they
  are found, else tfds as below.
* ``"npz:PATH"``: a user's own arrays ``x_train, y_train, x_test, y_test`` (uint8, or float in
  [0, 1]; NHWC or NHW) and optionally ``num_classes`` in one ``.npz`` file, validated when opened
  (labels, non-finite pixels, shapes); normalised with its training split's statistics.
* any other name: ``tfds.data_source`` over prepared ``array_record`` files (no TensorFlow
  needed to read). ImageNet-style datasets are read as encoded JPEG bytes, decoded in the host
  transforms (at reduced scale where the crop allows). When a tfds dataset is not prepared, it is
  prepared with TensorFlow if installed, otherwise the error says what to run.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ewgs_jax import extras   # optional dependencies, each named with its extra
from ewgs_jax.data import idx, sources
from ewgs_jax.data.metadata import IMAGENET_SIZE, MEAN_STD, DataError, DatasetInfo

NPZ_PREFIX = "npz"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST = 360   # the last 360 digits are the test split


# --- digits ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  datasets = extras.require("sklearn.datasets", "the bundled digits dataset (the offline quickstart)")
  digits = datasets.load_digits()   # ships the data inside the installed package
  return digits.images[..., None].astype(np.uint8), digits.target   # integers 0..16, exactly


def digits_source(split: str, data_dir: str | None = None, name: str = "digits") -> sources.ArraySource:
  """scikit-learn's digits with a fixed split: the first 1,437 images train, the last 360 test.

  Args:
    split: ``"train"`` or ``"test"``.
    data_dir: unused (the data ship with scikit-learn).
    name: unused (the registry passes the dataset name).

  Returns:
    An :class:`~ewgs_jax.data.sources.ArraySource` of that split (uint8 images, 0..16).
  """
  del data_dir, name
  images, labels = _digits()
  cut = len(labels) - DIGITS_TEST
  if split == "train":
    return sources.ArraySource(images[:cut], labels[:cut], name="digits train")
  if split == "test":
    return sources.ArraySource(images[cut:], labels[cut:], name="digits test")
  raise ValueError(f"unknown split {split!r} for digits; valid: ['train', 'test']")


sources.register("digits", lambda name, split, data_dir: digits_source(split),
                 info=DatasetInfo("digits", 10, (8, 8, 1), *MEAN_STD["digits"], pixel_max=16.0))


# --- IDX files (MNIST, Fashion-MNIST), else tfds --------------------------------------------------


def _idx_open(name: str, split: str, data_dir: str | None) -> sources.Source:
  directory = idx.idx_directory(name, data_dir)
  if directory is not None:
    return sources.ArraySource(*idx.idx_split(directory, split), name=f"{name} {split} ({directory})")
  try:
    return _tfds_open(name, split, data_dir)
  except (ImportError, DataError, OSError, RuntimeError) as e:
    raise DataError(_no_idx_nor_tfds(name, data_dir, e)) from None


def _idx_info(name: str, data_dir: str | None) -> DatasetInfo:
  if idx.idx_directory(name, data_dir) is not None:
    return DatasetInfo(name, 10, (28, 28, 1), *MEAN_STD[name])
  try:
    return _tfds_info(name, data_dir)
  except (ImportError, DataError, OSError, RuntimeError) as e:
    raise DataError(_no_idx_nor_tfds(name, data_dir, e)) from None


def _no_idx_nor_tfds(name: str, data_dir: str | None, error: BaseException) -> str:
  reason = "not prepared" if "not prepared" in str(error) else _first_line(error)
  return (f"{idx.missing_idx_message(name, data_dir)}; nor could tfds read it ({reason}: "
          f"`tfds build {name} --file_format=array_record` prepares it)")


for _name in ("mnist", "fashion_mnist"):
  sources.register(_name, _idx_open, info=_idx_info)


def _first_line(error: BaseException) -> str:
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


# --- npz: a user's arrays -------------------------------------------------------------------------


def _first(mask: np.ndarray) -> int:
  return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


@functools.lru_cache(maxsize=4)
def npz_arrays(path: str) -> dict[str, np.ndarray]:
  """``x_train, y_train, x_test, y_test`` of a user's ``.npz``: images NHWC, labels int32, validated.

  Refused, naming the array and the first bad index: a missing array, images not NHW(C), labels
  not of shape (N,) or not integers, negative labels, labels >= ``num_classes`` (when the file
  stores it), NaN or infinite pixels, a test split whose image shape or dtype differs from the
  training split's, an empty split.

  Args:
    path: the ``.npz`` file.

  Returns:
    The four arrays by name, and ``num_classes`` (stored, else the largest label + 1).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz dataset {path!r} does not exist")
  try:
    with np.load(path) as f:
      missing = [k for k in NPZ_KEYS if k not in f.files]
      if missing:
        raise DataError(f"npz dataset {path!r} lacks {missing}; it must hold {list(NPZ_KEYS)} (has {f.files})")
      arrays = {k: np.asarray(f[k]) for k in NPZ_KEYS}
      stored_classes = int(f["num_classes"]) if "num_classes" in f.files else None
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"npz dataset {path!r} cannot be read ({_first_line(e)})") from None
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or y.shape != x.shape[:1]:
      raise DataError(f"npz dataset {path!r}: x_{split} {arrays[f'x_{split}'].shape} must be NHWC or NHW "
                      f"with y_{split} of shape (N,), got y_{split} {y.shape}")
    if len(y) == 0:
      raise DataError(f"npz dataset {path!r}: x_{split} is empty")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and
                                                  np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
      raise DataError(f"npz dataset {path!r}: y_{split} must hold integer class labels, has {y.dtype}")
    if (y < 0).any():
      i = int(np.flatnonzero(y < 0)[0])
      raise DataError(f"npz dataset {path!r}: y_{split}[{i}] = {y[i]} is negative; labels are 0..num_classes-1")
    if x.dtype != np.uint8:
      if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"npz dataset {path!r}: x_{split} has dtype {x.dtype}; store uint8, or float in [0, 1]")
      x = x.astype(np.float32)
      bad = ~np.isfinite(x)
      if bad.any():
        raise DataError(f"npz dataset {path!r}: x_{split}[{_first(bad)}] holds NaN or infinite pixels")
    arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int32)
  train, test = arrays["x_train"], arrays["x_test"]
  if train.dtype != np.uint8 and train.shape[1] >= 64:   # DatasetInfo.augmentation: the ImageNet path
    raise DataError(f"npz dataset {path!r}: images of {train.shape[1]} pixels or more are cropped and resized per "
                    f"image on the host as uint8 (the ImageNet path); store them as uint8 (0..255), not "
                    f"{train.dtype}")
  if test.shape[1:] != train.shape[1:] or test.dtype != train.dtype:
    raise DataError(f"npz dataset {path!r}: x_test images are {test.dtype} {test.shape[1:]} but x_train images are "
                    f"{train.dtype} {train.shape[1:]}; both splits need the same image shape, channels and dtype")
  largest = int(max(arrays["y_train"].max(), arrays["y_test"].max()))
  classes = stored_classes if stored_classes is not None else largest + 1
  for split in ("train", "test"):
    y = arrays[f"y_{split}"]
    if (y >= classes).any():
      i = int(np.flatnonzero(y >= classes)[0])
      raise DataError(f"npz dataset {path!r}: y_{split}[{i}] = {y[i]} >= num_classes {classes} (stored in the file)")
  arrays["num_classes"] = np.asarray(classes)
  return arrays


def _channel_stats(images: np.ndarray, pixel_max: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
  x = images.astype(np.float32) / pixel_max if pixel_max != 1.0 else images.astype(np.float32)
  axes = tuple(range(x.ndim - 1))
  return tuple(float(v) for v in x.mean(axes)), tuple(float(max(v, 1e-6)) for v in x.std(axes))


def _npz_open(name: str, split: str, data_dir: str | None) -> sources.ArraySource:
  arrays = npz_arrays(name.partition(":")[2])
  return sources.ArraySource(arrays[f"x_{split}"], arrays[f"y_{split}"], name=f"{name} {split}")


def _npz_info(name: str, data_dir: str | None) -> DatasetInfo:
  arrays = npz_arrays(name.partition(":")[2])
  pixel_max = 255.0 if arrays["x_train"].dtype == np.uint8 else 1.0
  return DatasetInfo(name, int(arrays["num_classes"]), tuple(arrays["x_train"].shape[1:]),
                     *_channel_stats(arrays["x_train"], pixel_max), pixel_max=pixel_max)


sources.register(NPZ_PREFIX, _npz_open, info=_npz_info, prefix=True)


# --- tfds ---------------------------------------------------------------------------------------


def _tfds(name: str):
  """``tensorflow_datasets`` (extra ``data``), for dataset ``name``."""
  return extras.require("tensorflow_datasets", f"dataset {name!r} (read through tensorflow-datasets)")


@functools.lru_cache(maxsize=1)
def _tfds_names() -> tuple[str, ...]:
  try:
    return tuple(_tfds("").list_builders(with_community_datasets=False))
  except Exception:   # near misses are a courtesy; never fail a message for them
    return ()


def _tfds_builder(name: str, data_dir: str | None):
  tfds = _tfds(name)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:   # tfds raises DatasetNotFoundError with a 250-line listing
    if type(e).__name__ == "DatasetNotFoundError":
      raise DataError(sources.unknown_dataset_message(name, _tfds_names())) from None
    raise DataError(f"dataset {name!r}: tfds cannot open it ({_first_line(e)})") from None


def _tfds_info(name: str, data_dir: str | None) -> DatasetInfo:
  info = _tfds_builder(name, data_dir).info
  shape = tuple(info.features["image"].shape)
  if name == "imagenet2012" or shape[0] is None:
    shape = (IMAGENET_SIZE, IMAGENET_SIZE, 3)
  channels = shape[-1]
  mean, std = MEAN_STD.get(name, ((0.5,) * channels, (0.25,) * channels))
  return DatasetInfo(name, info.features["label"].num_classes, shape, mean, std)


def _tfds_open(name: str, split: str, data_dir: str | None) -> sources.RecordSource:
  if split == "test" and name.startswith("imagenet"):
    split = "validation"   # ImageNet's labelled held-out split
  tfds = _tfds(name)
  # ImageNet-style images stay encoded: the host transforms decode them at the scale the crop needs.
  encoded = _tfds_info(name, data_dir).per_image_host_work
  kwargs = {"decoders": {"image": tfds.decode.SkipDecoding()}} if encoded else {}
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)
  except Exception:
    if not _prepare(name, data_dir):
      raise
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)
  return sources.RecordSource(records, name=f"{name}/{split}")


def _prepare(name: str, data_dir: str | None) -> bool:
  """Prepares an unprepared ``name`` with TensorFlow, else explains exactly what to do.

  Returns False if the dataset was already prepared (the caller's error was something else).
  """
  builder = _tfds_builder(name, data_dir)
  if builder.is_prepared():
    return False
  try:
    import tensorflow  # noqa: F401  (tfds needs it to download and encode)
  except ImportError:
    manual = (f" ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
              f"ILSVRC2012_img_val.tar in {os.path.join(builder.data_dir_root, 'downloads', 'manual')} first."
              if name.startswith("imagenet") else "")
    raise DataError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir_root}.{manual} Prepare it once "
        f"with TensorFlow installed: `pip install tensorflow && tfds build {name} "
        "--file_format=array_record" + (f" --data_dir={data_dir}" if data_dir else "") + "`, "
        "or install tensorflow and re-run this command to have it prepared automatically.") from None
  builder.download_and_prepare(file_format="array_record")
  return True


sources.register("tfds", _tfds_open, info=_tfds_info, fallback=True)
