"""Quantizing a Flax Linen model you did not write: :func:`quantize` and :func:`quantizing`.

The model's own ``nn.Conv`` and ``nn.Dense`` calls are intercepted (``flax.linen.intercept_methods``)
and computed by :class:`~ewgs_jax.layers.QuantConv` / :class:`~ewgs_jax.layers.QuantDense` bound to
the *same* scope, with the intercepted layer's own arguments. So the variables are laid out exactly
as in the unmodified model (``params/Conv_0/kernel``, ...) plus the quantizer parameters beside
them (``params/Conv_0/q_a_lower``, ``quant_state/Conv_0/delta_w``, ...), which is also the layout
of a hand-built model whose layers are ``QuantConv``/``QuantDense`` of the same names, and a
full-precision checkpoint of the unmodified model warm-starts it.

The per-step :class:`~ewgs_jax.layers.QuantContext` (PEGE mu_T, replacement rate and key) reaches
every intercepted layer directly: the model does not have to pass it on. Which layers are
quantized, and how, is the :class:`~ewgs_jax.quantconfig.QuantConfig`: its per-layer regex rules
match the layers' module paths (a rule with ``{"weight_method": "none", "act_method": "none"}``
leaves a layer full precision). Subclasses of ``nn.Conv``/``nn.Dense`` are intercepted too;
``nn.ConvTranspose``, ``nn.ConvLocal``, ``nn.DenseGeneral`` and ``nn.Einsum`` are not.

::

    quantized = ewgs_jax.quantize(MyNet(), QuantConfig(weight=QuantizerSpec("interval", "pege", 2),
                                                       act=QuantizerSpec("interval", "pege", 2)))
    variables = quantized.init(rng, real_batch)        # data-driven quantizer initialisation
    logits = quantized.apply(variables, x, ctx=QuantContext(mu=mu_t, rate=p_t, key=step_key))
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import flax.linen as nn

from ewgs_jax.layers import QuantContext, QuantConv, QuantDense
from ewgs_jax.quantconfig import QuantConfig

# the intercepted layer -> the quantized layer computing it; every field of the former is passed on
REPLACEMENTS = ((nn.Conv, QuantConv), (nn.Dense, QuantDense))
_NOT_INTERCEPTED = (nn.ConvTranspose, nn.ConvLocal)


def _replacement(module: nn.Module, quant: QuantConfig) -> nn.Module | None:
  if isinstance(module, _NOT_INTERCEPTED):
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
  """Within this context every ``nn.Conv`` / ``nn.Dense`` call is computed quantized (see the module doc).

  Args:
    quant: the setting and its per-layer rules (matched against each layer's module path).
    ctx: the per-step context given to every quantized layer (``None``: evaluation, no replacement).
  """
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    replacement = _replacement(context.module, quant)
    if replacement is None:
      return next_fun(*args, **kwargs)
    if kwargs or len(args) != 1:
      raise TypeError(f"{type(context.module).__name__} {'/'.join(context.module.scope.path)!r} was called with "
                      "more than its input; ewgs_jax.quantize cannot intercept it")
    return replacement(args[0], ctx)

  with nn.intercept_methods(interceptor):
    yield


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """An unmodified Linen ``model`` run with quantized ``nn.Conv`` / ``nn.Dense`` layers (:func:`quantize`).

  ``init`` and ``apply`` are ``model.init`` / ``model.apply`` with one more keyword, ``ctx``.
  Initialise with a representative batch (the quantizers' data-driven initialisation reads it).
  """
  model: nn.Module
  quant: QuantConfig

  def init(self, rngs: Any, *args, ctx: QuantContext | None = None, **kwargs) -> Any:
    with quantizing(self.quant, ctx):
      return self.model.init(rngs, *args, **kwargs)

  def apply(self, variables: Any, *args, ctx: QuantContext | None = None, **kwargs) -> Any:
    with quantizing(self.quant, ctx):
      return self.model.apply(variables, *args, **kwargs)


def quantize(model: nn.Module, quant: QuantConfig) -> QuantizedModel:
  """``model`` (any Flax Linen module, unmodified) with its ``nn.Conv`` / ``nn.Dense`` layers quantized.

  Args:
    model: the model.
    quant: forward method, backward rule (STE, EWGS, PEGE or a registered one) and bits of the
      weight and activation quantizers, with per-layer regex rules on the module paths.

  Returns:
    A :class:`QuantizedModel` whose ``init`` / ``apply`` take the per-step context as ``ctx=``.
  """
  return QuantizedModel(model, quant)
