"""Run outputs: ``metrics.jsonl``, TensorBoard events (no TensorFlow needed), a progress bar,
``summary.json``, PNG plots (curves; delta per layer as EWGS Fig. 3), and a results table.

Only process 0 writes. ``python -m ewgs_jax.reporting table WORKDIR...`` prints the test
accuracies of finished runs (``make train`` uses it).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from typing import Any

import jax

from ewgs_jax import names   # plain constants, imports no project module

# --- TensorBoard event files, written directly --------------------------------------------------
# An event file is a TFRecord stream of serialised ``Event`` protos. We encode the few fields we
# need by hand: Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5};
# Summary{value=1}; Value{tag=1 (string), simple_value=2 (float)}.

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  event = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    event += _field(3, file_version.encode())
  if scalars:
    values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in scalars.items())
    event += _field(5, values)
  return event


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class MetricsWriter:
  """Appends ``{"step", "split", ...}`` lines to ``metrics.jsonl`` and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    name = f"events.out.tfevents.{int(time.time())}.{os.uname().nodename}.{os.getpid()}"
    self._events = open(os.path.join(workdir, name), "ab")
    self._events.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    self._events.write(tfrecord(encode_event(time.time(), int(step), {f"{split}/{k}": v for k, v in scalars.items()})))
    self._events.flush()

  def write_quantizers(self, step: int, quantizers: dict[str, dict[str, float]]) -> None:
    """Per-quantizer l, u, alpha, delta (one JSON line; TensorBoard tags ``quant/<layer>/<name>``)."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), "split": "quantizers", "quantizers": quantizers}) + "\n")
    self._jsonl.flush()
    flat = {f"quant/{layer}/{k}": v for layer, values in quantizers.items() for k, v in values.items()}
    self._events.write(tfrecord(encode_event(time.time(), int(step), flat)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Parses an event file written by :class:`MetricsWriter`, checking every record's CRCs."""
  out, data = [], open(path, "rb").read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(data[pos:pos + 8]):
      raise ValueError(f"corrupt length CRC at byte {pos}")
    record = data[pos + 12:pos + 12 + length]
    if struct.unpack_from("<I", data, pos + 12 + length)[0] != _masked_crc(record):
      raise ValueError(f"corrupt data CRC at byte {pos}")
    pos += 16 + length
    out.append(_decode_event(record))
  return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    result |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return result, pos


def _fields(buf: bytes):
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      length, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    yield number, value


def _decode_event(record: bytes) -> tuple[int, dict[str, float]]:
  step, scalars = 0, {}
  for number, value in _fields(record):
    if number == 2:
      step = value
    elif number == 5:
      for _, v in _fields(value):
        fields = dict(_fields(v))
        scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
  return step, scalars


# --- progress bar -------------------------------------------------------------------------------


class ProgressBar:
  """One status line (rewritten in place on a TTY, one line per update otherwise) on stderr."""

  def __init__(self, total_steps: int, batch_size: int, enabled: bool = True, stream=None):
    self.total, self.batch_size = total_steps, batch_size
    self.enabled = enabled and jax.process_index() == 0
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last: tuple[int, float] | None = None

  def update(self, step: int, **scalars: float) -> None:
    now = time.perf_counter()
    if not self.enabled:
      return
    rate = ""
    if self._last is not None and step > self._last[0]:
      per_step = (now - self._last[1]) / (step - self._last[0])
      eta = int(per_step * (self.total - step))
      rate = f" | {self.batch_size / per_step:,.0f} img/s | ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    self._last = (step, now)
    values = " | ".join(f"{k} {v:.4f}" for k, v in scalars.items())
    line = f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) | {values}{rate}"
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def message(self, text: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self.tty else "") + text + "\n")
      self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")


# --- summary, plots, table ----------------------------------------------------------------------


def write_summary(workdir: str, summary: dict) -> str:
  """Writes ``workdir/summary.json`` atomically; returns its path."""
  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=float)
  os.replace(path + ".tmp", path)
  return path


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, out_png: str) -> None:
  """Loss and accuracy against the training step, train and test."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(metrics_path)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key in zip(axes, ("loss", "accuracy")):
    for split in ("train", "validation", "test"):
      points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
      if points:
        ax.plot(*zip(*points), label=split, marker=None if split == "train" else "o")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


def plot_deltas(history: list[dict], out_png: str) -> None:
  """EWGS Fig. 3: delta of every weight and activation quantizer at each refresh (by epoch).

  ``history``: ``[{"step", "epoch", "quantizers": {layer: {"delta_w", "delta_a", ...}}}, ...]``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
  layers = sorted({layer for h in history for layer in h["quantizers"]})
  for ax, key, title in zip(axes, names.DELTA_NAMES, ("weights", "activations")):
    for layer in layers:
      points = [(h["epoch"], h["quantizers"][layer][key]) for h in history
                if key in h["quantizers"].get(layer, {})]
      if points:
        ax.plot(*zip(*points), marker=".", label=layer)
    ax.set_title(f"EWGS delta, {title}")
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
  if layers:
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


def results_table(workdirs: list[str]) -> str:
  """A Markdown table of the finished runs' test accuracies, from their ``summary.json``."""
  rows = ["| run | backward | W/A bits | final test acc. | best test acc. | epochs | images/s |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
  for workdir in workdirs:
    with open(os.path.join(workdir, "summary.json")) as f:
      s = json.load(f)
    q = s["config"]["quant"]
    bits = f"W{q['weight_bits']}A{q['act_bits']}" if q["enabled"] else "32/32"
    backward = q["backward"] if q["enabled"] else "full precision"
    speed = f"{s['train_images_per_s']:,.0f}" if s.get("train_images_per_s") else "-"
    rows.append(f"| {os.path.basename(os.path.normpath(workdir))} | {backward} | {bits} | "
                f"{100 * s['final_test_accuracy']:.2f} % | {100 * s['best_test_accuracy']:.2f} % | "
                f"{s['epochs']:g} | {speed} |")
  return "\n".join(rows)


if __name__ == "__main__":
  if len(sys.argv) < 3 or sys.argv[1] != "table":
    sys.exit("usage: python -m ewgs_jax.reporting table WORKDIR [WORKDIR ...]")
  print(results_table(sys.argv[2:]))
