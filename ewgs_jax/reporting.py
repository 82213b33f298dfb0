"""Run outputs: ``metrics.jsonl``, TensorBoard events (no TensorFlow needed), a progress bar,
``summary.json``, PNG plots (curves; delta per layer as EWGS Fig. 3), and a results table.

Only process 0 writes. ``python -m ewgs_jax.reporting table WORKDIR...`` prints the test
accuracies of finished runs (``make train`` uses it).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import time
from typing import Any

import jax

from ewgs_jax import extras, names   # plain constants and lazy imports, import no project module

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
  """CRC-32C (Castagnoli), the checksum of TFRecord framing.

  Args:
    data: the bytes to checksum.

  Returns:
    The unsigned 32-bit CRC.
  """
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
  """A TensorBoard ``Event`` protobuf, hand-encoded (no TensorFlow or protobuf needed).

  Args:
    wall_time: seconds since the epoch (field 1).
    step: the global step (field 2).
    scalars: ``{tag: value}`` written as a ``Summary`` of simple float values (field 5), or ``None``.
    file_version: the ``file_version`` string of an event file's first event (field 3), or ``None``.

  Returns:
    The serialised event.
  """
  event = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    event += _field(3, file_version.encode())
  if scalars:
    values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                      for tag, value in scalars.items())
    event += _field(5, values)
  return event


def tfrecord(data: bytes) -> bytes:
  """Frames one record as TFRecord: length, masked CRC of the length, data, masked CRC of the data.

  Args:
    data: the record's payload (a serialised event).

  Returns:
    The framed bytes.
  """
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
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_torn_line(path)
    self._jsonl = open(path, "a")
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

  def write_quantizers(self, step: int, quantizers: dict[str, dict[str, float]], reason: str | None = None) -> None:
    """Per-quantizer l, u, alpha, delta (one JSON line; TensorBoard tags ``quant/<layer>/<name>``).

    ``reason`` (e.g. ``"delta_refresh"``, ``"eval"``) says why the snapshot was taken.
    """
    if not self.enabled:
      return
    record = {"step": int(step), "split": "quantizers", "quantizers": quantizers}
    if reason is not None:
      record["reason"] = reason
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    flat = {f"quant/{layer}/{k}": v for layer, values in quantizers.items() for k, v in values.items()}
    self._events.write(tfrecord(encode_event(time.time(), int(step), flat)))
    self._events.flush()

  def close(self) -> None:
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


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Parses an event file written by :class:`MetricsWriter`, checking every record's CRCs.

  Args:
    path: the event file.

  Returns:
    ``[(step, {tag: value}), ...]`` in file order; raises ``ValueError`` at a corrupt CRC.
  """
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

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` (evaluation, delta refresh, checkpoints) out of the images/s and ETA."""
    if self._last is not None:
      self._last = (self._last[0], self._last[1] + seconds)

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")


class RunTimer:
  """A run's wall time and steady-state training time, summed over its resumes.

  The training clock starts after the first (compiling) step (:meth:`start_training`); work done
  inside :meth:`paused` (evaluation, delta refresh, checkpoints) is left out of it, and each pause's
  length is passed to ``on_pause`` (e.g. :meth:`ProgressBar.exclude`).

  Args:
    batch_size: images per training step.
    previous: the totals of earlier starts of this run (:meth:`totals` as checkpointed), or None.
    on_pause: called with the seconds of every pause, or None.
  """

  def __init__(self, batch_size: int, previous: dict | None = None, on_pause=None):
    self.batch_size = batch_size
    self.previous = dict(previous or {"wall_time_s": 0.0, "train_seconds": 0.0, "train_images": 0})
    self.on_pause = on_pause
    self._wall_start = time.time()
    self._loop_start: float | None = None
    self._first_step = 0
    self._excluded = 0.0

  @property
  def started(self) -> bool:
    """Whether :meth:`start_training` was called."""
    return self._loop_start is not None

  def start_training(self, step: int) -> None:
    """Starts the training clock at ``step`` (after the first, compiling step)."""
    self._loop_start, self._first_step, self._excluded = time.perf_counter(), step, 0.0

  @contextlib.contextmanager
  def paused(self):
    """Excludes the time spent inside the ``with`` block from training time.

    Yields:
      A dict whose ``"seconds"`` holds the pause's length once the block has ended.
    """
    pause = {"seconds": 0.0}
    tick = time.perf_counter()
    try:
      yield pause
    finally:
      pause["seconds"] = time.perf_counter() - tick
      if self.started:
        self._excluded += pause["seconds"]
      if self.on_pause is not None:
        self.on_pause(pause["seconds"])

  def totals(self, step: int) -> dict:
    """``{"wall_time_s", "train_seconds", "train_images"}`` up to ``step``, earlier starts included.

    Args:
      step: the current training step.

    Returns:
      The totals (JSON-serialisable, to checkpoint and pass back as ``previous``).
    """
    seconds = time.perf_counter() - self._loop_start - self._excluded if self.started else 0.0
    images = (step - self._first_step) * self.batch_size if self.started else 0
    return {"wall_time_s": self.previous["wall_time_s"] + time.time() - self._wall_start,
            "train_seconds": self.previous["train_seconds"] + seconds,
            "train_images": self.previous["train_images"] + images}

  @staticmethod
  def images_per_s(totals: dict) -> float | None:
    """Training images per second of :meth:`totals`, or None before any timed step."""
    return totals["train_images"] / totals["train_seconds"] if totals["train_seconds"] > 0 and totals["train_images"] else None


def announce(text: str, stream=None) -> None:
  """A line for the user on stderr (process 0 only): resume, stop, end of a run.

  Args:
    text: the line, without its newline.
    stream: where to write; ``None`` for ``sys.stderr``.
  """
  if jax.process_index() == 0:
    stream = stream or sys.stderr
    stream.write(text + "\n")
    stream.flush()


# --- summary, plots, table ----------------------------------------------------------------------


def write_summary(workdir: str, summary: dict) -> str:
  """Writes ``workdir/summary.json`` atomically; returns its path.

  Args:
    workdir: the run's directory.
    summary: the summary (JSON-serialisable; other values are written through ``float``).

  Returns:
    The path of ``summary.json``.
  """
  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True, default=float)
  os.replace(path + ".tmp", path)
  return path


def read_summary(workdir: str) -> dict | None:
  """``workdir/summary.json``, or ``None`` if the run has not written one.

  Args:
    workdir: the run's directory.

  Returns:
    The summary as a dict, or ``None``.
  """
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


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


def final_message(workdir: str, summary: dict) -> str:
  """The line printed when a run ends: its accuracies and where its outputs are.

  Args:
    workdir: the run's directory.
    summary: the run's summary (``train_steps``, ``epochs``, ``final_*_accuracy``).

  Returns:
    The line, with each final accuracy in percent and the outputs present in ``workdir``.
  """
  accuracies = ", ".join(f"{k[len('final_'):-len('_accuracy')]} {100 * v:.2f} %" for k, v in sorted(summary.items())
                         if k.startswith("final_") and k.endswith("_accuracy") and v is not None)
  outputs = [f for f in ("summary.json", "curves.png", "deltas.png", "metrics.jsonl", "checkpoints")
             if os.path.exists(os.path.join(workdir, f))]
  return (f"finished {summary['train_steps']} steps ({summary['epochs']:g} epochs): final accuracy {accuracies or '-'}; "
          f"outputs in {os.path.abspath(workdir)}: {', '.join(outputs)}")


def write_plots(workdir: str, delta_history: list[dict], title: str | None = None) -> None:
  """``curves.png`` and (with delta refreshes) ``deltas.png``; a failure only warns: the run is done.

  Args:
    workdir: the run's directory (holds ``metrics.jsonl``; receives the PNGs).
    delta_history: the delta refreshes, as :func:`plot_deltas` takes them (empty for none).
    title: the figures' title, or ``None``.
  """
  try:
    plot_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "curves.png"), title=title)
    if delta_history:
      plot_deltas(delta_history, os.path.join(workdir, "deltas.png"), title=title)
  except Exception as e:  # noqa: BLE001 - plots are a convenience; the summary is already written
    print(f"warning: plotting in {workdir} failed ({type(e).__name__}: {e})", file=sys.stderr)


def plot_curves(metrics_path: str, out_png: str, title: str | None = None) -> None:
  """Loss and accuracy against the training step, train and test.

  Args:
    metrics_path: the ``metrics.jsonl`` to read.
    out_png: the PNG to write.
    title: the figure's title, or ``None``.
  """
  plt = extras.pyplot()
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
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


def plot_deltas(history: list[dict], out_png: str, title: str | None = None) -> None:
  """EWGS Fig. 3: delta of every weight and activation quantizer at each refresh (by epoch).

  ``history``: ``[{"step", "epoch", "quantizers": {layer: {"delta_w", "delta_a", ...}}}, ...]``.

  Args:
    history: the refreshes, as above.
    out_png: the PNG to write.
    title: the figure's title, or ``None``.
  """
  plt = extras.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
  layers = sorted({layer for h in history for layer in h["quantizers"]})
  for ax, key, side in zip(axes, names.DELTA_NAMES, ("weights", "activations")):
    for layer in layers:
      points = [(h["epoch"], h["quantizers"][layer][key]) for h in history
                if key in h["quantizers"].get(layer, {})]
      if points:
        ax.plot(*zip(*points), marker=".", label=layer)
    ax.set_title(f"EWGS delta, {side}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("delta (EWGS Eq. 10)")
    ax.grid(alpha=0.3)
  if layers:
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1, 0.5), ncol=1 + len(layers) // 20)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)


def _percent(value) -> str:
  return f"{100 * value:.2f} %" if isinstance(value, (int, float)) else "-"


def results_table(workdirs: list[str]) -> str:
  """A Markdown table of the runs' test accuracies, from their ``summary.json``.

  Runs without a summary (unfinished) or stopped early (preempted) get a row saying so. With a
  validation split, the best accuracy is the validation one (marked "(val.)"): the test split is
  evaluated once, at the end.

  Args:
    workdirs: the runs' directories, one row each in this order.

  Returns:
    The table's text.
  """
  rows = ["| run | backward | W/A bits | final test acc. | best test acc. | epochs | images/s |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
  for workdir in workdirs:
    name = os.path.basename(os.path.normpath(workdir))
    s = read_summary(workdir)
    if s is None:
      rows.append(f"| {name} (not finished: no summary.json) | - | - | - | - | - | - |")
      continue
    q = s.get("config", {}).get("quant", {})
    enabled = q.get("enabled", False)
    bits = f"W{q.get('weight_bits')}A{q.get('act_bits')}" if enabled else "32/32"
    backward = q.get("rule", q.get("backward", "-")) if enabled else "full precision"
    speed = f"{s['train_images_per_s']:,.0f}" if s.get("train_images_per_s") else "-"
    if s.get("preempted"):
      name += f" (stopped early at step {s.get('train_steps', '?')})"
    eval_split = s.get("eval_split", "test")
    best = _percent(s.get(f"best_{eval_split}_accuracy"))
    if eval_split != "test" and best != "-":
      best += f" ({eval_split[:3]}.)"
    epochs = f"{s['epochs']:g}" if isinstance(s.get("epochs"), (int, float)) else "-"
    rows.append(f"| {name} | {backward} | {bits} | {_percent(s.get('final_test_accuracy'))} | {best} | "
                f"{epochs} | {speed} |")
  return "\n".join(rows)


def provenance(workdirs: list[str]) -> str:
  """When and on what the runs of a table were measured (from their summaries).

  Args:
    workdirs: the runs' directories.

  Returns:
    One sentence: the date of the newest ``summary.json``, the devices, this machine's CPU count and
    jax version, and the summed training wall time.
  """
  summaries = [s for s in (read_summary(w) for w in workdirs) if s is not None]
  devices = sorted({s.get("device", "?") for s in summaries})
  wall = sum(s.get("wall_time_s") or 0.0 for s in summaries)
  when = max((os.path.getmtime(os.path.join(w, "summary.json")) for w in workdirs
              if os.path.exists(os.path.join(w, "summary.json"))), default=time.time())
  return (f"Measured {time.strftime('%Y-%m-%d', time.localtime(when))} on {', '.join(devices) or '?'} "
          f"({os.cpu_count()} CPU cores, jax {jax.__version__}); {wall / 60:.1f} min of training wall time in all.")


if __name__ == "__main__":
  if len(sys.argv) < 3 or sys.argv[1] != "table":
    sys.exit("usage: python -m ewgs_jax.reporting table WORKDIR [WORKDIR ...]")
  print(results_table(sys.argv[2:]))
  print()
  print(provenance(sys.argv[2:]))
