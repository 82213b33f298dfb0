"""Flax quantized layers: ``QuantConv`` and ``QuantDense``.

Each layer has an activation quantizer on its input and a weight quantizer on its kernel, each with
the forward method, backward rule and bit width that its :class:`~ewgs_jax.quantconfig.QuantConfig`
resolves for the layer's path. What a method or rule needs comes from the registries
(:data:`ewgs_jax.quantizers.METHODS`, :data:`ewgs_jax.estimators.RULES`), so a registered method or
rule works here with no edit.

State, as ``DESIGN.md`` ("State in a model") fixes it, under the names of :mod:`ewgs_jax.names`:

* learned quantizer parameters live in ``params`` as ``q_<w|a>_<suffix>`` (the method's parameter
  suffixes: ``q_w_lower``, ``q_a_clip``, ``q_w_step``, ...) and ``q_alpha`` for methods with an
  output scale; their initialisers are the method's data-driven ones, reading the layer's actual
  input, so ``model.init`` on a real batch initialises them (EWGS Sec. 4.1); layers run in order,
  so each sees the already-quantized outputs of the layers before it;
* a rule whose factor source is ``quant_state`` (EWGS delta) reads ``quant_state/<layer>/delta_<w|a>``
  (0 until the first Hessian refresh, as in the reference code); the variable exists for every
  quantizer so that the state's structure does not depend on the rules;
* a rule whose source is ``context`` (PEGE mu_T) reads the per-call :class:`QuantContext`, and a rule
  with ``replacement`` gets PEGE's progressive replacement when the context carries a key;
* each quantizer exposes its discrete output ``x_q`` (the [0, 1] value before the output map)
  through a zero probe, ``perturbations/<layer>/w_q`` and ``a_q``, for :mod:`ewgs_jax.hessian`.

Convolutions use :func:`ewgs_jax.ops.conv_general_dilated` with the layer's ``conv_impl`` attribute.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ewgs_jax import names, ops, quantizers, replacement
from ewgs_jax.quantconfig import LayerQuant, QuantConfig, QuantizerSpec, first_last_quant  # noqa: F401 (re-exported)

Array = jax.Array


@flax.struct.dataclass
class QuantContext:
  """Per-call, step-dependent inputs of the quantizers (computed in ``train_step``).

  ``mu``: PEGE mu_T (PEGE Sec. 3.2). ``rate``: PEGE replacement rate p_T (Eq. 4). ``key``: the
  step's replacement key; ``None`` (or ``rate`` = 1) disables replacement. Evaluation passes no
  context: no replacement, mu = 0.
  """
  mu: Any = 0.0
  rate: Any = 1.0
  key: Any = None
  factors: Any = None   # {factor name: value} for other registered rules whose source is "context"

  def factor(self, name: str):
    """The per-step value of a rule's hyper-parameter ``name`` (``"mu"``, or a key of ``factors``), 0 if unset."""
    if self.factors is not None and name in self.factors:
      return self.factors[name]
    return self.mu if name == "mu" else 0.0


