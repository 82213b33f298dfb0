"""Training and evaluation iterators: uint8 batches of this process's rows, deterministic, resumable.

* An epoch is a seeded permutation of the training split; batch ``s`` of epoch ``e`` is a pure
  function of ``(seed, e, s)`` (:meth:`TrainBatches.batch_at`), so the iterator's state is just
  ``{"epoch", "step"}`` and resuming from it reproduces an uninterrupted run exactly.
* Process ``i`` of ``P`` reads only rows ``[i B/P, (i+1) B/P)`` of each global batch of ``B``
  (:mod:`ewgs_jax.parallel`), so every process count sees the same global batches.
* A training batch is ``{"image", "label", "position"}``: images as stored (uint8; float only for
  float data), labels int32, and each row's ``(seed, epoch, step, global row)`` as uint32, the key
  of its augmentation on the device (:mod:`ewgs_jax.data.device`). ImageNet-style images are
  cropped on the host (:mod:`ewgs_jax.data.host`) with a generator keyed the same way.
* Batches are produced ahead (:mod:`ewgs_jax.data.workers`): by a thread for in-memory data, by
  ``workers`` grain worker processes where each image is decoded (``workers=0``: in this process).
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
import numpy as np

from ewgs_jax.data import host, sources, workers as loaders
from ewgs_jax.data.metadata import DatasetInfo, Split

POSITION_DTYPE = np.uint32


def process_rows(global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> slice:
  """This process's contiguous block of rows of a global batch.

  Args:
    global_batch_size: the batch size over all processes.
    process_index: this process's index (default: ``jax.process_index()``).
    process_count: the number of processes (default: ``jax.process_count()``).

  Returns:
    The slice of rows; raises ``ValueError`` if the batch does not split evenly.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the process count {count}")
  per = global_batch_size // count
  return slice(index * per, (index + 1) * per)


def _source_name(source) -> str:
  return getattr(source, "name", type(source).__name__)


def _records(source, indices: np.ndarray) -> np.ndarray:
  """The rows' indices in the dataset's own numbering (through a subset), as error messages name them."""
  return source.original(indices) if hasattr(source, "original") else indices


class TrainBatches:
  """The pure function (epoch, step) -> this process's rows of that global batch; picklable."""

  def __init__(self, source, info: DatasetInfo, *, global_batch_size: int, seed: int, augment: bool, rows: slice):
    self.source, self.info, self.seed, self.augment, self.rows = source, info, seed, augment, rows
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = len(source) // global_batch_size
    self._order_cache: tuple[int, np.ndarray] | None = None

  def order(self, epoch: int) -> np.ndarray:
    """The epoch's seeded permutation of the source (cached: prefetch threads share it).

    Args:
      epoch: the epoch.

    Returns:
      The permutation.
    """
    cached = self._order_cache
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
      self._order_cache = cached
    return cached[1]

  def batch_at(self, epoch: int, step: int) -> dict:
    """This process's rows of global batch ``step`` of ``epoch``.

    Args:
      epoch: the epoch.
      step: the batch within the epoch.

    Returns:
      ``{"image", "label", "position"}`` (see the module docstring).
    """
    indices = self.order(epoch)[step * self.global_batch_size:(step + 1) * self.global_batch_size][self.rows]
    images, labels = self.source.get(indices)
    where = f"{_source_name(self.source)} (epoch {epoch}, step {step})"
    records = _records(self.source, indices)
    global_rows = range(self.rows.start, self.rows.stop)
    if not self.info.per_image_host_work:
      batch = host.stack_images(images, self.info, where, records)
    elif self.augment:   # per-image randomness keyed by the row's global position
      rngs = [host.row_rng(self.seed, epoch, step, r) for r in global_rows]
      batch = host.imagenet_batch(images, rngs, where, records)
    else:
      batch = host.imagenet_batch(images, None, where, records)
    position = np.empty((len(indices), 4), POSITION_DTYPE)
    position[:, 0], position[:, 1], position[:, 2] = self.seed % 2 ** 32, epoch, step
    position[:, 3] = global_rows
    return {"image": batch, "label": np.asarray(labels, np.int32), "position": position}

  def __call__(self, flat: int) -> dict:
    return self.batch_at(*divmod(flat, self.steps_per_epoch))

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_order_cache": None}   # workers recompute it; do not ship a permutation


