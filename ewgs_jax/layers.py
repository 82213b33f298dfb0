"""Flax quantized layers: ``QuantConv`` and ``QuantDense`` with data-driven initialisation.

Each layer has an activation quantizer on its input and a weight quantizer on its kernel, each
with its own forward method (``interval``, ``pact``, ``lsq``, ``dorefa`` or ``none``), backward rule
(``ste``, ``ewgs``, ``pege``) and bit width, set by a :class:`QuantConfig` that regular-expression
rules can override per layer (so mixed precision needs no model edits).

State, as ``DESIGN.md`` ("State in a model") fixes it:

* learned quantizer parameters live in ``params`` under names starting with ``q_``
  (``q_w_lower``, ``q_w_upper``, ``q_a_lower``, ``q_a_upper``, ``q_alpha``, ``q_w_clip``,
  ``q_a_clip``, ``q_w_step``, ``q_a_step``), see :func:`is_quantizer_param`;
* EWGS delta lives in the ``quant_state`` collection (``delta_w``, ``delta_a``; 0 until the first
  Hessian refresh, as in the reference code);
* PEGE's mu_T, replacement rate p_T and replacement key arrive per call in a :class:`QuantContext`;
* each quantizer exposes its discrete output ``x_q`` (the [0, 1] value before the weight map)
  through a zero probe, ``perturbations/<layer>/w_q`` and ``a_q``, for :mod:`ewgs_jax.hessian`.

Initialisation is data-driven (EWGS Sec. 4.1, mirroring the reference ``QConv.initialize``): the
parameter initialisers read the layer's actual input, so ``model.init`` on a real batch gives
weight bounds ``-+3 sigma(w)``, activation bounds ``[min(x), 3 sigma(x) / sqrt(1 - 2/pi)]`` (unbiased
sigma, as torch's ``std``) and ``alpha = E|conv(x, w)| / E|conv(Q(x), Q(w))|``; layers run in order,
so each sees the already-quantized outputs of the layers before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ewgs_jax import estimators, ops, quantizers, replacement

Array = jax.Array

METHODS = ("interval", "pact", "lsq", "dorefa", "none")
OVERRIDE_KEYS = ("enabled", "bits", "weight_bits", "act_bits", "method", "weight_method", "act_method",
                 "backward")
PACT_INIT_CLIP = 10.0   # PACT Sec. 3: alpha initialised to 10 for activations


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """One quantizer's setting: forward method, backward rule, bit width."""
  method: str = "interval"
  backward: str = "ste"
  bits: int = 2

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown quantizer method {self.method!r}; valid choices: {list(METHODS)}")
    estimators.get_estimator(self.backward)
    estimators.check_bits(self.bits)

  @property
  def active(self) -> bool:
    return self.method != "none"


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """The resolved setting of one layer."""
  weight: QuantizerSpec
  act: QuantizerSpec

  @property
  def active(self) -> bool:
    return self.weight.active or self.act.active


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Network-wide quantization setting plus per-layer rules.

  ``rules`` is a sequence of ``(regex, overrides)``; a rule applies to every quantizable layer whose
  module path (``"stage1_block0/conv1"``) matches ``re.search(regex, path)``, later rules winning.
  ``overrides`` keys: ``enabled`` (False = full precision), ``bits``, ``weight_bits``, ``act_bits``,
  ``method``, ``weight_method``, ``act_method``, ``backward``. First and last layers of a model stay
  full precision unless ``quantize_first_last``. ``enabled=False`` makes every layer full precision
  (parameter names unchanged).
  """
  weight: QuantizerSpec = QuantizerSpec()
  act: QuantizerSpec = QuantizerSpec()
  quantize_first_last: bool = False
  rules: tuple = ()
  replacement_granularity: str = replacement.DEFAULT_GRANULARITY
  enabled: bool = True
  pege_mu_scale: str = "gradient"   # estimators.PEGE_MU_SCALES: 'gradient' (mu in 3 sigma(g) units) | 'absolute'

  def __post_init__(self):
    frozen = []
    for pattern, overrides in self.rules:
      re.compile(pattern)
      overrides = dict(overrides)
      unknown = set(overrides) - set(OVERRIDE_KEYS)
      if unknown:
        raise ValueError(f"rule {pattern!r} has unknown keys {sorted(unknown)}; valid: {list(OVERRIDE_KEYS)}")
      frozen.append((pattern, tuple(sorted(overrides.items()))))
    object.__setattr__(self, "rules", tuple(frozen))
    replacement.check_granularity(self.replacement_granularity)
    if self.pege_mu_scale not in estimators.PEGE_MU_SCALES:
      raise ValueError(f"unknown pege_mu_scale {self.pege_mu_scale!r}; valid: {sorted(estimators.PEGE_MU_SCALES)}")
    for _, overrides in self.rules:  # validates the override values now, not at the first call
      _apply_overrides(self.weight, self.act, dict(overrides))

  def resolve(self, path: str) -> LayerQuant:
    """The setting of the layer at ``path`` after every matching rule."""
    weight, act = self.weight, self.act
    if not self.enabled:
      return LayerQuant(dataclasses.replace(weight, method="none"), dataclasses.replace(act, method="none"))
    for pattern, overrides in self.rules:
      if re.search(pattern, path):
        weight, act = _apply_overrides(weight, act, dict(overrides))
    return LayerQuant(weight, act)


def _apply_overrides(weight: QuantizerSpec, act: QuantizerSpec, o: dict) -> tuple[QuantizerSpec, QuantizerSpec]:
  w, a = {}, {}
  if "bits" in o:
    w["bits"] = a["bits"] = o["bits"]
  if "method" in o:
    w["method"] = a["method"] = o["method"]
  if "backward" in o:
    w["backward"] = a["backward"] = o["backward"]
  for key, value in o.items():
    if key.startswith("weight_"):
      w[key[len("weight_"):]] = value
    elif key.startswith("act_"):
      a[key[len("act_"):]] = value
  if o.get("enabled") is False:
    w["method"] = a["method"] = "none"
  return dataclasses.replace(weight, **w), dataclasses.replace(act, **a)


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


def first_last_quant(quant: QuantConfig | None) -> QuantConfig | None:
  """The setting of a model's first and last layers: full precision unless ``quantize_first_last``."""
  return quant if quant is not None and quant.quantize_first_last else None


