"""Convolution used by the quantized layers (placeholder until the fast CPU weight-gradient lands).

``conv_general_dilated`` has the signature of ``jax.lax.conv_general_dilated`` so it can be
passed to ``flax.linen.Conv(conv_general_dilated=...)``.
"""

from jax import lax

conv_general_dilated = lax.conv_general_dilated