class TrainIterator:
  """Infinite, deterministic, resumable iterator of this process's rows of each global batch."""

  def __init__(self, source, info: DatasetInfo, *, global_batch_size: int, seed: int, augment: bool = True,
               process_index: int | None = None, process_count: int | None = None, workers: int = 2,
               prefetch: int = 2):
    if global_batch_size > len(source):
      raise ValueError(f"batch size {global_batch_size} exceeds the {len(source)} training examples")
    self.batches = TrainBatches(source, info, global_batch_size=global_batch_size, seed=seed, augment=augment,
                                rows=process_rows(global_batch_size, process_index, process_count))
    self.source, self.info, self.seed, self.augment = source, info, seed, augment
    self.global_batch_size, self.rows = global_batch_size, self.batches.rows
    self.steps_per_epoch = self.batches.steps_per_epoch
    self.workers, self.prefetch = workers, prefetch
    self.epoch, self.step = 0, 0
    self._loader = None

  def batch_at(self, epoch: int, step: int) -> dict:
    """This process's rows of global batch ``step`` of ``epoch`` (a pure function of its args).

    Args:
      epoch: the epoch.
      step: the batch within the epoch.

    Returns:
      ``{"image", "label", "position"}``.
    """
    return self.batches.batch_at(epoch, step)

  def _order(self, epoch: int) -> np.ndarray:
    return self.batches.order(epoch)

  def _start_loader(self):
    flat = self.epoch * self.steps_per_epoch + self.step
    if self.info.per_image_host_work and self.workers > 0:
      describe = lambda f: "batch (epoch {}, step {})".format(*divmod(f, self.steps_per_epoch))  # noqa: E731
      return loaders.ProcessLoader(self.batches, flat, workers=self.workers, prefetch=self.prefetch,
                                   describe=describe)
    # In-process: each batch through this iterator's batch_at (one numpy gather for in-memory data).
    return loaders.ThreadLoader(lambda f: self.batch_at(*divmod(f, self.steps_per_epoch)), flat,
                                threads=max(self.workers, 1), prefetch=self.prefetch)

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    loader = self._loader
    if loader is None:
      loader = self._loader = self._start_loader()
    batch = next(loader)
    self.epoch, self.step = divmod(self.epoch * self.steps_per_epoch + self.step + 1, self.steps_per_epoch)
    return batch

  def get_state(self) -> dict:
    """Position of the next batch: ``{"epoch", "step"}`` (JSON-serialisable).

    Returns:
      The state, to be checkpointed and given back to :meth:`set_state`.
    """
    return {"epoch": self.epoch, "step": self.step}

  def set_state(self, state: dict) -> None:
    """Continues from a position :meth:`get_state` returned.

    Args:
      state: ``{"epoch", "step"}``.
    """
    self.close()
    self.epoch, self.step = int(state["epoch"]), int(state["step"])

  def close(self) -> None:
    """Stops the loader (threads or worker processes); the next batch starts a new one."""
    if self._loader is not None:
      self._loader.close()
      self._loader = None

  def __del__(self):
    try:
      self.close()
    except Exception:   # at interpreter exit, modules may already be gone
      pass


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
    workers: worker processes decoding ImageNet-style images (0: in this process); for
      in-memory data, the threads gathering batches.
    subset: the validation hold-out and training limit.

  Returns:
    The iterator of this process's rows of each global batch.
  """
  info = sources.get_dataset_info(name, data_dir)
  return TrainIterator(sources.open_split(name, "train", data_dir, subset), info, global_batch_size=global_batch_size,
                       seed=seed, augment=augment, process_index=process_index, process_count=process_count,
                       workers=workers)


class EvalBatches:
  """The pure function i -> this process's rows of evaluation batch ``i`` (padded, masked); picklable."""

  def __init__(self, source, info: DatasetInfo, *, global_batch_size: int, rows: slice):
    self.source, self.info, self.global_batch_size, self.rows = source, info, global_batch_size, rows
    self.num_batches = math.ceil(len(source) / global_batch_size)

  def __call__(self, i: int) -> dict:
    n = len(self.source)
    indices = np.arange(i * self.global_batch_size, (i + 1) * self.global_batch_size)
    mask = indices < n
    indices = np.where(mask, indices, n - 1)[self.rows]
    images, labels = self.source.get(indices)
    where = f"{_source_name(self.source)} (evaluation batch {i})"
    records = _records(self.source, indices)
    if self.info.per_image_host_work:
      batch = host.imagenet_batch(images, None, where, records)
    else:
      batch = host.stack_images(images, self.info, where, records)
    return {"image": batch, "label": np.asarray(labels, np.int32), "mask": mask[self.rows].astype(np.float32)}


def make_eval_iterator(name: str, *, global_batch_size: int, split: str | None = None,
                       data_dir: str | None = None, process_index: int | None = None,
                       process_count: int | None = None, subset: Split = Split(),
                       workers: int = 2) -> Iterator[dict]:
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
    workers: worker processes decoding ImageNet-style images (0: in this process).

  Returns:
    An iterator of this process's rows of each global batch: ``{"image", "label", "mask"}``,
    images as stored (uint8), ``mask`` float32 (1 for a real example, 0 for padding).
  """
  info = sources.get_dataset_info(name, data_dir)
  source = sources.open_split(name, split or subset.eval_split, data_dir, subset)
  batches = EvalBatches(source, info, global_batch_size=global_batch_size,
                        rows=process_rows(global_batch_size, process_index, process_count))
  return _eval_batches(batches, workers)


def _eval_batches(batches: EvalBatches, workers: int) -> Iterator[dict]:
  loader: loaders.ProcessLoader | loaders.ThreadLoader
  if batches.info.per_image_host_work and workers > 0:
    loader = loaders.ProcessLoader(batches, 0, stop=batches.num_batches, workers=workers,
                                   describe=lambda i: f"evaluation batch {i}")
  else:
    loader = loaders.ThreadLoader(batches, 0, stop=batches.num_batches)
  try:
    yield from loader
  finally:
    loader.close()
