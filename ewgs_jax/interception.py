"""Quantizing a Flax Linen model you did not write: :func:`quantize` and :func:`quantizing`.

The model's own ``nn.Conv``, ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` calls are
intercepted (``flax.linen.intercept_methods``) and computed by the quantized layers of
:mod:`ewgs_jax.layers` bound to the *same* scope, with the intercepted layer's own arguments. So the
variables are laid out exactly as in the unmodified model (``params/Conv_0/kernel``, ...) plus the
quantizer parameters beside them (``params/Conv_0/q_a_lower``, ``quant_state/Conv_0/delta_w``, ...),
which is also the layout of a hand-built model whose layers are ``QuantConv``/``QuantDense`` of the
same names, and a full-precision checkpoint of the unmodified model warm-starts it. Attention blocks
(``nn.MultiHeadDotProductAttention``) get their projections (``DenseGeneral``) quantized; their
query-key and attention-value products multiply two activations and stay full precision.

The per-step :class:`~ewgs_jax.layers.QuantContext` reaches every intercepted layer directly: the
model does not have to pass it on. Which layers are quantized, and how, is the
:class:`~ewgs_jax.quantconfig.QuantConfig`: its per-layer overrides match the layers' module paths,
and the first and last quantizable layers (in call order) stay full precision unless
``quantize_first_last``. ``QuantizedModel.init`` logs one line per layer (``logging`` at INFO:
method, rule and bits, or full precision and why), and raises for an override that matches no layer.

::

    quantized = ewgs_jax.quantize(MyNet(), QuantConfig(weight=QuantizerSpec("interval", "pege", 2),
                                                       act=QuantizerSpec("interval", "pege", 2)))
    variables = quantized.init(rng, real_batch)        # data-driven quantizer initialisation
    logits = quantized.apply(variables, x, ctx=qat.context(step, key))
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import numpy as np

from ewgs_jax import hooks
from ewgs_jax.initialization import LayerReport
from ewgs_jax.layers import QuantContext, QuantConv, QuantDense, QuantDenseGeneral, QuantEinsum
from ewgs_jax.quantconfig import QuantConfig

log = logging.getLogger("ewgs_jax")

# the intercepted layer -> the quantized layer computing it; every field of the former is passed on
REPLACEMENTS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv, QuantConv), (nn.Dense, QuantDense), (nn.DenseGeneral, QuantDenseGeneral), (nn.Einsum, QuantEinsum))
#: Layers with a weight or a product that stay full precision, each with the reason logged.
NOT_QUANTIZED: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ConvTranspose, "transposed convolutions are not quantized"),
    (nn.ConvLocal, "locally connected convolutions are not quantized"),
    (nn.Embed, "embeddings are lookups, not products: not quantized"),
    (nn.MultiHeadDotProductAttention, "its projections are quantized; its query-key and "
     "attention-value products multiply two activations and stay full precision"))


def _replacement(module: nn.Module, quant: QuantConfig) -> nn.Module | None:
  for original, reason in NOT_QUANTIZED:
    if isinstance(module, original):
      hooks.record_layer(module.scope.path if module.scope is not None else (), type(module).__name__, None, reason)
      return None
  for original, quantized in REPLACEMENTS:
    if isinstance(module, original):
      fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(original)
                if f.init and f.name not in ("parent", "name")}
      # bound to the intercepted layer's own scope: same variable paths, same parameter keys
      return quantized(**fields, quant=quant, parent=module.scope)
  return None


@contextlib.contextmanager
def quantizing(quant: QuantConfig, ctx: QuantContext | None = None) -> Iterator[None]:
  """Within this context every ``nn.Conv`` / ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` call is
  computed quantized (see the module doc; the first/last-layer rule is :class:`QuantizedModel`'s).

  Args:
    quant: the setting and its per-layer overrides (matched against each layer's module path).
    ctx: the per-step context given to every quantized layer (``None``: evaluation, no replacement).

  Yields:
    Nothing; the interception lasts while the block runs.
  """
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    replacement = _replacement(context.module, quant)
    if replacement is None:
      return next_fun(*args, **kwargs)
    einsum = isinstance(replacement, QuantEinsum)   # nn.Einsum also takes its equation at call time
    allowed, most = ({"einsum_str"}, 2) if einsum else (set(), 1)
    if set(kwargs) - allowed or not 1 <= len(args) <= most:
      raise TypeError(f"{type(context.module).__name__} {'/'.join(context.module.scope.path)!r} was called with "
                      "more than its input; ewgs_jax.quantize cannot intercept it")
    return replacement(*args, **kwargs, ctx=ctx)

  with nn.intercept_methods(interceptor):
    yield


def _signature(args, kwargs) -> tuple:
  """A hashable description of a call's arguments (array shapes and dtypes, other values as they are)."""
  def describe(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      return ("array", tuple(x.shape), str(np.dtype(x.dtype)))
    return ("value", repr(x))
  return tuple(describe(x) for x in jax.tree.leaves((args, kwargs)))


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """An unmodified Linen ``model`` run with quantized layers (:func:`quantize`).

  ``init`` and ``apply`` are ``model.init`` / ``model.apply`` with one more keyword, ``ctx``.
  Initialise with a representative batch (the quantizers' data-driven initialisation reads it).

  Attributes:
    model: the Linen model.
    quant: the quantization setting.
  """
  model: nn.Module
  quant: QuantConfig
  _settings: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def setting_for(self, *args, **kwargs) -> QuantConfig:
    """``quant`` with the model's first and last quantizable layers kept at full precision (unless
    ``quant.quantize_first_last``), as both papers do. Finding them costs one abstract trace of the
    model per argument shapes, done once.

    Args:
      *args: the model's call arguments (a batch, ...).
      **kwargs: its keyword arguments (``train=True``, ...).

    Returns:
      The setting the layers are run with.
    """
    if self.quant.quantize_first_last or not self.quant.enabled:
      return self.quant
    signature = _signature(args, kwargs)
    if signature not in self._settings:
      arrays = [i for i, a in enumerate(args) if hasattr(a, "shape") and hasattr(a, "dtype")]

      def init(*traced):
        full = list(args)
        for i, value in zip(arrays, traced):
          full[i] = value
        with quantizing(self.quant):
          return self.model.init(jax.random.key(0), *full, **kwargs)

      with hooks.suspended(), hooks.recording() as calls:   # an inner trace: not a call the caller records
        jax.eval_shape(init, *[args[i] for i in arrays])
      paths = [p for p in LayerReport.of(calls).paths]
      ends = {"first": paths[0], "last": paths[-1]} if paths else {}
      extra = tuple((f"^{re.escape(path)}$", {"enabled": False}) for path in dict.fromkeys(ends.values()))
      self._settings[signature] = dataclasses.replace(self.quant, overrides=self.quant.overrides + extra)
    return self._settings[signature]

  def init(self, rngs: Any, *args, ctx: QuantContext | None = None, **kwargs) -> Any:
    """``model.init`` with the quantized layers; logs what it quantized (one line per layer).

    Args:
      rngs: as ``model.init``.
      *args: the model's inputs: a representative batch.
      ctx: the per-step context (default: none).
      **kwargs: the model's other arguments.

    Returns:
      The variables (``params``, ``quant_state``, and the model's own collections).

    Raises:
      ValueError: for an override that matches no layer.
    """
    quant = self.setting_for(*args, **kwargs)
    with hooks.recording() as calls, quantizing(quant, ctx):
      variables = self.model.init(rngs, *args, **kwargs)
    report = LayerReport.of(calls)
    report.check(self.quant)
    ends = {path for pattern, _ in quant.overrides[len(self.quant.overrides):] for path in report.paths
            if re.search(pattern, path)}
    for call, line in zip(report.calls, report.lines()):
      reason = " (first/last layer; QuantConfig.quantize_first_last=False)" if "/".join(call.path) in ends else ""
      log.info("quantize: %s%s", line, reason)
    return variables

  def apply(self, variables: Any, *args, ctx: QuantContext | None = None, **kwargs) -> Any:
    """``model.apply`` with the quantized layers.

    Args:
      variables: from :meth:`init`.
      *args: the model's inputs.
      ctx: the per-step context (``None``: evaluation).
      **kwargs: the model's other arguments (``mutable=``, ``train=``, ...).

    Returns:
      What ``model.apply`` returns.
    """
    call_kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "rngs", "method")}
    with quantizing(self.setting_for(*args, **call_kwargs), ctx):
      return self.model.apply(variables, *args, **kwargs)


def quantize(model: nn.Module, quant: QuantConfig) -> QuantizedModel:
  """``model`` (any Flax Linen module, unmodified) with its ``nn.Conv`` / ``nn.Dense`` / ``nn.DenseGeneral``
  / ``nn.Einsum`` layers quantized.

  Args:
    model: the model.
    quant: forward method, backward rule (STE, EWGS, PEGE or a registered one) and bits of the
      weight and activation quantizers, with per-layer overrides on the module paths.

  Returns:
    A :class:`QuantizedModel` whose ``init`` / ``apply`` take the per-step context as ``ctx=``.
  """
  return QuantizedModel(model, quant)
