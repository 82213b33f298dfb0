"""Input pipeline: tfds image-classification datasets (TF-free), local files, a bundled dataset.

Sources are random-access:

* ``"mnist"`` / ``"fashion_mnist"``: the official IDX files (gzipped or not) when they are in
  ``data_dir`` (or ``data_dir/<name>``; for Fashion-MNIST also ``/usr/share/datasets/fashion-mnist``,
  where Debian's ``dataset-fashion-mnist`` package installs them), else tfds as below.
* ``"npz:PATH"``: a user's own arrays ``x_train, y_train, x_test, y_test`` (uint8 or float in
  [0, 1], NHWC or NHW) in one ``.npz`` file; normalised with its training split's statistics.
* any other name: ``tfds.data_source`` over prepared ``array_record`` files (no TensorFlow
  needed to read). When a tfds dataset is not prepared, it is prepared with TensorFlow if
  installed, otherwise the error says what to run.
* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images shipped inside the
  installed package, no download).

A :class:`Split` can hold out a fixed part of the training split as a validation set (so that
defaults are tuned without touching the test split) and limit training to a subset.

Loader (our own rather than grain's per-record transforms, which were an order of magnitude
slower than batch-level numpy on a small CPU machine; figures: ``benchmarks/README.md``, section
"Figures cited by module docstrings", ``data``):

* An epoch is a seeded permutation of the training split; batch ``s`` of epoch ``e`` is a pure
  function of ``(seed, e, s)``, so the iterator's state is just ``{"epoch", "step"}`` and resuming
  from it reproduces an uninterrupted run exactly.
* Augmentation randomness is drawn for the whole global batch from ``(seed, e, s)``, then each
  process keeps its own rows (:mod:`ewgs_jax.parallel`: process ``i`` owns the ``i``-th contiguous
  block), so every process count sees the same global batches and reads only its own records.
* Records are fetched by a thread pool (``workers``) and upcoming batches are prefetched;
  transforms are vectorised over the batch (crop, flip, normalise).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import math
import os
from typing import Iterator

import jax
import numpy as np

from ewgs_jax import extras   # optional dependencies, each named with its extra

BUNDLED = ("digits",)
IDX_DATASETS = ("mnist", "fashion_mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SYSTEM_IDX_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}   # Debian's package
NPZ_PREFIX = "npz:"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
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


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the loop need to know about a dataset (from tfds metadata or built in)."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]   # training image shape after transforms
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def augmentation(self) -> str:
    """``imagenet`` (random resized crop + flip), ``crop_flip`` (CIFAR: 4-pixel pad crop + flip),
    ``crop`` (the same without the flip, for handwritten digits, which a mirror does not preserve),
    or ``shift`` (1-pixel pad crop, for the tiny 8x8 bundled digits)."""
    if self.name == "imagenet2012" or self.image_shape[0] >= 64:
      return "imagenet"
    if self.name in BUNDLED or self.image_shape[0] < 28:
      return "shift"
    return "crop" if self.name in NO_FLIP else "crop_flip"


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


# --- sources ------------------------------------------------------------------------------------


class ArraySource:
  """An in-memory source: ``images`` uint8 NHWC (or float in [0, 1]), ``labels`` int."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    return list(self.images[indices]), self.labels[indices]


class SubsetSource:
  """The examples ``indices`` of another source, renumbered from 0."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def get(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    return self.source.get(self.indices[np.asarray(indices)])


def _open(path: str):
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the MNIST format; gzipped or not) into a numpy array.

  Header: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C
  int32, 0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
  big-endian int32; the data follow in C order, big-endian.

  Args:
    path: the file, ``.gz`` or not.

  Returns:
    The array in native byte order, with the header's shape; raises ``ValueError`` for a bad
    header or a size that does not match it.
  """
  types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  with _open(path) as f:
    header = f.read(4)
    if len(header) < 4 or header[:2] != b"\x00\x00" or header[2] not in types:
      raise ValueError(f"{path} is not an IDX file (bad magic number {header.hex()})")
    shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(header[3]))
    dtype = np.dtype(types[header[2]])
    payload = f.read()
  count = math.prod(shape)
  if len(payload) != count * dtype.itemsize:
    raise ValueError(f"{path}: header says {shape} ({count * dtype.itemsize} bytes), file has {len(payload)}")
  return np.frombuffer(payload, dtype).astype(dtype.newbyteorder("=")).reshape(shape)


