"""Random-access sources of examples, and the registry that maps a dataset name to its source.

A source has ``len(source)`` and ``source.get(indices) -> (images, labels)``: a list of images
(uint8 or float HWC arrays, or encoded image bytes that the host transforms decode) and int32
labels. Sources are picklable, so worker processes can read them.

A dataset kind is one function plus one registration::

    def my_source(name, split, data_dir):      # split: "train" or "test"
      x, y = ...                                # uint8 NHWC images, integer labels
      return data.ArraySource(x, y)

    data.register("mine", my_source, info=data.DatasetInfo("mine", 10, (32, 32, 3), mean, std))

after which ``config.dataset = "mine"`` trains on it. ``prefix=True`` registers names of the form
``KEY:ARGUMENT`` (as ``npz:PATH``). Names that match no registered kind go to the fallback kind
(tfds). The held-out validation split (:class:`~ewgs_jax.data.metadata.Split`) is built here from
the training split, for every kind alike.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ewgs_jax.data.metadata import DataError, DatasetInfo, Split, hold_out

BASE_SPLITS = ("train", "test")


class Source(Protocol):
  """A random-access dataset split."""

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> tuple[Any, np.ndarray]: ...


class ArraySource:
  """An in-memory source: ``images`` uint8 NHWC (or float), ``labels`` int; ``name`` in error messages."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
    self.images, self.labels, self.name = images, np.asarray(labels).astype(np.int32), name

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]    # one gather: an NHWC array is a list of images


