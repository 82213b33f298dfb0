"""Flax quantized layers: ``QuantConv`` and ``QuantDense``.

Each layer has an activation quantizer on its input and a weight quantizer on its kernel, each with
the forward method, backward rule and bit width that its :class:`~ewgs_jax.quantconfig.QuantConfig`
resolves for the layer's path. What a method or rule needs comes from the registries
(:data:`ewgs_jax.quantizers.METHODS`, :data:`ewgs_jax.rules.RULES`), so a registered method or
rule works here with no edit.

State, as ``ARCHITECTURE.md`` ("State in a model") fixes it, under the names of :mod:`ewgs_jax.names`:

* learned quantizer parameters live in ``params`` as ``q_<w|a>_<suffix>`` (the method's parameter
  suffixes: ``q_w_lower``, ``q_a_clip``, ``q_w_step``, ...) and ``q_alpha`` for methods with an
  output scale; scalars, or one per output channel for per-channel weights
  (:attr:`~ewgs_jax.quantconfig.QuantizerSpec.per_channel`, alpha too); their initialisers are the
  method's data-driven ones, reading the layer's actual input, so ``model.init`` on a real batch
  initialises them (EWGS Sec. 4.1); layers run in order, so each sees the already-quantized outputs
  of the layers before it. A constant or non-finite input or kernel (a placeholder batch such as
  ``jnp.zeros``) raises ``ValueError`` at ``model.init`` rather than giving degenerate bounds;
  ``jax.eval_shape(model.init, ...)`` is fine for shapes;
* a rule whose factor source is ``quant_state`` (EWGS delta) reads ``quant_state/<layer>/delta_<w|a>``
  (0 until the first Hessian refresh, as in the reference code); the variable exists for every
  quantizer so that the state's structure does not depend on the rules;
* a rule whose source is ``context`` (PEGE mu_T) reads its factor from the per-call
  :class:`QuantContext` (``ctx.factors[rule][factor]``), and a rule with a replacement rate gets
  PEGE's progressive replacement (Eq. 3) when the context carries a key;
* each quantizer exposes its discrete output ``x_q`` (the [0, 1] value before the output map) to
  :func:`ewgs_jax.hooks.probing`, which the Hessian code uses; nothing of it is stored, so the
  variables do not depend on the batch size;
* every call is reported to :func:`ewgs_jax.hooks.recording` (the layer report of start-up code).

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

from ewgs_jax import hooks, names, ops, quantizers, replacement, rules
from ewgs_jax.quantconfig import LayerQuant, QuantConfig, QuantizerSpec, first_last_quant  # noqa: F401 (re-exported)

Array = jax.Array


@flax.struct.dataclass
class QuantContext:
  """Per-call, step-dependent inputs of the quantizers (:meth:`ewgs_jax.qat.QAT.context` builds it).

  Attributes:
    factors: ``{rule name: {factor name: value}}``: each rule's per-step factors (PEGE: ``mu`` =
      mu_T, Sec. 3.2, and ``rate`` = p_T, Eq. 4), from the rule's own ``step_factors``.
    key: the step's replacement key; ``None`` disables replacement (PEGE Eq. 3).

  Evaluation passes no context: no replacement, per-step factors 0. A training context that lacks a
  factor some quantizer's rule needs is an error, never a silent 0.
  """
  factors: Any = None
  key: Any = None

  def factor(self, rule: str, name: str):
    """The per-step value ``name`` of rule ``rule``.

    Args:
      rule: the rule's name.
      name: the factor's name.

    Returns:
      The value (a traced scalar).

    Raises:
      KeyError: naming the factor, when the context does not carry it.
    """
    try:
      return self.factors[rule][name]
    except (KeyError, TypeError):
      raise KeyError(f"the per-step QuantContext has no factor {rule}/{name}: build it with "
                     f"ewgs_jax.QAT(...).context(step, key) for the rules the model uses") from None


def _forward_only(discretizer, message: str):
  """``discretizer`` whose gradient raises ``ValueError(message)`` when traced: for a quantizer whose
  rule's factor is missing, so that inference works and training cannot silently fall back to STE."""
  @jax.custom_vjp
  def guard(x_q):
    return x_q

  def backward(_, g):
    raise ValueError(message)

  guard.defvjp(lambda x_q: (x_q, None), backward)
  return lambda x, bits: guard(discretizer(x, bits))