def _idx_dirs(name: str, data_dir: str | None) -> list[str]:
  dirs = [data_dir, os.path.join(data_dir, name)] if data_dir else []
  return dirs + [d for d in SYSTEM_IDX_DIRS.get(name, ()) if not data_dir]


def _find_idx(directory: str, stem: str) -> str | None:
  for candidate in (stem, stem + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def idx_directory(name: str, data_dir: str | None) -> str | None:
  """The first directory holding all four IDX files of ``name`` (see the module docstring).

  Args:
    name: ``"mnist"`` or ``"fashion_mnist"``.
    data_dir: the configured data directory, or ``None``.

  Returns:
    The directory, or ``None`` if no candidate holds all four files.
  """
  for directory in _idx_dirs(name, data_dir):
    if all(_find_idx(directory, stem) for stems in IDX_FILES.values() for stem in stems):
      return directory
  return None


def missing_idx_message(name: str, data_dir: str | None) -> str:
  """The error message when no directory holds the IDX files of ``name``.

  Args:
    name: ``"mnist"`` or ``"fashion_mnist"``.
    data_dir: the configured data directory, or ``None``.

  Returns:
    The message, listing the expected file names and the directories searched.
  """
  files = ", ".join(f"{stem}[.gz]" for stems in IDX_FILES.values() for stem in stems)
  where = " or ".join(_idx_dirs(name, data_dir)) or "data_dir (config.data_dir is not set)"
  return f"{name}: expected the IDX files {files} in {where}"


@functools.lru_cache(maxsize=8)
def _idx_arrays(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  images_stem, labels_stem = IDX_FILES[split]
  # idx_directory found both; a file removed since then fails in read_idx, naming its path
  images = read_idx(_find_idx(directory, images_stem) or os.path.join(directory, images_stem))
  labels = read_idx(_find_idx(directory, labels_stem) or os.path.join(directory, labels_stem))
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
  return images[..., None], labels


@functools.lru_cache(maxsize=4)
def _npz_arrays(path: str) -> dict[str, np.ndarray]:
  """``x_train, y_train, x_test, y_test`` of a user's ``.npz``, images as NHWC, labels int32."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz dataset {path!r} does not exist")
  with np.load(path) as f:
    missing = [k for k in NPZ_KEYS if k not in f.files]
    if missing:
      raise ValueError(f"npz dataset {path!r} lacks {missing}; it must hold {list(NPZ_KEYS)} (has {f.files})")
    arrays = {k: np.asarray(f[k]) for k in NPZ_KEYS}
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or y.shape != x.shape[:1]:
      raise ValueError(f"npz dataset {path!r}: x_{split} {arrays[f'x_{split}'].shape} must be NHWC or NHW "
                       f"with y_{split} of shape (N,), got y_{split} {y.shape}")
    if x.dtype != np.uint8:
      x = x.astype(np.float32)
    arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int32)
  return arrays


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  datasets = extras.require("sklearn.datasets", "the bundled digits dataset (the offline quickstart)")
  digits = datasets.load_digits()   # ships the data inside the installed package
  images = (digits.images[..., None] / 16.0).astype(np.float32)
  return images, digits.target


def digits_source(split: str) -> ArraySource:
  """scikit-learn's digits with a fixed split: the first 1,437 images train, the last 360 test.

  Args:
    split: ``"train"`` or ``"test"``.

  Returns:
    An :class:`ArraySource` of that split; raises ``ValueError`` for another split.
  """
  images, labels = _digits()
  cut = len(labels) - 360
  if split == "train":
    return ArraySource(images[:cut], labels[:cut])
  if split == "test":
    return ArraySource(images[cut:], labels[cut:])
  raise ValueError(f"unknown split {split!r} for digits; valid: ['train', 'test']")


def _tfds(name: str):
  """``tensorflow_datasets`` (extra ``data``), for dataset ``name``."""
  return extras.require("tensorflow_datasets", f"dataset {name!r} (read through tensorflow-datasets)")


class TfdsSource:
  """A prepared tfds split read through ``tfds.data_source`` (random access, no TensorFlow)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    tfds = _tfds(name)
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:
      if not _prepare(name, data_dir):
        raise
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  def __len__(self) -> int:
    return len(self.source)

  def get(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    keys = [int(i) for i in indices]
    try:
      records = self.source.__getitems__(keys)     # one batched array_record read
    except TypeError:                              # sources without batched reads (tfds mocks)
      records = [self.source[k] for k in keys]
    return [np.asarray(r["image"]) for r in records], np.asarray([r["label"] for r in records], np.int32)


def _prepare(name: str, data_dir: str | None) -> bool:
  """Prepares an unprepared ``name`` with TensorFlow, else explains exactly what to do.

  Returns False if the dataset was already prepared (the caller's error was something else).
  """
  tfds = _tfds(name)
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return False
  try:
    import tensorflow  # noqa: F401  (tfds needs it to download and encode)
  except ImportError:
    manual = (f" ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
              f"ILSVRC2012_img_val.tar in {os.path.join(builder.data_dir_root, 'downloads', 'manual')} first."
              if name.startswith("imagenet") else "")
    raise RuntimeError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir_root}.{manual} Prepare it once "
        f"with TensorFlow installed: `pip install tensorflow && tfds build {name} "
        "--file_format=array_record" + (f" --data_dir={data_dir}" if data_dir else "") + "`, "
        "or install tensorflow and re-run this command to have it prepared automatically.") from None
  builder.download_and_prepare(file_format="array_record")
  return True


def _base_source(name: str, split: str, data_dir: str | None):
  """The dataset's own ``train`` or ``test`` split."""
  if name == "digits":
    return digits_source(split)
  if name.startswith(NPZ_PREFIX):
    arrays = _npz_arrays(name[len(NPZ_PREFIX):])
    return ArraySource(arrays[f"x_{split}"], arrays[f"y_{split}"])
  if name in IDX_DATASETS:
    directory = idx_directory(name, data_dir)
    if directory is not None:
      return ArraySource(*_idx_arrays(directory, split))
    try:
      return TfdsSource(name, split, data_dir)
    except Exception as e:
      raise RuntimeError(f"{missing_idx_message(name, data_dir)}; nor could tfds read it ({e})") from None
  if split == "test" and name.startswith("imagenet"):
    split = "validation"   # ImageNet's labelled held-out split
  return TfdsSource(name, split, data_dir)


def _source(name: str, split: str, data_dir: str | None, subset: Split = Split()):
  """``split`` is ``train``, ``validation`` (held out of train by ``subset``) or ``test``."""
  if split == "validation" and not subset.validation:
    raise ValueError("the validation split needs Split(validation=N) with N > 0")
  if split == "test" or (not subset.validation and not subset.train_limit):
    return _base_source(name, split, data_dir)
  train = _base_source(name, "train", data_dir)
  if subset.validation >= len(train):
    raise ValueError(f"cannot hold out {subset.validation} validation examples of {len(train)} training examples")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
  held, rest = order[:subset.validation], np.sort(order[subset.validation:])
  if split == "validation":
    return SubsetSource(train, np.sort(held))
  if subset.train_limit:
    rest = np.sort(np.random.default_rng(SPLIT_SEED + 1).permutation(rest)[:subset.train_limit])
  return SubsetSource(train, rest)


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  x = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
  axes = tuple(range(x.ndim - 1))
  return tuple(float(v) for v in x.mean(axes)), tuple(float(max(v, 1e-6)) for v in x.std(axes))


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Classes, shapes and normalisation of ``name`` (``"digits"``, ``"npz:PATH"``, IDX or tfds).

  Args:
    name: the dataset name.
    data_dir: the data directory (IDX files, tfds), or ``None``.

  Returns:
    The :class:`DatasetInfo`; raises ``ValueError`` for a dataset tfds does not know.
  """
  if name == "digits":
    return DatasetInfo("digits", 10, (8, 8, 1), *MEAN_STD["digits"])
  if name.startswith(NPZ_PREFIX):
    arrays = _npz_arrays(name[len(NPZ_PREFIX):])
    classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return DatasetInfo(name, classes, tuple(arrays["x_train"].shape[1:]), *_channel_stats(arrays["x_train"]))
  if name in IDX_DATASETS and idx_directory(name, data_dir) is not None:
    return DatasetInfo(name, 10, (28, 28, 1), *MEAN_STD[name])
  tfds = _tfds(name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError with its own listing
    raise ValueError(f"unknown dataset {name!r}: {e}") from None
  info = builder.info
  shape = tuple(info.features["image"].shape)
  if name == "imagenet2012" or shape[0] is None:
    shape = (IMAGENET_SIZE, IMAGENET_SIZE, 3)
  channels = shape[-1]
  mean, std = MEAN_STD.get(name, ((0.5,) * channels, (0.25,) * channels))
  return DatasetInfo(name, info.features["label"].num_classes, shape, mean, std)


# --- transforms (vectorised over the batch) -----------------------------------------------------


def _to_float(images: list[np.ndarray]) -> np.ndarray:
  batch = np.stack(images)
  return batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else batch.astype(np.float32)


def crop_and_flip(batch: np.ndarray, rng: np.random.Generator, pad: int, flip: bool) -> np.ndarray:
  """Random crop with ``pad`` zero pixels on each side (torch RandomCrop) and horizontal flip.

  Args:
    batch: an NHWC batch.
    rng: the generator drawing the offsets and flips.
    pad: the zero padding on each side, and so the largest shift.
    flip: whether to flip each image horizontally with probability 1/2.

  Returns:
    The augmented batch, the same shape as ``batch``.
  """
  n, h, w, _ = batch.shape
  padded = np.pad(batch, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
  flips = np.asarray(rng.random(n) < 0.5) if flip else np.zeros(n, bool)
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _imagenet_train(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Random resized crop to 224 (scale 0.08-1, ratio 3/4-4/3, torchvision defaults) + flip."""
  Image = extras.require("PIL.Image", "ImageNet's image transforms")
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:
    ch, cw = min(h, w), min(h, w)
    y, x = (h - ch) // 2, (w - cw) // 2
  crop = Image.fromarray(image[y:y + ch, x:x + cw]).resize((IMAGENET_SIZE, IMAGENET_SIZE), Image.BILINEAR)
  out = np.asarray(crop)
  return out[:, ::-1] if rng.random() < 0.5 else out


def _imagenet_eval(image: np.ndarray) -> np.ndarray:
  """Resize the shorter side to 256, centre crop 224."""
  Image = extras.require("PIL.Image", "ImageNet's image transforms")
  h, w = image.shape[:2]
  scale = IMAGENET_RESIZE / min(h, w)
  resized = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
  top, left = (resized.shape[0] - IMAGENET_SIZE) // 2, (resized.shape[1] - IMAGENET_SIZE) // 2
  return resized[top:top + IMAGENET_SIZE, left:left + IMAGENET_SIZE]


def transform(images: list[np.ndarray], info: DatasetInfo, rng: np.random.Generator | None) -> np.ndarray:
  """Augments (when ``rng`` is given) and normalises a list of images into a float NHWC batch.

  Args:
    images: the images (uint8 or float in [0, 1], HWC).
    info: the dataset's info (its augmentation kind, mean and std).
    rng: the generator for the augmentation, or ``None`` for evaluation (no augmentation).

  Returns:
    The normalised float batch, NHWC.
  """
  if info.augmentation == "imagenet":
    batch = _to_float([_imagenet_train(im, rng) if rng is not None else _imagenet_eval(im) for im in images])
  else:
    batch = _to_float(images)
    if rng is not None:
      batch = crop_and_flip(batch, rng, pad=1 if info.augmentation == "shift" else 4,
                            flip=info.augmentation == "crop_flip")
  return (batch - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


# --- iterators ----------------------------------------------------------------------------------


def _process_rows(global_batch_size: int, process_index: int | None, process_count: int | None) -> slice:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the process count {count}")
  per = global_batch_size // count
  return slice(index * per, (index + 1) * per)


class TrainIterator:
  """Infinite, deterministic, resumable iterator of this process's rows of each global batch."""

  def __init__(self, source, info: DatasetInfo, *, global_batch_size: int, seed: int, augment: bool = True,
               process_index: int | None = None, process_count: int | None = None, workers: int = 2,
               prefetch: int = 2):
    if global_batch_size > len(source):
      raise ValueError(f"batch size {global_batch_size} exceeds the {len(source)} training examples")
    self.source, self.info, self.seed, self.augment = source, info, seed, augment
    self.global_batch_size = global_batch_size
    self.rows = _process_rows(global_batch_size, process_index, process_count)
    self.steps_per_epoch = len(source) // global_batch_size
    self.epoch, self.step = 0, 0
    self._order_cache: tuple[int, np.ndarray] | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(max(workers, 1))
    self._prefetch = max(prefetch, 0)
    self._queue: list[tuple[tuple[int, int], concurrent.futures.Future]] = []

  def batch_at(self, epoch: int, step: int) -> dict:
    """This process's rows of global batch ``step`` of ``epoch`` (a pure function of its args)."""
    order = self._order(epoch)
    indices = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
    rng = np.random.default_rng([self.seed, epoch, step, 1]) if self.augment else None
    if rng is not None and self.info.augmentation != "imagenet":
      # Draw augmentation for the whole global batch, then keep our rows: same for any process count.
      images, labels = self.source.get(indices)
      batch = transform(images, self.info, rng)[self.rows]
      return {"image": batch, "label": labels[self.rows]}
    images, labels = self.source.get(indices[self.rows])
    if rng is not None:   # per-image randomness keyed by the row's global position
      rngs = [np.random.default_rng([self.seed, epoch, step, 2, r]) for r in range(self.rows.start, self.rows.stop)]
      batch = _to_float([_imagenet_train(im, g) for im, g in zip(images, rngs)])
      batch = (batch - np.asarray(self.info.mean, np.float32)) / np.asarray(self.info.std, np.float32)
    else:
      batch = transform(images, self.info, None)
    return {"image": batch, "label": labels}

  def _order(self, epoch: int) -> np.ndarray:
    """The epoch's seeded permutation, cached per iterator (prefetch threads share it)."""
    cached = self._order_cache
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
      self._order_cache = cached
    return cached[1]

  def _position(self, ahead: int) -> tuple[int, int]:
    flat = self.epoch * self.steps_per_epoch + self.step + ahead
    return divmod(flat, self.steps_per_epoch)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    while len(self._queue) < self._prefetch + 1:
      position = self._position(len(self._queue))
      self._queue.append((position, self._pool.submit(self.batch_at, *position)))
    position, future = self._queue.pop(0)
    assert position == (self.epoch, self.step)
    self.epoch, self.step = self._position(1)
    return future.result()

  def get_state(self) -> dict:
    """Position of the next batch: ``{"epoch", "step"}`` (JSON-serialisable)."""
    return {"epoch": self.epoch, "step": self.step}

  def set_state(self, state: dict) -> None:
    self.epoch, self.step = int(state["epoch"]), int(state["step"])
    self._queue.clear()


def make_train_iterator(name: str, *, global_batch_size: int, seed: int, data_dir: str | None = None,
                        augment: bool = True, process_index: int | None = None,
                        process_count: int | None = None, workers: int = 2,
                        subset: Split = Split()) -> TrainIterator:
  """The training examples of ``subset`` (default: the whole training split) as a :class:`TrainIterator`.

  Args:
    name: the dataset name.
    global_batch_size: the batch size over all processes.
    seed: the seed of the epoch permutations and the augmentation.
    data_dir: the data directory, or ``None``.
    augment: whether to augment the training images.
    process_index: this process's index (default: ``jax.process_index()``).
    process_count: the number of processes (default: ``jax.process_count()``).
    workers: the threads fetching records.
    subset: the validation hold-out and training limit.

  Returns:
    The iterator of this process's rows of each global batch.
  """
  info = get_dataset_info(name, data_dir)
  return TrainIterator(_source(name, "train", data_dir, subset), info, global_batch_size=global_batch_size, seed=seed,
                       augment=augment, process_index=process_index, process_count=process_count,
                       workers=workers)


def make_eval_iterator(name: str, *, global_batch_size: int, split: str | None = None,
                       data_dir: str | None = None, process_index: int | None = None,
                       process_count: int | None = None, subset: Split = Split()) -> Iterator[dict]:
  """The whole split once, in order; the last batch is padded and ``mask`` marks real examples.

  ``split`` defaults to ``subset.eval_split`` (``test``, or ``validation`` when examples are held out).

  Args:
    name: the dataset name.
    global_batch_size: the batch size over all processes.
    split: the split to read, or ``None`` for ``subset.eval_split``.
    data_dir: the data directory, or ``None``.
    process_index: this process's index (default: ``jax.process_index()``).
    process_count: the number of processes (default: ``jax.process_count()``).
    subset: the validation hold-out (and so which examples the split holds).

  Returns:
    An iterator of this process's rows of each global batch: ``{"image", "label", "mask"}``,
    ``mask`` float32 (1 for a real example, 0 for padding).
  """
  info = get_dataset_info(name, data_dir)
  source = _source(name, split or subset.eval_split, data_dir, subset)
  rows = _process_rows(global_batch_size, process_index, process_count)
  for start in range(0, len(source), global_batch_size):
    indices = np.arange(start, start + global_batch_size)
    mask = indices < len(source)
    indices = np.where(mask, indices, len(source) - 1)[rows]
    images, labels = source.get(indices)
    yield {"image": transform(images, info, None), "label": labels, "mask": mask[rows].astype(np.float32)}
