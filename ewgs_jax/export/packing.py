"""Integer codes stored in the fewest bytes: 8 x 1-bit, 4 x 2-bit or 2 x 4-bit codes per byte.

A ``b``-bit code (``0 .. 2^b - 1``) takes a slot of ``slot_bits(b)`` bits: 1, 2 or 4 bits share a
byte (3-bit codes take 4-bit slots), 5 to 8 bits take a whole ``uint8`` and 9 to 16 a ``uint16``.
Codes fill each byte from its least significant bits up, in C order of the array; the last byte is
padded with zero codes. :func:`pack` runs once at export (numpy); :func:`unpack` runs inside the
exported integer forward (``jax.numpy``: shifts and masks, integer ops every backend has).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

SUB_BYTE_SLOTS = (1, 2, 4)   # slot widths that share a byte


def slot_bits(bits: int) -> int:
  """The width of the slot a ``bits``-bit code is stored in.

  Args:
    bits: the code's bit width, 1..16.

  Returns:
    1, 2 or 4 (several codes per byte), 8 (``uint8``) or 16 (``uint16``).
  """
  if not 1 <= bits <= 16:
    raise ValueError(f"codes of {bits} bits cannot be packed; 1..16 bits are supported")
  return next(s for s in (*SUB_BYTE_SLOTS, 8, 16) if bits <= s)


def storage_dtype(bits: int) -> np.dtype:
  """The dtype of the packed array of ``bits``-bit codes (``uint8`` up to 8 bits, else ``uint16``).

  Args:
    bits: the code's bit width.

  Returns:
    The numpy dtype.
  """
  return np.dtype(np.uint16 if slot_bits(bits) == 16 else np.uint8)


def packed_size(size: int, bits: int) -> int:
  """The number of elements :func:`pack` stores for ``size`` codes of ``bits`` bits.

  Args:
    size: the number of codes.
    bits: their bit width.

  Returns:
    ``ceil(size / codes per element)``.
  """
  slot = slot_bits(bits)
  per = 8 // slot if slot < 8 else 1
  return math.ceil(size / per)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Packs integer codes in ``0 .. 2^bits - 1`` into a flat array of the storage dtype.

  Args:
    codes: the codes (any integer dtype, any shape).
    bits: their bit width.

  Returns:
    A 1-D ``uint8`` (or ``uint16``) array of :func:`packed_size` elements.

  Raises:
    ValueError: when a code is outside ``0 .. 2^bits - 1``.
  """
  codes = np.asarray(codes).reshape(-1)
  if codes.size and (codes.min() < 0 or codes.max() > 2 ** bits - 1):
    raise ValueError(f"codes must lie in 0..{2 ** bits - 1} for {bits} bits, got {codes.min()}..{codes.max()}")
  slot = slot_bits(bits)
  if slot >= 8:
    return codes.astype(storage_dtype(bits))
  per = 8 // slot
  padded = np.zeros(packed_size(codes.size, bits) * per, np.uint8)
  padded[:codes.size] = codes
  shifts = (np.arange(per, dtype=np.uint8) * slot)[None, :]
  slots = np.left_shift(padded.reshape(-1, per), shifts).astype(np.uint8)   # each code in its bit slot
  return slots.sum(axis=1, dtype=np.uint8)   # the slots do not overlap: their sum is their bitwise or


def unpack(packed, bits: int, shape) -> jnp.ndarray:
  """Inverse of :func:`pack` in ``jax.numpy`` (traceable; shifts and masks only).

  Args:
    packed: the packed 1-D array.
    bits: the codes' bit width.
    shape: the shape of the codes.

  Returns:
    The codes as ``int32``, of shape ``shape``.
  """
  size = math.prod(shape)
  slot = slot_bits(bits)
  packed = jnp.asarray(packed)
  if slot >= 8:
    return packed.astype(jnp.int32).reshape(shape)
  per = 8 // slot
  shifts = jnp.arange(per, dtype=jnp.int32) * slot
  codes = (packed.astype(jnp.int32)[:, None] >> shifts[None, :]) & (2 ** slot - 1)
  return codes.reshape(-1)[:size].reshape(shape)