def is_quantizer_param(path: Sequence[str]) -> bool:
  """True for learned quantizer parameters (their leaf name starts with ``q_``)."""
  return bool(path) and str(path[-1]).startswith("q_")


def _std(x: Array) -> Array:
  """Unbiased standard deviation over all elements (torch's ``std`` in the reference code)."""
  return jnp.std(x.astype(jnp.float32), ddof=1)


class _Quantized(nn.Module):
  """Shared quantizer logic of :class:`QuantConv` and :class:`QuantDense`."""

  def _setting(self) -> LayerQuant | None:
    if self.quant is None:
      return None
    setting = self.quant.resolve("/".join(self.scope.path))
    return setting if setting.active else None

  def _discretizer(self, spec: QuantizerSpec, kind: str, ctx: QuantContext | None):
    name = f"delta_{kind}"
    if self.is_mutable_collection("quant_state") or self.has_variable("quant_state", name):
      delta = self.variable("quant_state", name, lambda: jnp.zeros((), jnp.float32)).value
    else:   # applied without its quant_state (e.g. evaluation of bare params): delta = 0
      delta = jnp.zeros((), jnp.float32)
    if spec.backward == "ewgs":
      return functools.partial(estimators.ewgs, delta=delta)
    if spec.backward == "pege":
      pege = estimators.PEGE_MU_SCALES[self.quant.pege_mu_scale]
      return functools.partial(pege, mu=0.0 if ctx is None else ctx.mu)
    return estimators.ste

  def _hook(self, kind: str, ctx: QuantContext | None):
    """Adds the Hessian probe on x_q, then PEGE replacement (PEGE Eq. 3) when training."""
    granularity = self.quant.replacement_granularity

    def hook(x_c, x_q):
      x_q = self.perturb(f"{kind}_q", x_q)
      if ctx is not None and ctx.key is not None:
        name = "/".join(self.scope.path) + "/" + kind
        key = replacement.quantizer_key(ctx.key, name, granularity)
        x_q = replacement.replace(key, x_c, x_q, ctx.rate, granularity=granularity)
      return x_q

    return hook

  def _quantize(self, x: Array, spec: QuantizerSpec, kind: str, ctx: QuantContext | None) -> Array:
    """Quantizes ``x`` (kind ``"w"`` or ``"a"``) with the initialisation of its method's paper."""
    if not spec.active:
      return x
    weight = kind == "w"
    common = dict(bits=spec.bits, discretizer=self._discretizer(spec, kind, ctx), hook=self._hook(kind, ctx))
    if spec.method == "interval":
      if weight:
        lower = self.param("q_w_lower", lambda _: -3.0 * _std(x))
        upper = self.param("q_w_upper", lambda _: 3.0 * _std(x))
      else:
        lower = self.param("q_a_lower", lambda _: jnp.min(x).astype(jnp.float32))
        upper = self.param("q_a_upper", lambda _: 3.0 * _std(x) / math.sqrt(1.0 - 2.0 / math.pi))
      return quantizers.interval(x, lower, upper, weight=weight, **common)
    if spec.method == "pact":
      init = (lambda _: 3.0 * _std(x)) if weight else (lambda _: jnp.float32(PACT_INIT_CLIP))
      return quantizers.pact(x, self.param(f"q_{kind}_clip", init), signed=weight, **common)
    if spec.method == "lsq":
      _, q_pos = quantizers.lsq_range(spec.bits, signed=weight)
      init = lambda _: 2.0 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / math.sqrt(max(q_pos, 1))
      return quantizers.lsq(x, self.param(f"q_{kind}_step", init), signed=weight, **common)
    return quantizers.dorefa(x, weight=weight, **common)

  def _quantized_op(self, x, kernel, op: Callable[[Array, Array], Array], ctx) -> Array:
    """``|alpha| * op(Q_A(x), Q_W(kernel))`` (EWGS Sec. 3.1); alpha only for interval quantizers."""
    setting = self._setting()
    if setting is None:
      return op(x, kernel)
    x_q = self._quantize(x, setting.act, "a", ctx)
    w_q = self._quantize(kernel, setting.weight, "w", ctx)
    y = op(x_q, w_q)
    if "interval" in (setting.weight.method, setting.act.method):
      def alpha_init(_):
        ratio = jnp.mean(jnp.abs(op(x, kernel))) / jnp.mean(jnp.abs(y))
        return jnp.where(jnp.isfinite(ratio) & (ratio > 0), ratio, 1.0).astype(jnp.float32)
      y = y * jnp.abs(self.param("q_alpha", alpha_init)).astype(y.dtype)
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

  @nn.compact
  def __call__(self, x: Array, ctx: QuantContext | None = None) -> Array:
    kernel_shape = (*self.kernel_size, x.shape[-1] // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = self.padding if isinstance(self.padding, str) else [tuple(p) for p in self.padding]

    def conv(inputs, weights):
      return ops.conv_general_dilated(
          inputs, weights, tuple(self.strides), padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.feature_group_count)

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


# --- model-level helpers ------------------------------------------------------------------------


def _is_quantizable(module, method_name) -> bool:
  return isinstance(module, _Quantized) and module.quant is not None and method_name == "__call__"


def quantizable_layers(model: nn.Module, images: Array) -> list[str]:
  """Module paths of the layers that take a quantization setting (traced abstractly, no compute)."""
  _, state = jax.eval_shape(functools.partial(
      model.apply, train=False, capture_intermediates=_is_quantizable, mutable=["intermediates"]),
      jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images), images)
  paths = []
  jax.tree_util.tree_map_with_path(
      lambda path, _: paths.append("/".join(str(getattr(p, "key", p)) for p in path[:-2])),
      state["intermediates"])
  return sorted(set(paths))


