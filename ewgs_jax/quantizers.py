"""Forward quantization methods, each built on any discretizer (PEGE Sec. 3.1, Eq. 1-2).

Every method follows the same three steps:

1. *Clip and normalise* the input ``x`` into a continuous latent ``x_c`` in [0, 1] (PEGE Eq. 1;
   EWGS Eq. 1 calls it ``x_n``), using the method's learned parameters.
2. *Discretize* it with a :data:`~ewgs_jax.estimators.Discretizer` (PEGE Eq. 2, EWGS Eq. 2). The
   discretizer decides the backward rule (STE, EWGS, PEGE), so any forward method works with any
   backward rule.
3. *Map* the discrete value ``x_q`` back to the method's output range.

Between steps 2 and 3 an optional ``hook(x_c, x_q) -> x_q'`` sees both latent values in the [0, 1]
domain. The Flax layers use it to add the zero-valued Hessian probe on ``x_q`` and to apply PEGE's
progressive replacement (:func:`ewgs_jax.replacement.replace`).

Parameters (bounds, clip values, step sizes) may be scalars or arrays that broadcast against
``x`` (e.g. one per output channel, shape ``(C,)`` for an ``HWIO`` kernel); their gradients come
back in their own shape. The result has the dtype of ``x``.

Clipping is ``where``-based, so the gradient at exactly a bound is 1, as PyTorch ``clamp`` gives
(``jnp.clip`` gives 0.5 there). This matters: with the EWGS activation initialisation
``l = min(x)`` many inputs sit exactly on the lower bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from ewgs_jax.estimators import Array, Discretizer, levels, ste

#: ``hook(x_c, x_q) -> x_q'``: sees the latent and discrete values, returns what replaces ``x_q``.
Hook = Callable[[Array, Array], Array]


def clip(x: Array, low, high) -> Array:
  """Clips ``x`` to ``[low, high]`` passing gradient 1 at exactly the bounds (as torch.clamp).

  Elements strictly outside get gradient 0 with respect to ``x`` and gradient 1 with respect to
  the bound they are clipped to.

  Args:
    x: the values to clip.
    low: the lower bound (scalar or array, may be traced).
    high: the upper bound (scalar or array, may be traced).

  Returns:
    ``x`` clipped to ``[low, high]``.
  """
  return jnp.where(x < low, low, jnp.where(x > high, high, x))


def scale_gradient(x: Array, scale) -> Array:
  """Identity in the forward pass; multiplies the gradient by ``scale`` (LSQ Sec. 2.2).

  Args:
    x: the value (e.g. LSQ's step size).
    scale: the factor the gradient with respect to ``x`` is multiplied by.

  Returns:
    ``x`` (numerically), with the scaled gradient.
  """
  return x * scale + lax.stop_gradient(x - x * scale)


def _discretize(x_c: Array, bits: int, discretizer: Discretizer, hook: Hook | None) -> Array:
  x_q = discretizer(x_c, bits)
  return x_q if hook is None else hook(x_c, x_q)


def interval(
    x: Array,
    lower: Array,
    upper: Array,
    *,
    bits: int,
    weight: bool,
    discretizer: Discretizer = ste,
    hook: Hook | None = None,
) -> Array:
  """EWGS/QIL interval quantizer with learned lower and upper bounds (EWGS Eq. 1-3).

  ``x_n = clip((x - l) / (u - l), 0, 1)`` (Eq. 1), ``x_q = discretizer(x_n)`` (Eq. 2), and the
  output is ``Q_W = 2 (x_q - 0.5)`` for weights or ``Q_A = x_q`` for activations (Eq. 3). The
  layer's output scale alpha is applied after the convolution, in :mod:`ewgs_jax.layers`.

  The bounds get gradients only through unclipped elements (the clip gradient is taken at the
  normalised value, as in the reference code): there is no PACT/LSQ-style clipping gradient.

  Args:
    x: the weights or activations to quantize.
    lower: the learned lower bound ``l``.
    upper: the learned upper bound ``u``.
    bits: the static bit width.
    weight: ``True`` for the weight output ``2 (x_q - 0.5)``, ``False`` for activations ``x_q``.
    discretizer: the rounding with its backward rule (:mod:`ewgs_jax.estimators`); STE by default.
    hook: optional ``hook(x_c, x_q)`` whose result replaces ``x_q`` (progressive replacement).

  Returns:
    ``Q_W`` in [-1, 1] or ``Q_A`` in [0, 1], in ``x.dtype``.
  """
  x_n = clip((x - lower) / (upper - lower), 0.0, 1.0)
  x_q = _discretize(x_n, bits, discretizer, hook)
  out = 2.0 * (x_q - 0.5) if weight else x_q
  return out.astype(x.dtype)


def pact(
    x: Array,
    clip_value: Array,
    *,
    bits: int,
    signed: bool = False,
    discretizer: Discretizer = ste,
    hook: Hook | None = None,
) -> Array:
  """PACT: clip to a learned ``[0, m]`` and quantize uniformly on it (PEGE Sec. 3.1; PACT Eq. 1-3).

  ``x_c = 0.5 (|x| - |x - m| + m) = clip(x, 0, m)``; ``x_q = m * discretizer(x_c / m)``.
  The gradient with respect to ``m`` is PACT's: ``dQ/dm = 1`` where ``x >= m`` and 0 elsewhere
  (the rounding's own dependence on ``m`` is treated as constant, as PACT's STE does). At a tie
  ``x = m`` the gradient is 1, as in PACT's Eq. 3 (the ``|.|`` form would give 0.5).

  ``signed=True`` is the symmetric weight variant (our choice, PACT itself quantizes weights with
  DoReFa): clip to ``[-m, m]`` with levels spread uniformly over it; ``dQ/dm = sign(x)`` outside.

  Args:
    x: the values to quantize.
    clip_value: the learned clipping level ``m`` (positive).
    bits: the static bit width.
    signed: clip to ``[-m, m]`` (symmetric weight variant) instead of ``[0, m]``.
    discretizer: the rounding with its backward rule; STE by default.
    hook: optional ``hook(x_c, x_q)`` whose result replaces ``x_q`` (on the [0, 1] latent).

  Returns:
    The quantized values on ``[0, m]`` (or ``[-m, m]``), in ``x.dtype``.
  """
  m = lax.stop_gradient(clip_value)
  # PACT Eq. 3 puts the tie x = m on the clipped side: dQ/dm = 1 there.
  x_c = jnp.where(x >= clip_value, clip_value, x)
  if signed:
    x_c = jnp.where(x <= -clip_value, -clip_value, x_c)
    x_q = _discretize((x_c + m) / (2.0 * m), bits, discretizer, hook)
    out = m * (2.0 * x_q - 1.0)
  else:
    x_c = jnp.where(x < 0.0, 0.0, x_c)
    out = m * _discretize(x_c / m, bits, discretizer, hook)
  return out.astype(x.dtype)


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
  """LSQ's integer range ``(Q_N, Q_P)``: signed ``(2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b-1)``.

  Args:
    bits: the static bit width.
    signed: whether the range is symmetric around 0.

  Returns:
    ``(Q_N, Q_P)``, the number of negative and positive levels.
  """
  n = levels(bits)
  q_neg = 2 ** (bits - 1) if signed else 0
  return q_neg, n - q_neg


def lsq(
    x: Array,
    step: Array,
    *,
    bits: int,
    signed: bool,
    grad_scale: float | None = None,
    discretizer: Discretizer = ste,
    hook: Hook | None = None,
) -> Array:
  """LSQ: learned step size ``s`` (Esser et al. 2020, Eq. 1-3).

  ``v = clip(x / s, -Q_N, Q_P)``, output ``round(v) * s``. Written through the [0, 1] latent
  ``x_c = (v + Q_N) / (Q_N + Q_P)`` so that any discretizer applies; with STE, autodiff gives
  exactly LSQ's step gradient ``-x/s + round(x/s)`` inside the range and ``-Q_N``/``Q_P`` outside,
  multiplied by the gradient scale ``1 / sqrt(N Q_P)`` (LSQ Sec. 2.2), where ``N`` is the number
  of elements sharing one step (all of them, or one channel's). ``Q_P`` is floored at 1 so that
  signed 1-bit (``Q_P = 0``) stays finite.

  Args:
    x: the values to quantize.
    step: the learned step size ``s`` (scalar, or per channel broadcastable against ``x``).
    bits: the static bit width.
    signed: use the signed integer range (weights) instead of the unsigned one (activations).
    grad_scale: the step's gradient scale; ``None`` for LSQ's ``1 / sqrt(N Q_P)``.
    discretizer: the rounding with its backward rule; STE by default.
    hook: optional ``hook(x_c, x_q)`` whose result replaces ``x_q`` (on the [0, 1] latent).

  Returns:
    ``round(clip(x / s, -Q_N, Q_P)) * s``, in ``x.dtype``.
  """
  q_neg, q_pos = lsq_range(bits, signed)
  scale: Any = grad_scale
  if scale is None:
    # N may be symbolic (a batch size left open by jax.export), so the scale is computed as an array
    per_step = x.size // max(jnp.size(step), 1)
    scale = 1.0 / jnp.sqrt(jnp.asarray(per_step * max(q_pos, 1), jnp.float32))
  s = scale_gradient(step, scale)
  v = clip(x / s, -float(q_neg), float(q_pos))
  x_q = _discretize((v + q_neg) / (q_neg + q_pos), bits, discretizer, hook)
  out = (x_q * (q_neg + q_pos) - q_neg) * s
  return out.astype(x.dtype)


def dorefa(
    x: Array,
    *,
    bits: int,
    weight: bool,
    discretizer: Discretizer = ste,
    hook: Hook | None = None,
) -> Array:
  """DoReFa-Net quantizers (Zhou et al. 2016, Eq. 9 and Sec. 2.6), no learned parameters.

  Weights: ``x_c = tanh(w) / (2 max|tanh(w)|) + 1/2``, output ``2 x_q - 1``.
  Activations: ``x_c = clip(x, 0, 1)``, output ``x_q``.

  Args:
    x: the weights or activations to quantize.
    bits: the static bit width.
    weight: ``True`` for the weight quantizer (tanh normalisation), ``False`` for activations.
    discretizer: the rounding with its backward rule; STE by default.
    hook: optional ``hook(x_c, x_q)`` whose result replaces ``x_q``.

  Returns:
    Weights in [-1, 1] or activations in [0, 1], in ``x.dtype``.
  """
  if weight:
    t = jnp.tanh(x)
    x_c = t / (2.0 * jnp.max(jnp.abs(t))) + 0.5
    out = 2.0 * _discretize(x_c, bits, discretizer, hook) - 1.0
  else:
    out = _discretize(clip(x, 0.0, 1.0), bits, discretizer, hook)
  return out.astype(x.dtype)


# --- the registry of forward methods -----------------------------------------------------------

#: ``init(x, bits, weight) -> value``: a data-driven initialiser of a learned parameter from the
#: tensor it quantizes (its ``weight`` flag: kernel or activation).
Initializer = Callable[[Array, int, bool], Array]

PACT_INIT_CLIP = 10.0   # PACT Sec. 3: alpha initialised to 10 for activations


def _std(x: Array) -> Array:
  """Unbiased standard deviation over all elements (torch's ``std`` in the reference code)."""
  return jnp.std(x.astype(jnp.float32), ddof=1)


@dataclasses.dataclass(frozen=True)
class ForwardMethod:
  """Everything the layers and configs need to know about one forward method.

  Attributes:
    name: the name configs and per-layer rules use (``quant.weight_method``, ``method``).
    apply: ``apply(x, params, *, bits, weight, discretizer, hook) -> output``, ``params`` a dict
      from suffix to value.
    params: learned parameters, suffix -> data-driven :data:`Initializer`; the layers store them
      in ``params`` as ``q_<w|a>_<suffix>`` (:func:`ewgs_jax.names.quantizer_param`).
    output_scale: whether the layer multiplies its output by a learned scale ``alpha`` (EWGS Sec. 3.1).
  """
  name: str
  apply: Callable[..., Array]
  params: Mapping[str, Initializer] = dataclasses.field(default_factory=dict)
  output_scale: bool = False


#: The registered forward methods by name. Add one with :func:`register_method`.
METHODS: dict[str, ForwardMethod] = {}
NONE = "none"   # the method name that leaves a tensor full precision


def register_method(method: ForwardMethod, *, replace: bool = False) -> ForwardMethod:
  """Makes a forward method available to layers and configs.

  Args:
    method: the method.
    replace: allow replacing a registered method of the same name.

  Returns:
    ``method``.
  """
  if method.name == NONE or (method.name in METHODS and not replace):
    raise ValueError(f"forward method {method.name!r} is already registered")
  METHODS[method.name] = method
  return method


def get_method(name: str) -> ForwardMethod:
  """Looks a forward method up by name.

  Args:
    name: a registered name (``interval``, ``pact``, ``lsq``, ``dorefa``, ...).

  Returns:
    The :class:`ForwardMethod`.

  Raises:
    ValueError: listing the valid names.
  """
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(f"unknown quantizer method {name!r}; valid choices: {method_names()}") from None


def method_names() -> list[str]:
  """The valid method names of a quantizer setting: every registered method, then ``"none"``.

  Returns:
    The names.
  """
  return [*METHODS, NONE]


def per_channel(init: Initializer, axis: int = -1) -> Initializer:
  """A per-tensor data-driven initialiser applied to each channel of ``axis`` separately.

  EWGS Sec. 4.1 initialises the weight bounds from the whole kernel (``-+3 sigma(w)``); per output
  channel (the kernel's last axis, HWIO or ``(in, out)``) it is the same statistic over each
  channel's weights: ``l_c = -3 sigma(w_c)``, ``u_c = 3 sigma(w_c)``. The result has one value per
  channel, which every method here broadcasts against the kernel (their parameters may be arrays),
  and whose gradient comes back per channel.

  Args:
    init: ``init(x, bits, weight) -> scalar``, e.g. ``get_method("interval").params["upper"]``.
    axis: the channel axis of ``x``.

  Returns:
    ``init_c(x, bits, weight) -> (x.shape[axis],)``.
  """
  def init_per_channel(x, bits, weight):
    return jax.vmap(lambda channel: init(channel, bits, weight), in_axes=axis)(x)

  return init_per_channel


def _lsq_init(x, bits, weight):
  _, q_pos = lsq_range(bits, signed=weight)
  return 2.0 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / math.sqrt(max(q_pos, 1))


# Initialisation: EWGS Sec. 4.1 (weights -+3 sigma(w); activations up to 3 sigma(x) / sqrt(1 - 2/pi)),
# with the activation lower bound min(x) as the official ``QConv.initialize`` sets it (the paper says 0;
# the same for inputs after a ReLU; README "Deviations"); PACT Sec. 3 (activation clip 10; weights, our
# choice, 3 sigma(w)); LSQ Sec. 2.1 (2 E|x| / sqrt(Q_P)).
register_method(ForwardMethod(
    "interval",
    lambda x, p, *, bits, weight, **kw: interval(x, p["lower"], p["upper"], bits=bits, weight=weight, **kw),
    params={"lower": lambda x, bits, weight: -3.0 * _std(x) if weight else jnp.min(x).astype(jnp.float32),
            "upper": lambda x, bits, weight: 3.0 * _std(x) / (1.0 if weight else math.sqrt(1.0 - 2.0 / math.pi))},
    output_scale=True))
register_method(ForwardMethod(
    "pact",
    lambda x, p, *, bits, weight, **kw: pact(x, p["clip"], bits=bits, signed=weight, **kw),
    params={"clip": lambda x, bits, weight: 3.0 * _std(x) if weight else jnp.float32(PACT_INIT_CLIP)}))
register_method(ForwardMethod(
    "lsq",
    lambda x, p, *, bits, weight, **kw: lsq(x, p["step"], bits=bits, signed=weight, **kw),
    params={"step": _lsq_init}))
register_method(ForwardMethod(
    "dorefa", lambda x, p, *, bits, weight, **kw: dorefa(x, bits=bits, weight=weight, **kw)))
