"""ewgs-jax: quantization-aware training in JAX with EWGS and PEGE gradient estimators.

The functional core composes in plain JAX code::

    import functools, ewgs_jax as ej
    disc = functools.partial(ej.ewgs, delta=0.01)           # backward rule (EWGS Eq. 4)
    w_q = ej.interval(w, lower, upper, bits=2, weight=True, discretizer=disc)   # EWGS Eq. 1-3
"""

from ewgs_jax.estimators import Discretizer, ewgs, get_estimator, pege, pege_relative, round_to_grid, ste
from ewgs_jax.quantizers import clip, dorefa, interval, lsq, pact, scale_gradient
from ewgs_jax.replacement import quantizer_key, replace, replacement_mask
from ewgs_jax import schedules

__version__ = "0.2.0"   # the one place the version is set (pyproject.toml reads it)


def __getattr__(name):   # the Flax parts load on first use: `import ewgs_jax` stays free of Flax
  if name in ("quantize", "quantizing", "QuantizedModel"):
    from ewgs_jax import interception
    return getattr(interception, name)
  raise AttributeError(f"module 'ewgs_jax' has no attribute {name!r}")


__all__ = [
    "Discretizer",
    "QuantizedModel",
    "clip",
    "dorefa",
    "ewgs",
    "get_estimator",
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
    "scale_gradient",
    "schedules",
    "ste",
]