class SubsetSource:
  """The examples ``indices`` of another source, renumbered from 0."""

  def __init__(self, source: Source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices)
    self.name = getattr(source, "name", type(source).__name__)   # errors name the dataset, not the subset

  def __len__(self) -> int:
    return len(self.indices)

  def original(self, indices: np.ndarray) -> np.ndarray:
    """The records' indices in the underlying source (what error messages name).

    Args:
      indices: indices into this subset.

    Returns:
      Indices into the source this subset was taken from (through nested subsets).
    """
    inner = self.indices[np.asarray(indices)]
    return self.source.original(inner) if isinstance(self.source, SubsetSource) else inner

  def get(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
    return self.source.get(self.indices[np.asarray(indices)])


class RecordSource:
  """A source over records ``{"image", "label"}`` with random access, as ``tfds.data_source`` gives.

  ``records`` needs ``len()`` and ``records[i]`` (and uses ``records.__getitems__(keys)``, one
  batched read, where it exists). Images may be arrays or encoded bytes (decoded on the host).
  """

  def __init__(self, records, name: str = "records"):
    self.records, self.name = records, name

  def __len__(self) -> int:
    return len(self.records)

  def get(self, indices: np.ndarray) -> tuple[list, np.ndarray]:
    keys = [int(i) for i in indices]
    getitems = getattr(self.records, "__getitems__", None)
    try:
      records = getitems(keys) if getitems is not None else [self.records[k] for k in keys]
    except TypeError:                              # sources whose __getitems__ takes no list (tfds mocks)
      records = [self.records[k] for k in keys]
    images = [r["image"] if isinstance(r["image"], bytes) else np.asarray(r["image"]) for r in records]
    return images, np.asarray([r["label"] for r in records], np.int32)


# --- the registry ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """How to read one kind of dataset.

  ``open(name, split, data_dir)`` returns the ``"train"`` or ``"test"`` split as a source;
  ``info`` is the :class:`DatasetInfo`, or ``info(name, data_dir)`` computes it.
  """
  key: str
  open: Callable[[str, str, str | None], Source]
  info: DatasetInfo | Callable[[str, str | None], DatasetInfo]
  prefix: bool = False
  fallback: bool = False

  def dataset_info(self, name: str, data_dir: str | None) -> DatasetInfo:
    return self.info if isinstance(self.info, DatasetInfo) else self.info(name, data_dir)


REGISTRY: dict[str, SourceKind] = {}


def register(key: str, open: Callable[[str, str, str | None], Source], *,
             info: DatasetInfo | Callable[[str, str | None], DatasetInfo], prefix: bool = False,
             fallback: bool = False) -> SourceKind:
  """Registers a dataset kind (see the module docstring); a later registration of ``key`` replaces it.

  Args:
    key: the dataset name (or, with ``prefix``, the part before ``:``).
    open: ``open(name, split, data_dir) -> source`` for ``split`` ``"train"`` or ``"test"``.
    info: the dataset's :class:`DatasetInfo`, or ``info(name, data_dir) -> DatasetInfo``.
    prefix: names of the form ``KEY:ARGUMENT`` belong to this kind.
    fallback: names no other kind claims belong to this kind (one kind: tfds).

  Returns:
    The registered :class:`SourceKind`.
  """
  kind = SourceKind(key, open, info, prefix, fallback)
  REGISTRY[key] = kind
  return kind


def dataset_names() -> list[str]:
  """The names the registry knows (prefix kinds as ``KEY:...``), for messages.

  Returns:
    The sorted names.
  """
  return sorted(k + (":..." if kind.prefix else "") for k, kind in REGISTRY.items() if not kind.fallback)


def kind_of(name: str) -> SourceKind:
  """The kind that reads ``name``: an exact name, then a ``KEY:`` prefix, then the fallback kind.

  Args:
    name: the dataset name.

  Returns:
    The :class:`SourceKind`; raises :class:`DataError` (with near misses) if none claims ``name``.
  """
  kind = REGISTRY.get(name)
  if kind is not None and not kind.prefix:
    return kind
  key, sep, _ = name.partition(":")
  if sep and key in REGISTRY and REGISTRY[key].prefix:
    return REGISTRY[key]
  for kind in REGISTRY.values():
    if kind.fallback:
      return kind
  raise DataError(unknown_dataset_message(name, ()))


def unknown_dataset_message(name: str, more_names: Sequence[str]) -> str:
  """One line for a dataset name nothing reads, with the near misses among known names.

  Args:
    name: the unknown name.
    more_names: names known beyond the registry (e.g. tfds's builders).

  Returns:
    The message.
  """
  known = dataset_names()
  close = difflib.get_close_matches(name, [*known, *more_names], n=5, cutoff=0.6)
  hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
  return (f"unknown dataset {name!r}: {hint}built in: {', '.join(known)}; any other name must be a "
          "tensorflow-datasets name (`tfds.list_builders()` lists them)")


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Classes, shapes and normalisation of ``name`` (``"digits"``, ``"npz:PATH"``, IDX, tfds, ...).

  Args:
    name: the dataset name.
    data_dir: the data directory (IDX files, tfds), or ``None``.

  Returns:
    The :class:`DatasetInfo`; raises :class:`DataError` for a dataset nothing reads.
  """
  return kind_of(name).dataset_info(name, data_dir)


def open_split(name: str, split: str, data_dir: str | None = None, subset: Split = Split()) -> Source:
  """The source of ``split``: ``train`` (less the hold-out, up to the limit), ``validation``
  (the hold-out of the training split) or ``test``.

  Args:
    name: the dataset name.
    split: ``"train"``, ``"validation"`` or ``"test"``.
    data_dir: the data directory, or ``None``.
    subset: the validation hold-out and training limit.

  Returns:
    The source; raises ``ValueError`` for a split ``subset`` does not define.
  """
  if split not in (*BASE_SPLITS, "validation"):
    raise ValueError(f"unknown split {split!r}; valid: ['train', 'validation', 'test']")
  if split == "validation" and not subset.validation:
    raise ValueError("the validation split needs Split(validation=N) with N > 0")
  kind = kind_of(name)
  if split == "test" or (not subset.validation and not subset.train_limit):
    return kind.open(name, split, data_dir)
  train = kind.open(name, "train", data_dir)
  held, rest = hold_out(len(train), subset)
  return SubsetSource(train, held if split == "validation" else rest)


def check_record(image, label, info: DatasetInfo, where: str) -> None:
  """Raises :class:`DataError` naming ``where`` if one record does not fit ``info``.

  Args:
    image: the record's image (an array; encoded bytes are not checked here).
    label: its label.
    info: the dataset's info.
    where: the record's name in the message (dataset, split, index).
  """
  if not isinstance(image, bytes) and not info.per_image_host_work:
    shape = np.shape(image)
    expected = tuple(info.image_shape)
    if shape != expected and not (len(shape) == 2 and shape + (1,) == expected):
      raise DataError(f"{where}: image of shape {shape}, but the dataset's images are {expected}")
  if not 0 <= int(label) < info.num_classes:
    raise DataError(f"{where}: label {int(label)} is outside 0..{info.num_classes - 1}")


def _labels_in_memory(source) -> np.ndarray | None:
  if isinstance(source, SubsetSource):
    labels = _labels_in_memory(source.source)
    return None if labels is None else labels[source.indices]
  return source.labels if isinstance(source, ArraySource) else None


def check_splits(name: str, data_dir: str | None = None, subset: Split = Split()) -> DatasetInfo:
  """Opens every split a run reads and checks it before anything compiles (call at start-up).

  Each split (``subset.splits_read``) must open (file formats, counts and labels are checked as a
  kind opens it), hold at least one example, and yield a first and last record that fit the
  dataset's shape and classes. In-memory labels are all checked.

  Args:
    name: the dataset name.
    data_dir: the data directory, or ``None``.
    subset: the validation hold-out and training limit.

  Returns:
    The dataset's :class:`DatasetInfo`; raises :class:`DataError` naming the split and record.
  """
  info = get_dataset_info(name, data_dir)
  for split in subset.splits_read:
    source = open_split(name, split, data_dir, subset)
    if len(source) == 0:
      raise DataError(f"dataset {name!r}: the {split} split is empty")
    labels = _labels_in_memory(source)
    if labels is not None:
      bad = np.flatnonzero((labels < 0) | (labels >= info.num_classes))
      if bad.size:
        raise DataError(f"dataset {name!r}, {split} split: label[{bad[0]}] = {labels[bad[0]]} is outside "
                        f"0..{info.num_classes - 1}")
    for index in sorted({0, len(source) - 1}):
      images, labels_read = source.get(np.asarray([index]))
      check_record(images[0], labels_read[0], info, f"dataset {name!r}, {split} split, record {index}")
  return info
