"""PEGE progressive replacement (PEGE Sec. 3.2, Eq. 3).

At each training step a Bernoulli variable ``r ~ Bernoulli(p_T)`` decides, for each value, whether
the forward pass uses the quantized value ``x_q`` (``r = 1``) or the continuous latent ``x_c``
(``r = 0``). ``p_T`` comes from a replacement-rate schedule (:mod:`ewgs_jax.schedules`); evaluation
uses no replacement (``p = 1``).

The paper leaves the *granularity* of ``r`` open, so it is an option:

* ``"network"`` -- one draw per step shared by every quantizer: the literal reading of Eq. 3
  ("all the full-precision parameters are replaced" when ``r = 1``).
* ``"tensor"``  -- one draw per quantizer per step.
* ``"element"`` -- one draw per element (as QDrop does).

The default is ``"element"``. The paper names the method a "mixed-precision replacement" and
describes it as mixing full-precision and quantized values within a step; per-element draws do
exactly that, and they keep every step's BatchNorm statistics close to those of the quantized
network, whereas ``"network"`` makes whole steps fully full-precision (a much noisier signal for
the quantizer parameters, which then get no gradient on those steps).

Mixing happens in the [0, 1] latent domain of the quantizer (before its output map), so the output
scale and range of a layer are the same whichever value is chosen.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

from ewgs_jax.estimators import Array

GRANULARITIES = ("network", "tensor", "element")
DEFAULT_GRANULARITY = "element"


def check_granularity(granularity: str) -> str:
  """Validates a replacement granularity and returns it.

  Args:
    granularity: ``"network"``, ``"tensor"`` or ``"element"``.

  Returns:
    ``granularity``; raises ``ValueError`` for another value.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"unknown replacement granularity {granularity!r}; valid choices: {list(GRANULARITIES)}")
  return granularity


def quantizer_key(step_key: Array, name: str, granularity: str = DEFAULT_GRANULARITY) -> Array:
  """The key one quantizer draws its mask from.

  For ``"network"`` every quantizer gets the step's key itself, so all draws coincide; otherwise
  the key is folded with a stable hash of the quantizer's name, so the draws are independent.

  Args:
    step_key: the training step's replacement key.
    name: the quantizer's name.
    granularity: ``"network"``, ``"tensor"`` or ``"element"``.

  Returns:
    The quantizer's key.
  """
  if check_granularity(granularity) == "network":
    return step_key
  return jax.random.fold_in(step_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def replacement_mask(key: Array, shape: tuple[int, ...], p, granularity: str = DEFAULT_GRANULARITY) -> Array:
  """Bernoulli(p) mask (True = use the quantized value), broadcastable to ``shape`` (PEGE Eq. 3).

  Args:
    key: the quantizer's key (:func:`quantizer_key`).
    shape: the shape of the quantized tensor.
    p: the replacement rate ``p_T`` in [0, 1] (may be traced).
    granularity: ``"element"`` draws one value per element; ``"tensor"`` and ``"network"`` one scalar.

  Returns:
    A boolean mask of ``shape``, or a boolean scalar.
  """
  mask_shape = shape if check_granularity(granularity) == "element" else ()
  return jax.random.bernoulli(key, jnp.asarray(p, jnp.float32), mask_shape)


def replace(key: Array, x_c: Array, x_q: Array, p, *, granularity: str = DEFAULT_GRANULARITY) -> Array:
  """PEGE progressive replacement: ``x_q`` where ``r = 1``, ``x_c`` where ``r = 0``, ``r ~ B(p)``.

  ``p`` may be a traced scalar in [0, 1]. ``p = 1`` returns exactly ``x_q``. Gradients flow to
  ``x_q`` (hence through the discretizer's backward rule) where ``r = 1`` and straight to ``x_c``
  where ``r = 0``. For ``"network"`` granularity, pass every quantizer the same key (see
  :func:`quantizer_key`).

  Args:
    key: the quantizer's key (:func:`quantizer_key`).
    x_c: the latent (full-precision) value.
    x_q: the discretized value.
    p: the replacement rate ``p_T`` in [0, 1].
    granularity: ``"network"``, ``"tensor"`` or ``"element"``.

  Returns:
    The mixed value, the shape of ``x_q``.
  """
  mask = replacement_mask(key, jnp.shape(x_q), p, granularity)
  return jnp.where(mask, x_q, x_c)