class _Quantized(nn.Module):
  """Shared quantizer logic of the quantized layers."""

  def _path(self) -> tuple[str, ...]:
    assert self.scope is not None, "a quantized layer runs bound (inside init / apply)"
    return tuple(self.scope.path)

  def _setting(self) -> LayerQuant | None:
    if self.quant is None:
      return None
    setting = self.quant.resolve("/".join(self._path()))
    hooks.record_layer(self._path(), type(self).__name__, setting if setting.active else None)
    return setting if setting.active else None

  def _delta(self, kind: str, ctx: QuantContext | None) -> Array | None:
    """The quantizer's ``quant_state`` factor (created for every quantizer; 0 until refreshed)."""
    name = names.delta_name(kind)
    if self.is_mutable_collection(names.QUANT_STATE) or self.has_variable(names.QUANT_STATE, name):
      return self.variable(names.QUANT_STATE, name, lambda: jnp.zeros((), jnp.float32)).value
    if ctx is not None:   # training without the quant_state collection would silently train as STE
      raise ValueError(self._missing_state_message())
    return None

  def _missing_state_message(self) -> str:
    return (f"{type(self).__name__} {'/'.join(self._path())!r}: its rule reads its factor from the "
            f"{names.QUANT_STATE!r} collection, which the variables passed to apply do not hold; pass "
            f"every collection of model.init's result (e.g. {{**variables, 'params': params}})")

  def _discretizer(self, spec: QuantizerSpec, kind: str, ctx: QuantContext | None):
    """The quantizer's discretizer with its rule's factor from the rule's declared source, and the
    ``quant_state`` value it was read from (for the Hessian probes; ``None`` for other sources)."""
    rule = rules.get(spec.rule)
    reads_state = rule.source == "quant_state"
    state = self._delta(kind, ctx if reads_state else None)   # exists for every quantizer: rule-free structure
    value = None
    if reads_state:
      value = jnp.zeros((), jnp.float32) if state is None else state
    elif rule.source == "context" and rule.factor is not None:
      applies = ctx is not None and self.quant.options(spec.rule).factor_applies(kind)
      value = ctx.factor(rule.name, rule.factor) if ctx is not None and applies else jnp.zeros((), jnp.float32)
    discretizer = self.quant.discretizer(spec, value)
    if reads_state and state is None:   # the forward needs no factor; a gradient would be STE's, silently
      discretizer = _forward_only(discretizer, self._missing_state_message())
    return discretizer, (state if reads_state else None)

  def _hook(self, spec: QuantizerSpec, kind: str, ctx: QuantContext | None, state):
    """Exposes x_q to the Hessian probes (:mod:`ewgs_jax.hooks`), then applies progressive replacement
    (PEGE Eq. 3) when the quantizer's rule has a replacement rate and the context carries a key."""
    rule = rules.get(spec.rule)
    replaces = rule.replacement is not None and ctx is not None and ctx.key is not None
    granularity = self.quant.options(spec.rule).granularity
    path = (*self._path(), names.probe_name(kind))

    def hook(x_c, x_q):
      x_q = hooks.probe(path, spec.rule, x_q, state)
      if replaces:
        key = replacement.quantizer_key(ctx.key, "/".join(self._path()) + "/" + kind, granularity)
        x_q = replacement.replace(key, x_c, x_q, ctx.factor(rule.name, rule.replacement), granularity=granularity)
      return x_q

    return hook

  def _quantize(self, x: Array, spec: QuantizerSpec, kind: str, ctx: QuantContext | None) -> Array:
    """Quantizes ``x`` (kind ``"w"`` or ``"a"``) with its method's data-driven initialisation.

    A per-channel weight quantizer (``spec.per_channel``) has each learned parameter per output channel
    (the kernel's last axis), initialised from that channel's weights alone
    (:func:`ewgs_jax.quantizers.per_channel`); every method broadcasts such parameters against the kernel.
    """
    if not spec.active:
      return x
    weight = kind == "w"
    if spec.per_channel and not weight:
      raise ValueError(f"{type(self).__name__} {'/'.join(self._path())!r}: per-channel ranges are for weight "
                       "quantizers only; the activation quantizer is per tensor")
    method = quantizers.get_method(spec.method)

    def data_driven(_, init):
      self._check_representative(x, spec, kind)
      return (quantizers.per_channel(init) if spec.per_channel else init)(x, spec.bits, weight)

    params = {suffix: self.param(names.quantizer_param(kind, suffix), data_driven, init)
              for suffix, init in method.params.items()}
    discretizer, state = self._discretizer(spec, kind, ctx)
    return method.apply(x, params, bits=spec.bits, weight=weight, discretizer=discretizer,
                        hook=self._hook(spec, kind, ctx, state))

  def _check_representative(self, x: Array, spec: QuantizerSpec, kind: str) -> None:
    """Refuses a constant or non-finite tensor to initialise a quantizer from (a placeholder batch).

    ``model.init(rng, jnp.zeros(...))`` would give an activation quantizer bounds of 0 and 0 (and
    ``jnp.ones`` inverted ones), hence non-finite outputs on real data. Checked on the values when
    ``model.init`` runs eagerly, and by a host callback when it runs under ``jax.jit`` (the error
    then surfaces when the result is computed). ``jax.eval_shape(model.init, ...)`` computes
    nothing and checks nothing: shapes-only initialisation is fine.
    """
    if x.size == 0:
      return
    where = f"{type(self).__name__} {'/'.join(self._path())!r}"
    # a per-channel quantizer initialises each output channel alone: none may be constant
    check = functools.partial(_raise_if_degenerate, where, spec.method, kind, per_channel=spec.per_channel)
    if isinstance(x, jax.core.Tracer):
      jax.debug.callback(check, *_degeneracy(jnp, x.astype(jnp.float32), spec.per_channel))
      return
    check(*_degeneracy(np, np.asarray(x, np.float32), spec.per_channel))   # concrete here (maybe inside a trace)

  def _quantized_op(self, x, kernel, op: Callable[[Array, Array], Array], ctx,
                    add_bias: Callable[[Array], Array] | None = None, channels_last: bool | str = True) -> Array:
    """``|alpha| * (op(Q_A(x), Q_W(kernel)) + bias)`` (EWGS Sec. 3.1); alpha only for methods with an
    output scale. The bias is scaled with the product and enters alpha's data-driven initialisation,
    as in the official code (``F.conv2d(Qact, Qweight, self.bias) * |output_scale|``):
    ``alpha = E|o + b| / E|o_q + b|``.

    With per-channel weights alpha is per output channel too, the same formula over each channel's
    outputs (our extension; the papers' ranges are per tensor): per-channel interval weights map every
    channel to [-1, 1], so one alpha could not restore the channels' different scales and a warm start
    would no longer reproduce the full-precision network. ``channels_last`` says whether the kernel's
    last axis is the output's last axis (a message saying why not, otherwise), as per channel needs.
    """
    add_bias = add_bias or (lambda y: y)
    setting = self._setting()
    if setting is None:
      return add_bias(op(x, kernel))
    per_channel = setting.weight.active and setting.weight.per_channel
    if per_channel and channels_last is not True:
      raise ValueError(f"{type(self).__name__} {'/'.join(self._path())!r}: per-channel weight ranges need the "
                       f"kernel's last axis to be the output's last axis ({channels_last}); use per-tensor "
                       "ranges for this layer (override weight_per_channel=False)")
    x_q = self._quantize(x, setting.act, "a", ctx)
    w_q = self._quantize(kernel, setting.weight, "w", ctx)
    y = add_bias(op(x_q, w_q))
    if any(s.active and quantizers.get_method(s.method).output_scale for s in (setting.weight, setting.act)):
      def alpha_init(_):
        axes = tuple(range(y.ndim - 1)) if per_channel else None   # every axis but the output channels'
        ratio = jnp.mean(jnp.abs(add_bias(op(x, kernel))), axis=axes) / jnp.mean(jnp.abs(y), axis=axes)
        return jnp.where(jnp.isfinite(ratio) & (ratio > 0), ratio, 1.0).astype(jnp.float32)
      y = y * jnp.abs(self.param(names.OUTPUT_SCALE, alpha_init)).astype(y.dtype)
    return y


