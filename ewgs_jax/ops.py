"""Convolution used by the quantized layers (placeholder until the fast CPU weight-gradient lands).

``conv_general_dilated`` has the signature of ``jax.lax.conv_general_dilated`` so it can be
passed to ``flax.linen.Conv(conv_general_dilated=...)``.
"""

from jax import lax

conv_general_dilated = lax.conv_general_dilated


_IMPL = "auto"


def set_conv_impl(impl: str) -> None:
  """Selects the convolution: ``auto``, ``xla`` or ``fast`` (placeholder: all are XLA's for now)."""
  global _IMPL
  if impl not in ("auto", "xla", "fast"):
    raise ValueError(f"unknown conv impl {impl!r}; valid choices: ['auto', 'xla', 'fast']")
  _IMPL = impl
