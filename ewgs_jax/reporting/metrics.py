"""A run's measurements as they arrive: ``metrics.jsonl`` lines and TensorBoard scalars.

Only process 0 writes. A last line that a crash left half-written is cut before appending, and
skipped when reading, so a resumed run's file stays parseable.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax

from ewgs_jax.reporting import events


class MetricsWriter:
  """Appends ``{"step", "split", ...}`` lines to ``metrics.jsonl`` and scalars to TensorBoard.

  Args:
    workdir: the run's directory (created if needed).
    enabled: whether to write; ``None`` for "on process 0 only".
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_torn_line(path)
    self._jsonl = open(path, "a")
    name = f"events.out.tfevents.{int(time.time())}.{os.uname().nodename}.{os.getpid()}"
    self._events = open(os.path.join(workdir, name), "ab")
    self._events.write(events.tfrecord(events.encode_event(time.time(), 0, file_version="brain.Event:2")))

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    """One line of scalars (``split`` is ``"train"``, ``"test"``, ...; TensorBoard tags ``<split>/<name>``).

    Args:
      step: the training step the values belong to.
      split: what they measure.
      scalars: ``{name: value}``, each written through ``float``.
    """
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    tagged = {f"{split}/{k}": v for k, v in scalars.items()}
    self._events.write(events.tfrecord(events.encode_event(time.time(), int(step), tagged)))
    self._events.flush()

  def write_quantizers(self, step: int, quantizers: dict[str, dict[str, float]], reason: str | None = None) -> None:
    """Per-quantizer l, u, alpha, delta (one JSON line; TensorBoard tags ``quant/<layer>/<name>``).

    Args:
      step: the training step of the snapshot.
      quantizers: ``{layer: {name: value}}``.
      reason: why the snapshot was taken (e.g. ``"ewgs/delta_refresh"``, ``"eval"``), or ``None``.
    """
    if not self.enabled:
      return
    record: dict[str, Any] = {"step": int(step), "split": "quantizers", "quantizers": quantizers}
    if reason is not None:
      record["reason"] = reason
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    flat = {f"quant/{layer}/{k}": v for layer, values in quantizers.items() for k, v in values.items()}
    self._events.write(events.tfrecord(events.encode_event(time.time(), int(step), flat)))
    self._events.flush()

  def close(self) -> None:
    """Closes both files (a disabled writer holds none)."""
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def _drop_torn_line(path: str) -> None:
  """Cuts a last line that a crash left half-written, so that appended lines stay parseable."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data.endswith(b"\n"):
      return
    keep = data.rfind(b"\n") + 1
    print(f"warning: {path}: dropped a torn last line ({len(data) - keep} bytes, from a crash mid-write)",
          file=sys.stderr)
    f.truncate(keep)


def read_metrics(path: str) -> list[dict]:
  """The records of ``metrics.jsonl``; a line a crash left unparseable is skipped.

  Args:
    path: the ``metrics.jsonl`` file.

  Returns:
    One dict per parsed line, in order.
  """
  records = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return records