def _degeneracy(xnp, x, per_channel: bool) -> tuple:
  """``(finite, spread, first, channel)`` of ``x`` for :func:`_raise_if_degenerate` (``xnp``: numpy or
  jax.numpy): the smallest ``max - min`` over the channels (the last axis; the whole tensor when not
  ``per_channel``), that channel and its first value; a channel of one value has spread 0."""
  x = x.reshape(-1, x.shape[-1] if per_channel else 1)
  finite = xnp.all(xnp.isfinite(x))
  x = xnp.where(xnp.isfinite(x), x, 0.0)
  spread = (x.max(axis=0) - x.min(axis=0)) * (x.shape[0] > 1)
  channel = xnp.argmin(spread)
  return finite, spread[channel], x[0, channel], channel


def _raise_if_degenerate(where: str, method: str, kind: str, finite, spread, first, channel,
                         per_channel: bool = False) -> None:
  """Raises ``ValueError`` when a quantizer would be initialised from non-finite or constant values
  (per channel: a constant output channel)."""
  finite = bool(finite)
  constant = finite and float(spread) == 0.0
  if finite and not constant:
    return
  if per_channel and constant:
    where += f" (per-channel weight ranges; output channel {int(channel)})"
  what = "kernel" if kind == "w" else "input"
  found = "non-finite values" if not finite else f"the constant {float(first):g}"
  if kind == "w":
    fix = ("give the layer a kernel initialiser that draws different values (a constant kernel, e.g. "
           "kernel_init=zeros, cannot be quantized), or initialise its weights from a trained model")
  else:
    fix = ("initialise the model with a representative batch of real inputs (model.init(rng, batch)); a "
           "placeholder such as jnp.zeros or jnp.ones is only fine for shapes: jax.eval_shape(model.init, rng, "
           "placeholder)")
  raise ValueError(
      f"{where}: the {method} {'weight' if kind == 'w' else 'activation'} quantizer is initialised from the data "
      f"it sees (EWGS Sec. 4.1), but its {what} holds {found}, which would give it degenerate bounds: {fix}.")


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


