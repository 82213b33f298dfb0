"""TensorBoard event files, encoded and decoded by hand (no TensorFlow or protobuf needed).

An event file is a TFRecord stream of serialised ``Event`` protos. Only the few fields the metrics
writer needs are encoded: ``Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5}``;
``Summary{value=1}``; ``Value{tag=1 (string), simple_value=2 (float)}``. A TFRecord frames each
record as its length, the masked CRC-32C of the length, the data and the masked CRC-32C of the data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator


def _crc_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc_table()


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
  """A TensorBoard ``Event`` protobuf, hand-encoded.

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


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
  """Parses an event file written by :class:`ewgs_jax.reporting.MetricsWriter`, checking every CRC.

  Args:
    path: the event file.

  Returns:
    ``[(step, {tag: value}), ...]`` in file order; raises ``ValueError`` at a corrupt CRC.
  """
  with open(path, "rb") as f:
    data = f.read()
  out, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack_from("<Q", data, pos)
    if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(data[pos:pos + 8]):
      raise ValueError(f"{path}: corrupt length CRC at byte {pos}")
    record = data[pos + 12:pos + 12 + length]
    if struct.unpack_from("<I", data, pos + 12 + length)[0] != _masked_crc(record):
      raise ValueError(f"{path}: corrupt data CRC at byte {pos}")
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


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    value: int | bytes
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
    if number == 2 and isinstance(value, int):
      step = value
    elif number == 5 and isinstance(value, bytes):
      for _, v in _fields(value):
        assert isinstance(v, bytes)
        fields = dict(_fields(v))
        tag, simple = fields[1], fields[2]
        assert isinstance(tag, bytes) and isinstance(simple, bytes)
        scalars[tag.decode()] = struct.unpack("<f", simple)[0]
  return step, scalars
