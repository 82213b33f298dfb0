"""The IDX file format of MNIST and Fashion-MNIST: reading a file, finding a dataset's four files.

Files are found in ``data_dir`` or ``data_dir/<name>``, gzipped or not; for Fashion-MNIST also in
``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist`` package installs
them. Every failure is a :class:`~ewgs_jax.data.metadata.DataError` naming the file.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib

import numpy as np

from ewgs_jax.data.metadata import DataError

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SYSTEM_IDX_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",)}   # Debian's package
_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: corrupt or truncated gzip file ({e}); download it again") from None


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the MNIST format; gzipped or not) into a numpy array.

  Header: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C
  int32, 0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
  big-endian int32; the data follow in C order, big-endian.

  Args:
    path: the file, ``.gz`` or not.

  Returns:
    The array in native byte order, with the header's shape; raises :class:`DataError` for a bad
    header, a corrupt gzip stream, or a size that does not match the header.
  """
  raw = _read_bytes(str(path))
  header = raw[:4]
  if len(header) < 4 or header[:2] != b"\x00\x00" or header[2] not in _TYPES:
    raise DataError(f"{path} is not an IDX file (bad magic number {header.hex()})")
  dims = header[3]
  if len(raw) < 4 + 4 * dims:
    raise DataError(f"{path}: truncated IDX header")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
  dtype = np.dtype(_TYPES[header[2]])
  payload = raw[4 + 4 * dims:]
  count = math.prod(shape)
  if len(payload) != count * dtype.itemsize:
    raise DataError(f"{path}: header says {shape} ({count * dtype.itemsize} bytes), file has {len(payload)}")
  return np.frombuffer(payload, dtype).astype(dtype.newbyteorder("=")).reshape(shape)


def candidate_dirs(name: str, data_dir: str | None) -> list[str]:
  """Where the IDX files of ``name`` are looked for, in order.

  Args:
    name: ``"mnist"`` or ``"fashion_mnist"``.
    data_dir: the configured data directory, or ``None``.

  Returns:
    ``data_dir`` and ``data_dir/<name>``, or the system directories when ``data_dir`` is not set.
  """
  dirs = [data_dir, os.path.join(data_dir, name)] if data_dir else []
  return dirs + [d for d in SYSTEM_IDX_DIRS.get(name, ()) if not data_dir]


def _find(directory: str, stem: str) -> str | None:
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
  for directory in candidate_dirs(name, data_dir):
    if all(_find(directory, stem) for stems in IDX_FILES.values() for stem in stems):
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
  dirs = candidate_dirs(name, data_dir)
  where = " or ".join(d + ("" if os.path.isdir(d) else " (no such directory)") for d in dirs)
  return f"{name}: expected the IDX files {files} in {where or 'data_dir (config.data_dir is not set)'}"


@functools.lru_cache(maxsize=8)
def idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The images (uint8 NHWC) and labels of one split in ``directory``, checked against each other.

  Args:
    directory: a directory holding the four IDX files.
    split: ``"train"`` or ``"test"``.

  Returns:
    ``(images, labels)``; raises :class:`DataError` naming the files if their counts differ or
    the images are not N x H x W bytes.
  """
  # a file missing here was there when the directory was found: read_idx then names the path it looked for
  images_path, labels_path = (_find(directory, stem) or os.path.join(directory, stem) for stem in IDX_FILES[split])
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(f"{images_path}: expected N x H x W unsigned bytes, got {images.dtype} {images.shape}")
  if labels.shape != images.shape[:1]:
    raise DataError(f"{directory}: the {split} split has {images.shape[0]} images ({os.path.basename(images_path)}) "
                    f"but labels of shape {labels.shape} ({os.path.basename(labels_path)})")
  return images[..., None], labels
