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
  so each sees the already-quantized outputs of the layers before it. A constant or non-finite
  input or kernel (a placeholder batch such as ``jnp.zeros``) raises ``ValueError`` at ``model.init``
  rather than giving degenerate bounds; ``jax.eval_shape(model.init, ...)`` is fine for shapes;
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

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

    def data_driven(_, init):
      self._check_representative(x, spec, kind)
      return init(x, spec.bits, weight)

    params = {suffix: self.param(names.quantizer_param(kind, suffix), data_driven, init)
              for suffix, init in method.params.items()}
    return method.apply(x, params, bits=spec.bits, weight=weight, discretizer=self._discretizer(spec, kind, ctx),
                        hook=self._hook(spec, kind, ctx))

  def _check_representative(self, x: Array, spec: QuantizerSpec, kind: str) -> None:
    """Refuses a constant or non-finite tensor to initialise a quantizer from (a placeholder batch).

    ``model.init(rng, jnp.zeros(...))`` would give an activation quantizer bounds of 0 and 0 (and
    ``jnp.ones`` inverted ones), hence non-finite outputs on real data. Checked where the values
    exist (``model.init`` called eagerly); under ``jax.jit`` / ``jax.eval_shape`` nothing can be
    checked and shapes-only initialisation (``jax.eval_shape(model.init, ...)``) is fine.
    """
    if isinstance(x, jax.core.Tracer) or x.size == 0:
      return
    values = np.asarray(x, np.float32)   # concrete here (the layer may still run inside a trace)
    finite = bool(np.all(np.isfinite(values)))
    constant = finite and (x.size < 2 or float(values.max()) == float(values.min()))
    if finite and not constant:
      return
    what = "kernel" if kind == "w" else "input"
    found = "non-finite values" if not finite else f"the constant {float(values.reshape(-1)[0]):g}"
    raise ValueError(
        f"{type(self).__name__} {'/'.join(self.scope.path)!r}: the {spec.method} "
        f"{'weight' if kind == 'w' else 'activation'} quantizer is initialised from the data it sees "
        f"(EWGS Sec. 4.1), but its {what} holds {found}, which would give it degenerate bounds. "
        "Initialise the model with a representative batch of real inputs (model.init(rng, batch) or "
        "ewgs_jax.initialization.init_variables(model, rng, batch)); a placeholder such as jnp.zeros or "
        "jnp.ones is only fine for shapes: jax.eval_shape(model.init, rng, placeholder).")

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


def _tuple(value, rank: int, name: str) -> tuple[int, ...]:
  """An int, ``None`` (1) or a sequence of ``rank`` ints, as ``nn.Conv`` takes them."""
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  value = tuple(value)
  if len(value) != rank:
    raise ValueError(f"{name} {value} must have one entry per spatial dimension ({rank})")
  return value


def _unsupported(module: nn.Module, **given) -> None:
  """Fails naming each ``nn.Conv``/``nn.Dense`` argument that the quantized layer cannot honour."""
  bad = [name for name, (value, ok) in given.items() if not ok(value)]
  if bad:
    raise NotImplementedError(
        f"{type(module).__name__} does not support {', '.join(bad)} (given {', '.join(repr(given[b][0]) for b in bad)}): "
        "the quantizers need the layer's own convolution / matmul")


_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