def _own_matmul_only(module: nn.Module) -> None:
  """Fails naming a custom ``dot_general(_cls)`` or ``promote_dtype``: the quantizers need the layer's own product."""
  _unsupported(module, dot_general=(getattr(module, "dot_general", None), lambda v: v is None),
               dot_general_cls=(getattr(module, "dot_general_cls", None), lambda v: v is None),
               promote_dtype=(module.promote_dtype, lambda v: v is None or v is nn.dtypes.promote_dtype))


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

    return self._quantized_op(x, kernel, conv, ctx, self._bias(dtype))

  def _bias(self, dtype) -> Callable[[Array], Array] | None:
    if not self.use_bias:
      return None
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return lambda y: y + bias


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
    _own_matmul_only(self)
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    matmul = jnp.matmul if self.precision is None else functools.partial(jnp.matmul, precision=self.precision)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype) if self.use_bias
            else None)
    return self._quantized_op(x, kernel, matmul, ctx, None if bias is None else (lambda y: y + bias))


def _axes(value, ndim: int) -> tuple[int, ...]:
  """``nn.DenseGeneral``'s axes (an int or a sequence, negative allowed), non-negative and sorted."""
  value = (value,) if isinstance(value, int) else tuple(value)
  return tuple(sorted(a if a >= 0 else ndim + a for a in value))