def check_rules(model: nn.Module, images: Array) -> None:
  """Raises ``ValueError`` naming every rule of ``model.quant`` that matches no quantizable layer."""
  quant = getattr(model, "quant", None)
  if quant is None or not quant.rules:
    return
  paths = quantizable_layers(model, images)
  unmatched = [pattern for pattern, _ in quant.rules if not any(re.search(pattern, p) for p in paths)]
  if unmatched:
    raise ValueError(f"quantization rules {unmatched} match no quantizable layer; layers: {paths}")


def init_variables(model: nn.Module, rng: Array, images: Array, ctx: QuantContext | None = None) -> dict:
  """Initialises ``model`` on a real batch (data-driven quantizer initialisation, EWGS Sec. 4.1).

  BatchNorm uses the batch's statistics during this pass (as the reference's train-mode
  initialisation); running statistics keep their initial values. Probes are dropped. ``ctx``
  (default: none, i.e. mu = 0 and no replacement) is passed to the model's forward.
  """
  variables = model.init({"params": rng}, images, train=True, ctx=ctx)
  return {k: v for k, v in variables.items() if k != "perturbations"}


def _flat(tree) -> dict[str, tuple]:
  flat = {}
  jax.tree_util.tree_map_with_path(
      lambda path, leaf: flat.__setitem__("/".join(str(getattr(p, "key", p)) for p in path),
                                          tuple(getattr(leaf, "shape", ()))),
      tree)
  return flat


def warm_start(model: nn.Module, fp_variables: dict, rng: Array, images: Array) -> dict:
  """Quantized twin of a trained full-precision model: copy its weights, then initialise from data.

  ``fp_variables`` holds ``params`` (and ``batch_stats``) of the same architecture without
  quantization. Every network weight and BatchNorm statistic is copied by name; a missing, extra
  or differently shaped key raises ``ValueError`` naming it. The quantizer parameters are then
  created by their data-driven initialisers (EWGS Sec. 4.1) with the copied kernels in place. The
  full-precision running statistics are kept as they are (the reference code lets this one
  train-mode batch nudge them; we do not, so that the copy is exact).
  """
  expected = jax.eval_shape(functools.partial(model.init, train=True), rng, images)
  problems = []
  for collection in ("params", "batch_stats"):
    want = {k: v for k, v in _flat(expected.get(collection, {})).items()
            if not is_quantizer_param(k.split("/"))}
    have = _flat(fp_variables.get(collection, {}))
    problems += [f"missing {collection}/{k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {collection}/{k}" for k in sorted(set(have) - set(want))]
    problems += [f"shape of {collection}/{k}: checkpoint {have[k]} vs model {want[k]}"
                 for k in sorted(set(want) & set(have)) if have[k] != want[k]]
  if problems:
    raise ValueError("full-precision variables do not match the model: " + "; ".join(problems))
  fp = {k: fp_variables[k] for k in ("params", "batch_stats") if k in fp_variables}
  _, variables = model.apply(fp, images, train=True, rngs={"params": rng},
                             mutable=["params", "batch_stats", "quant_state", "perturbations"])
  variables = {k: v for k, v in variables.items() if k != "perturbations"}
  if "batch_stats" in fp:
    variables["batch_stats"] = fp["batch_stats"]
  return variables
