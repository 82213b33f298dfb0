"""Loading and running an exported integer model: needs only numpy and jax, not ewgs_jax.

This file imports nothing of the project; copy it next to a model file to run that model anywhere
``jax`` (with ``flatbuffers``, which ``jax.export`` serialization needs) is installed::

    import runtime                       # or: from ewgs_jax.export import runtime
    model = runtime.load("resnet20_w2a2.npz")
    logits = model(images)               # float32 NHWC, normalised as model.metadata["input"] says

The file is one ``.npz`` (uncompressed, ``allow_pickle=False``):

* ``__metadata__``: UTF-8 JSON (format, input shape and normalisation, every integer layer: its op,
  bits, methods, packing, folded BatchNorm; where it came from; ``fp_bytes``);
* ``__forward__``: the serialized :class:`jax.export.Exported` integer forward (StableHLO, for the
  platforms listed in the metadata, any batch size), called as ``forward(arrays, images)``;
* every other entry is one of its ``arrays``: ``<layer>/weight_codes`` (packed codes,
  ``uint8``/``uint16``), ``<layer>/scale`` and ``<layer>/bias`` (the requantization), ``<layer>/
  folded_scale`` and ``folded_bias`` (with the BatchNorm folded in), ``<layer>/act_<param>`` (the
  activation quantizer), ``fp/<collection>/...`` (full-precision variables, e.g. the first and last
  layers).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import jax
import numpy as np

FORMAT = "ewgs_jax.integer_model/1"
FP_PREFIX = "fp/"
METADATA_KEY = "__metadata__"
FORWARD_KEY = "__forward__"


class IntegerModel:
  """An exported integer forward with its arrays and metadata.

  Attributes:
    exported: the :class:`jax.export.Exported` forward.
    arrays: ``{name: numpy array}``, its first argument.
    metadata: the JSON-able description.
  """

  def __init__(self, exported, arrays: dict, metadata: dict):
    self.exported = exported
    self.arrays = dict(arrays)
    self.metadata = dict(metadata)
    self._device_arrays = None
    self._call = jax.jit(exported.call)

  def __call__(self, images) -> jax.Array:
    """Logits of a float32 NHWC batch (any batch size).

    Args:
      images: the normalised images, ``(batch, *metadata["input"]["shape"][1:])``.

    Returns:
      The float32 logits.
    """
    if self._device_arrays is None:
      self._device_arrays = jax.device_put(self.arrays)
    return self._call(self._device_arrays, jax.numpy.asarray(images, jax.numpy.float32))

  def nbytes(self) -> dict[str, int]:
    """What the file holds, by part: the arrays (packed codes, scales, float layers) and the forward.

    Returns:
      ``{"arrays": bytes of all arrays, "forward": bytes of the serialized forward}``.
    """
    return {"arrays": int(sum(np.asarray(a).nbytes for a in self.arrays.values())),
            "forward": len(self.exported.serialize())}

  def save(self, path: str) -> int:
    """Writes the model to one ``.npz`` file (atomically: a temporary file, then a rename).

    Args:
      path: the file to write.

    Returns:
      Its size in bytes.
    """
    entries = {METADATA_KEY: np.frombuffer(json.dumps(self.metadata, sort_keys=True).encode(), np.uint8),
               FORWARD_KEY: np.frombuffer(bytes(self.exported.serialize()), np.uint8)}
    clash = set(entries) & set(self.arrays)
    if clash:
      raise ValueError(f"array names {sorted(clash)} are reserved")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
      arrays: dict[str, Any] = {**entries, **self.arrays}
      np.savez(f, **arrays)
    os.replace(tmp, path)
    return os.path.getsize(path)


def load(path: str) -> IntegerModel:
  """Reads a model written by :meth:`IntegerModel.save`.

  Args:
    path: the ``.npz`` file.

  Returns:
    The :class:`IntegerModel`.

  Raises:
    ValueError: when the file is not such a model (one line naming the file and what is wrong).
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      entries = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e})") from None
  if METADATA_KEY not in entries or FORWARD_KEY not in entries:
    raise ValueError(f"{path}: not an exported integer model (no {METADATA_KEY} / {FORWARD_KEY} entry)")
  try:
    metadata = json.loads(entries.pop(METADATA_KEY).tobytes().decode())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: its metadata is damaged ({e})") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    found = metadata.get("format") if isinstance(metadata, dict) else None
    raise ValueError(f"{path}: format {found!r}, this loader reads {FORMAT!r}")
  try:
    exported = jax.export.deserialize(bytearray(entries.pop(FORWARD_KEY).tobytes()))
  except Exception as e:  # noqa: BLE001 - any failure to read the serialized forward is a damaged file
    raise ValueError(f"{path}: its serialized forward is damaged ({type(e).__name__})") from None
  return IntegerModel(exported, entries, metadata)