class QuantDenseGeneral(_Quantized):
  """``nn.DenseGeneral`` (any contracting ``axis``, several output ``features``, ``batch_dims``) with
  weight and activation quantizers: the projections of attention blocks and transformers.

  Same parameters, shapes and initialisation as ``nn.DenseGeneral`` (``quant=None``: what it
  computes); a custom ``dot_general(_cls)`` or ``promote_dtype`` raises ``NotImplementedError``.
  """
  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  batch_dims: Sequence[int] = ()
  use_bias: bool = True
  quant: QuantConfig | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  precision: Any = None
  promote_dtype: Any = None
  dot_general: Any = None
  dot_general_cls: Any = None

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    _own_matmul_only(self)
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis, batch_dims = _axes(self.axis, x.ndim), _axes(self.batch_dims, x.ndim)
    if batch_dims and set(batch_dims) != set(range(max(batch_dims) + 1)):
      raise ValueError(f"batch_dims {self.batch_dims} must be consecutive leading dimensions starting from 0")
    n_batch, n_axis = len(batch_dims), len(axis)
    batch_shape = tuple(x.shape[a] for a in batch_dims)

    def flat_init(init, lead: int | None):   # initialise flat, as nn.DenseGeneral does, then reshape
      def wrapped(rng, shape, dtype=jnp.float32):
        size = int(np.prod(shape))
        flat = (size,) if lead is None else (int(np.prod(shape[:lead])), size // max(int(np.prod(shape[:lead])), 1))
        return jnp.reshape(init(rng, flat, dtype), shape)
      return wrapped

    kernel = self.param("kernel", flat_init(self.kernel_init, n_batch + n_axis),
                        batch_shape + tuple(x.shape[a] for a in axis) + features, self.param_dtype)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    dimension_numbers = ((axis, tuple(range(n_batch, n_batch + n_axis))), (batch_dims, tuple(range(n_batch))))

    def op(inputs, weights):
      return jax.lax.dot_general(inputs, weights, dimension_numbers, precision=self.precision)

    add_bias = None
    if self.use_bias:
      bias = self.param("bias", flat_init(self.bias_init, None), batch_shape + features, self.param_dtype).astype(dtype)
      expanded = tuple(x.shape[a] if a in batch_dims else 1 for a in range(x.ndim) if a not in axis)
      add_bias = lambda y: y + jnp.reshape(bias, expanded + features)
    return self._quantized_op(x, kernel, op, ctx, add_bias)


class QuantEinsum(_Quantized):
  """``nn.Einsum`` (an input times a learned kernel of ``shape`` by an explicit two-operand
  ``einsum_str``) with weight and activation quantizers.

  Same parameters, shapes and initialisation as ``nn.Einsum`` (``quant=None``: what it computes).
  """
  shape: Sequence[int]
  einsum_str: str | None = None
  use_bias: bool = True
  quant: QuantConfig | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  promote_dtype: Any = None
  preferred_element_type: Any = None

  @nn.compact
  def __call__(self, x: Array, einsum_str: str | None = None, ctx: QuantContext | None = None) -> Array:
    _own_matmul_only(self)
    einsum_str = nn.module.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
      raise ValueError(f"einsum_str {einsum_str!r} must be explicit ('->') with exactly two operands")
    kernel = self.param("kernel", self.kernel_init, tuple(self.shape), self.param_dtype)
    dtype = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)

    def op(inputs, weights):
      return jnp.einsum(einsum_str, inputs, weights, precision=self.precision,
                        preferred_element_type=self.preferred_element_type)

    add_bias = None
    if self.use_bias:
      # nn.Einsum's own rule (it reads only .shape)
      bias_shape, broadcast = nn.Einsum._get_bias_shape(self, einsum_str, x, kernel)  # type: ignore[arg-type]
      bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype).astype(dtype)
      add_bias = lambda y: y + jnp.reshape(bias, broadcast)
    rhs, out = einsum_str.split(",")[1].split("->")
    channels_last = rhs[-1:].isalpha() and rhs[-1] == out[-1:] or f"einsum {einsum_str!r}"
    return self._quantized_op(x, kernel, op, ctx, add_bias, channels_last)