class QuantConv(_Quantized):
  """``nn.Conv`` (channels last, ``(*kernel_size, in // groups, features)`` kernel) with weight and
  activation quantizers.

  Takes every argument of ``nn.Conv`` (``kernel_size`` and ``strides`` as ints or sequences,
  ``padding`` as a string, an int or pairs, ``input_dilation``, ``kernel_dilation``, ``mask``,
  ``param_dtype``, ``precision``, ``bias_init``; 1-, 2- and 3-D inputs, with or without a batch
  dimension, and extra leading batch dimensions). Those it cannot honour raise
  ``NotImplementedError`` naming them: ``padding`` ``"CIRCULAR"``/``"CAUSAL"``/``"REFLECT"``, a
  custom ``conv_general_dilated(_cls)`` or ``promote_dtype``.

  Defaults that differ from ``nn.Conv`` (those of the reference code, which the models rely on):
  ``kernel_size=(3, 3)``, ``use_bias=False``, ``kernel_init`` Kaiming normal (fan-in),
  ``dtype=float32``. :func:`ewgs_jax.quantize` passes an ``nn.Conv``'s own values, so there the
  defaults are ``nn.Conv``'s.

  With ``quant=None`` (or a setting resolved to ``none``/``none``) it computes what ``nn.Conv`` does.
  """
  features: int
  kernel_size: int | Sequence[int] = (3, 3)
  strides: None | int | Sequence[int] = 1
  padding: Any = "SAME"
  feature_group_count: int = 1
  use_bias: bool = False
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # kaiming_normal_
  conv_impl: str = "auto"   # ops.IMPLS: the convolution's implementation, fixed per module (no global)
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  mask: Array | None = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  bias_init: Callable = nn.initializers.zeros
  promote_dtype: Any = None
  conv_general_dilated: Any = None
  conv_general_dilated_cls: Any = None

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    padding = self.padding
    _unsupported(self, padding=(padding, lambda p: not (isinstance(p, str) and p.upper() in ("CIRCULAR", "CAUSAL", "REFLECT"))),
                 conv_general_dilated=(self.conv_general_dilated, lambda v: v is None),
                 conv_general_dilated_cls=(self.conv_general_dilated_cls, lambda v: v is None),
                 promote_dtype=(self.promote_dtype, lambda v: v is None or v is nn.dtypes.promote_dtype))
    kernel_size = _tuple(self.kernel_size, 1, "kernel_size") if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    rank = len(kernel_size)
    if rank not in _SPATIAL:
      raise NotImplementedError(f"QuantConv supports 1-, 2- and 3-D convolutions, not kernel_size {kernel_size}")
    if x.ndim == rank + 1:            # unbatched, as nn.Conv allows
      return self._batched(x[None], kernel_size, ctx)[0]
    if x.ndim < rank + 1:
      raise ValueError(f"QuantConv with kernel_size {kernel_size} needs inputs of rank >= {rank + 1}, got {x.shape}")
    batch = x.shape[:x.ndim - rank - 1]
    y = self._batched(x.reshape((-1, *x.shape[len(batch):])), kernel_size, ctx)
    return y.reshape((*batch, *y.shape[1:]))

  def _batched(self, x: Array, kernel_size: tuple[int, ...], ctx) -> Array:
    rank = len(kernel_size)
    kernel_shape = (*kernel_size, x.shape[-1] // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    if self.mask is not None:
      kernel = kernel * self.mask
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    padding = self.padding
    if not isinstance(padding, str):
      padding = nn.linear.canonicalize_padding(padding, rank)
      padding = [tuple(p) for p in padding]
    spatial = _SPATIAL[rank]
    dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    strides = _tuple(self.strides, rank, "strides")
    input_dilation = _tuple(self.input_dilation, rank, "input_dilation")
    kernel_dilation = _tuple(self.kernel_dilation, rank, "kernel_dilation")

    def conv(inputs, weights):
      return ops.conv_general_dilated(
          inputs, weights, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
          dimension_numbers=dimension_numbers, feature_group_count=self.feature_group_count,
          precision=self.precision, impl=self.conv_impl)

    y = self._quantized_op(x, kernel, conv, ctx)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y


class QuantDense(_Quantized):
  """``nn.Dense`` with weight and activation quantizers (``quant=None``: what ``nn.Dense`` computes).

  Takes every argument of ``nn.Dense`` (``param_dtype``, ``precision``, ``bias_init``, inputs with
  any leading dimensions); a custom ``dot_general(_cls)`` or ``promote_dtype`` raises
  ``NotImplementedError`` naming it. ``kernel_init`` defaults to Kaiming normal and ``dtype`` to
  float32 (the reference code's), not ``nn.Dense``'s LeCun normal and ``None``.
  """
  features: int
  use_bias: bool = True
  quant: QuantConfig | None = None
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  param_dtype: Any = jnp.float32
  precision: Any = None
  bias_init: Callable = nn.initializers.zeros
  promote_dtype: Any = None
  dot_general: Any = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    _unsupported(self, dot_general=(self.dot_general, lambda v: v is None),
                 dot_general_cls=(self.dot_general_cls, lambda v: v is None),
                 promote_dtype=(self.promote_dtype, lambda v: v is None or v is nn.dtypes.promote_dtype))
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    matmul = jnp.matmul if self.precision is None else functools.partial(jnp.matmul, precision=self.precision)
    y = self._quantized_op(x, kernel, matmul, ctx)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y