class _Quantized(nn.Module):
  """Shared quantizer logic of :class:`QuantConv` and :class:`QuantDense`."""

  def _setting(self) -> LayerQuant | None:
    if self.quant is None:
      return None
    setting = self.quant.resolve("/".join(self.scope.path))
    return setting if setting.active else None

  def _delta(self, kind: str) -> Array:
    """The quantizer's ``quant_state`` factor (created for every quantizer; 0 until refreshed)."""
    name = names.delta_name(kind)
    if self.is_mutable_collection(names.QUANT_STATE) or self.has_variable(names.QUANT_STATE, name):
      return self.variable(names.QUANT_STATE, name, lambda: jnp.zeros((), jnp.float32)).value
    return jnp.zeros((), jnp.float32)   # applied without its quant_state (e.g. bare params): 0

  def _discretizer(self, spec: QuantizerSpec, kind: str, ctx: QuantContext | None):
    """The quantizer's discretizer with its rule's hyper-parameter from the rule's declared source."""
    rule = spec.rule
    delta = self._delta(kind)
    value = None
    if rule.source == "quant_state":
      value = delta
    elif rule.source == "context":
      value = 0.0 if ctx is None or not self.quant.factor_applies(kind) else ctx.factor(rule.factor)
    return self.quant.discretizer(spec, value)

  def _hook(self, spec: QuantizerSpec, kind: str, ctx: QuantContext | None):
    """Adds the Hessian probe on x_q, then progressive replacement (PEGE Eq. 3) when the quantizer's
    rule asks for it and the context carries a key (training)."""
    granularity = self.quant.replacement_granularity
    replaces = spec.rule.replacement and ctx is not None and ctx.key is not None

    def hook(x_c, x_q):
      x_q = self.perturb(names.probe_name(kind), x_q)
      if replaces:
        name = "/".join(self.scope.path) + "/" + kind
        key = replacement.quantizer_key(ctx.key, name, granularity)
        x_q = replacement.replace(key, x_c, x_q, ctx.rate, granularity=granularity)
      return x_q

    return hook

  def _quantize(self, x: Array, spec: QuantizerSpec, kind: str, ctx: QuantContext | None) -> Array:
    """Quantizes ``x`` (kind ``"w"`` or ``"a"``) with its method's data-driven initialisation."""
    if not spec.active:
      return x
    weight = kind == "w"
    method = quantizers.get_method(spec.method)
    params = {suffix: self.param(names.quantizer_param(kind, suffix), lambda _, init=init: init(x, spec.bits, weight))
              for suffix, init in method.params.items()}
    return method.apply(x, params, bits=spec.bits, weight=weight, discretizer=self._discretizer(spec, kind, ctx),
                        hook=self._hook(spec, kind, ctx))

  def _quantized_op(self, x, kernel, op: Callable[[Array, Array], Array], ctx) -> Array:
    """``|alpha| * op(Q_A(x), Q_W(kernel))`` (EWGS Sec. 3.1); alpha only for interval quantizers."""
    setting = self._setting()
    if setting is None:
      return op(x, kernel)
    x_q = self._quantize(x, setting.act, "a", ctx)
    w_q = self._quantize(kernel, setting.weight, "w", ctx)
    y = op(x_q, w_q)
    if any(s.active and quantizers.get_method(s.method).output_scale for s in (setting.weight, setting.act)):
      def alpha_init(_):
        ratio = jnp.mean(jnp.abs(op(x, kernel))) / jnp.mean(jnp.abs(y))
        return jnp.where(jnp.isfinite(ratio) & (ratio > 0), ratio, 1.0).astype(jnp.float32)
      y = y * jnp.abs(self.param(names.OUTPUT_SCALE, alpha_init)).astype(y.dtype)
    return y


class QuantConv(_Quantized):
  """``nn.Conv`` (NHWC, HWIO kernel) with weight and activation quantizers.

  With ``quant=None`` (or a setting resolved to ``none``/``none``) it is exactly ``nn.Conv``.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # kaiming_normal_
  conv_impl: str = "auto"   # ops.IMPLS: the convolution's implementation, fixed per module (no global)

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    kernel_shape = (*self.kernel_size, x.shape[-1] // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = self.padding if isinstance(self.padding, str) else [tuple(p) for p in self.padding]

    def conv(inputs, weights):
      return ops.conv_general_dilated(
          inputs, weights, tuple(self.strides), padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.feature_group_count,
          impl=self.conv_impl)

    y = self._quantized_op(x, kernel, conv, ctx)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y


class QuantDense(_Quantized):
  """``nn.Dense`` with weight and activation quantizers (``quant=None``: exactly ``nn.Dense``)."""
  features: int
  use_bias: bool = True
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = self._quantized_op(x, kernel, jnp.matmul, ctx)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y
