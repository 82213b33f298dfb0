"""ewgs-jax: quantization-aware training in JAX/Flax with the EWGS and PEGE gradient estimators.

The functional core composes in plain JAX code::

    import functools, ewgs_jax as ej
    disc = functools.partial(ej.ewgs, delta=0.01)           # backward rule (EWGS Eq. 4)
    w_q = ej.interval(w, lower, upper, bits=2, weight=True, discretizer=disc)   # EWGS Eq. 1-3

Models: :func:`quantize` (an unmodified Flax Linen model) or the layers of :mod:`ewgs_jax.layers`,
set up by a :class:`QuantConfig`; any training loop drives the rules' machinery through :class:`QAT`.
"""

from typing import TYPE_CHECKING

from ewgs_jax.estimators import Discretizer, ewgs, pege, pege_relative, round_to_grid, ste
from ewgs_jax.quantizers import clip, dorefa, interval, lsq, pact, scale_gradient
from ewgs_jax.replacement import quantizer_key, replace, replacement_mask
from ewgs_jax import rules, schedules
from ewgs_jax.quantconfig import QuantConfig, QuantizerSpec

__version__ = "0.2.0"   # the one place the version is set (pyproject.toml reads it)

if TYPE_CHECKING:   # what the lazy names below are, for type checkers and editors
  from ewgs_jax.interception import QuantizedModel, quantize, quantizing
  from ewgs_jax.layers import QuantContext
  from ewgs_jax.qat import QAT

_LAZY = {   # the Flax parts load on first use: `import ewgs_jax` stays free of Flax
    "quantize": "interception", "quantizing": "interception", "QuantizedModel": "interception",
    "QuantContext": "layers", "QAT": "qat",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(f"ewgs_jax.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'ewgs_jax' has no attribute {name!r}")


__all__ = [
    "Discretizer",
    "QAT",
    "QuantConfig",
    "QuantContext",
    "QuantizedModel",
    "QuantizerSpec",
    "clip",
    "dorefa",
    "ewgs",
    "interval",
    "lsq",
    "pact",
    "pege",
    "pege_relative",
    "quantize",
    "quantizer_key",
    "quantizing",
    "replace",
    "replacement_mask",
    "round_to_grid",
    "rules",
    "scale_gradient",
    "schedules",
    "ste",
]
