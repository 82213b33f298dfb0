"""A whole quantized model as an integer-arithmetic forward: :func:`integer_model`.

How the layer structure is taken from the model, not re-entered: the model's own ``apply`` runs twice
under :func:`flax.linen.intercept_methods`.

1. *Capture* (an abstract trace, no compute): every quantized layer's ``__call__`` is seen with its
   module path, its resolved setting, its variables and its input. The layer's linear op is read off
   the layer itself: a copy of it with ``quant=None`` (which computes exactly what ``nn.Conv`` /
   ``nn.Dense`` does, with the layer's own strides, padding, groups and dilation) is traced with
   :func:`jax.make_jaxpr`, and the one ``conv_general_dilated`` or ``dot_general`` in it gives the
   canonical arguments (explicit padding pairs, dimension numbers). A ``BatchNorm`` whose input is a
   quantized layer's output, in inference mode over the last axis, is folded into that layer.
2. *Forward* (traced for :mod:`jax.export`): the same ``apply``, where each quantized layer is
   replaced by its integer form (:mod:`ewgs_jax.export.integer`: activation codes, unpacked weight
   levels, an int32-accumulating dot, ``y = M acc + B``) and each folded BatchNorm returns
   ``M' acc + B'`` from the same accumulator. Everything else (full-precision first and last
   layers, residual additions, option-A shortcuts, pooling, ReLU6, an unfolded BatchNorm) is the
   model's own code, run as the model has it, on float32 between layers.

The forward is exported with :func:`jax.export.export` for CPU, CUDA, ROCm and TPU with a symbolic
batch size; its arguments are the packed weight codes, the requantization scales and the remaining
full-precision variables, so the file holds each weight once, packed (:mod:`ewgs_jax.export.runtime`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from ewgs_jax import layers, names
from ewgs_jax.export import integer, packing, runtime

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
LINEAR_PRIMITIVES = ("conv_general_dilated", "dot_general")
NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))   # ConvDimensionNumbers of NHWC / HWIO / NHWC
QUANTIZED = (layers.QuantConv, layers.QuantDense)
UNSUPPORTED = (layers.QuantDenseGeneral, layers.QuantEinsum)


@dataclasses.dataclass
class _Layer:
  """What the capture pass learns about one quantized layer call."""
  path: str
  op: str                          # "conv" | "dot"
  op_params: dict                  # strides, padding, feature_group_count | dimension_numbers
  dtype: Any                       # the layer's computation dtype
  setting: Any                     # its resolved LayerQuant
  variables: dict                  # its params (host numpy)
  folded_bn: str | None = None     # the path of the BatchNorm folded into it
  bn: dict | None = None           # that BatchNorm's (mul, shift)


def _path(module: nn.Module) -> str:
  assert module.scope is not None, "captured layers are bound"
  return "/".join(module.scope.path)


def _host(tree) -> Any:
  return jax.tree.map(np.asarray, tree)


def _sub_jaxprs(value):
  for item in value if isinstance(value, (list, tuple)) else (value,):
    if isinstance(item, jax.extend.core.ClosedJaxpr):
      yield item.jaxpr
    elif isinstance(item, jax.extend.core.Jaxpr):
      yield item


def _linear_eqns(jaxpr):
  """Every ``conv_general_dilated`` / ``dot_general`` of ``jaxpr``, nested jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in LINEAR_PRIMITIVES:
      yield eqn
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        yield from _linear_eqns(sub)


def _linear_op(module: nn.Module, x, kernel) -> tuple[str, dict]:
  """The layer's convolution or matmul, read from a trace of the layer without its quantizers.

  Why a trace: the layer canonicalises its own arguments (int or sequence strides, string or pair
  padding, groups); its ``quant=None`` twin computes exactly ``nn.Conv`` / ``nn.Dense``, so the one
  linear primitive it emits carries the arguments as XLA sees them.
  """
  plain = module.clone(parent=None, name=None, quant=None, use_bias=False)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  closed = jax.make_jaxpr(lambda x, k: plain.apply({names.PARAMS: {"kernel": k}}, x))(spec(x), spec(kernel))
  eqns = list(_linear_eqns(closed.jaxpr))
  path = _path(module)
  if len(eqns) != 1:
    raise NotImplementedError(f"layer {path!r}: expected one convolution or matmul, found "
                              f"{[e.primitive.name for e in eqns]}")
  eqn = eqns[0]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  if tuple(lhs) != tuple(x.shape) or tuple(rhs) != tuple(kernel.shape):
    raise NotImplementedError(f"layer {path!r}: its input {tuple(x.shape)} is reshaped before the op ({tuple(lhs)}); "
                              "only batched NHWC convolutions and dense layers export")
  p = eqn.params
  if eqn.primitive.name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if lb or rb or tuple(rc) != tuple(range(len(rhs) - 1)):
      raise NotImplementedError(f"layer {path!r}: dot_general {p['dimension_numbers']} does not contract all but "
                                "the kernel's last axis")
    return "dot", {"dimension_numbers": [[list(lc), list(rc)], [list(lb), list(rb)]]}
  dn = p["dimension_numbers"]
  unsupported = {
      "layout (NHWC / HWIO 2-D only)": (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != NHWC_SPECS,
      "input dilation": any(d != 1 for d in p["lhs_dilation"]),
      "kernel dilation": any(d != 1 for d in p["rhs_dilation"]),
      "batch_group_count": p["batch_group_count"] != 1,
  }
  bad = [name for name, found in unsupported.items() if found]
  if bad:
    raise NotImplementedError(f"layer {path!r}: the integer convolution does not support {', '.join(bad)}")
  return "conv", {"strides": [int(s) for s in p["window_strides"]],
                  "padding": [[int(lo), int(hi)] for lo, hi in p["padding"]],
                  "feature_group_count": int(p["feature_group_count"])}


def _foldable(module: nn.BatchNorm, args, kwargs) -> bool:
  """Whether a BatchNorm call is an inference-mode affine map over the last axis (so it folds)."""
  given = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  running = module.use_running_average if given is None else given
  x = args[0]
  return bool(running) and kwargs.get("mask") is None and module.axis in (-1, x.ndim - 1)


def _bn_affine(module: nn.BatchNorm) -> dict:
  """The BatchNorm as ``y = mul x + shift`` per channel, in float64 (Flax computes
  ``(x - mean) rsqrt(var + eps) scale + bias``)."""
  params, stats = module.variables.get(names.PARAMS, {}), module.variables[names.BATCH_STATS]
  mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
  mul = 1.0 / np.sqrt(var + module.epsilon)
  if module.use_scale:
    mul = mul * np.asarray(params["scale"], np.float64)
  shift = -mean * mul
  if module.use_bias:
    shift = shift + np.asarray(params["bias"], np.float64)
  return {"mul": mul, "shift": shift}


def _capture(model: nn.Module, variables: dict, images, apply_kwargs: Mapping[str, Any]) -> dict[str, _Layer]:
  """Pass 1: the quantized layers and the BatchNorms folded into them, in call order."""
  found: dict[str, _Layer] = {}
  outputs: list[tuple[Any, str]] = []   # (a quantized layer's output object, its path); kept alive

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, UNSUPPORTED) and module.quant is not None:
      raise NotImplementedError(f"layer {_path(module)!r} is a {type(module).__name__}, which the integer model does "
                                "not export yet (QuantConv and QuantDense do)")
    if isinstance(module, QUANTIZED) and module.quant is not None:
      path = _path(module)
      setting = module.quant.resolve(path)
      if setting.active:
        x, params = args[0], module.variables[names.PARAMS]
        if path in found:
          raise NotImplementedError(f"layer {path!r} is called more than once; shared layers do not export")
        op, op_params = _linear_op(module, x.astype(module.dtype or x.dtype), params["kernel"])
        params = dict(params)
        if getattr(module, "mask", None) is not None:   # the layer quantizes kernel * mask
          params["kernel"] = params["kernel"] * module.mask
        found[path] = _Layer(path, op, op_params, module.dtype or x.dtype, setting, _host(params))
        y = next_fun(*args, **kwargs)
        outputs.append((y, path))
        return y
    if isinstance(module, nn.BatchNorm) and _foldable(module, args, kwargs):
      source = next((p for y, p in outputs if y is args[0]), None)
      if source is not None and found[source].folded_bn is None:
        found[source].folded_bn, found[source].bn = _path(module), _bn_affine(module)
    return next_fun(*args, **kwargs)

  def run(images):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, images, **apply_kwargs)

  jax.eval_shape(run, images)
  return found


def _quantizer_params(params: Mapping[str, Any], kind: str) -> dict[str, Any]:
  """A quantizer's learned parameters by suffix (``q_w_lower`` -> ``lower``)."""
  head = names.quantizer_param(kind, "")
  return {name[len(head):]: value for name, value in params.items() if name.startswith(head)}


def _quantities(captured: Mapping[str, _Layer]) -> dict[str, dict]:
  """Every layer's weight codes and output maps, computed in one jitted call (one compile, not one per op)."""
  def compute(all_params):
    out = {}
    for path, layer in captured.items():
      weight, act, params = layer.setting.weight, layer.setting.act, all_params[path]
      out[path] = {}
      if weight.active:
        out[path]["w"] = integer.weight_quantities(weight.method, params["kernel"], _quantizer_params(params, "w"),
                                                   weight.bits)
      if act.active:
        out[path]["a"] = integer.activation_quantities(act.method, _quantizer_params(params, "a"), act.bits)
    return out

  return jax.device_get(jax.jit(compute)({path: layer.variables for path, layer in captured.items()}))


def _prepare(layer: _Layer, quantities: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
  """A captured layer's arrays (packed codes, requantization scales) and metadata."""
  setting, params = layer.setting, layer.variables
  arrays: dict[str, np.ndarray] = {}
  meta: dict[str, Any] = {"op": layer.op, "op_params": layer.op_params, "dtype": jnp.dtype(layer.dtype).name,
                          "folded_bn": layer.folded_bn}
  # |alpha|: a scalar, or one per output channel with per-channel weights
  alpha: np.ndarray = (np.abs(np.asarray(params[names.OUTPUT_SCALE], np.float64)) if names.OUTPUT_SCALE in params
                       else np.asarray(1.0, np.float64))
  scale: np.ndarray = alpha
  kernel = params["kernel"]
  if setting.weight.active:
    w = integer.weight_levels(setting.weight.method, kernel, _quantizer_params(params, "w"), setting.weight.bits,
                              quantities=quantities["w"])
    arrays["weight_codes"] = packing.pack(w.codes, w.bits)
    scale = scale * np.asarray(w.scale, np.float64)
    meta["weight"] = {"method": setting.weight.method, "bits": w.bits, "shape": list(kernel.shape), "step": w.step,
                      "offset": w.offset, "slot_bits": packing.slot_bits(w.bits),
                      "per_channel": setting.weight.per_channel}   # its ranges (the scale: arrays["scale"])
    levels = w.levels()
  else:
    arrays["kernel"] = np.asarray(kernel, np.float32)
    meta["weight"] = None
  if setting.act.active:
    act_params = _quantizer_params(params, "a")
    scale = scale * integer.activation_scale(setting.act.method, act_params, setting.act.bits,
                                             quantities=quantities["a"])
    arrays.update({f"act_{k}": np.asarray(v, np.float32) for k, v in act_params.items()})
    meta["act"] = {"method": setting.act.method, "bits": setting.act.bits, "params": sorted(act_params)}
    if setting.weight.active:
      contraction = integer.contraction_size(kernel.shape, layer.op, layer.op_params)
      bound = integer.accumulator_bound(contraction, setting.act.bits, levels)
      if bound > integer.INT32_LIMIT:
        raise NotImplementedError(f"layer {layer.path!r}: int32 accumulation could overflow ({contraction} products "
                                  f"of up to {bound // contraction}); use fewer bits or a narrower layer")
      meta["accumulator_bound"] = bound
  else:
    meta["act"] = None
  # the layer's output is |alpha| (op + bias) (EWGS Sec. 3.1, the bias scaled with the product as in the
  # official code): the bias takes alpha too
  bias = alpha * np.asarray(params["bias"], np.float64) if "bias" in params else np.zeros((), np.float64)
  arrays["scale"], arrays["bias"] = np.asarray(scale, np.float32), np.asarray(bias, np.float32)
  if layer.bn is not None:   # BatchNorm folded into the requantization: y = mul (scale acc + bias) + shift
    arrays["folded_scale"] = np.asarray(scale * layer.bn["mul"], np.float32)
    arrays["folded_bias"] = np.asarray(bias * layer.bn["mul"] + layer.bn["shift"], np.float32)
  return arrays, meta


def _dimension_numbers(op_params) -> tuple:
  return tuple(tuple(tuple(d) for d in pair) for pair in op_params["dimension_numbers"])


def integer_layer(meta: Mapping[str, Any], a: Mapping[str, jax.Array], x) -> tuple[jax.Array, jax.Array]:
  """One exported layer on its float input: ``(acc, y)`` with ``y = scale acc + bias``.

  ``acc`` is exact int32 when both quantizers are active; with a full-precision side (weight-only
  layers such as W1A32, or full-precision weights) the op runs in float32 on the integer-valued side.

  Args:
    meta: the layer's metadata (``IntegerModel.metadata["layers"][path]``).
    a: the layer's arrays, without the ``<path>/`` prefix.
    x: its float input.

  Returns:
    ``(acc, y)``: the accumulator and the layer's output in its dtype.
  """
  dtype = jnp.dtype(meta["dtype"])
  x = x.astype(dtype)
  if meta["weight"] is not None:
    w = meta["weight"]
    rhs = w["step"] * packing.unpack(a["weight_codes"], w["bits"], tuple(w["shape"])) + w["offset"]
  else:
    rhs = a["kernel"]
  if meta["act"] is not None:
    act = meta["act"]
    lhs = integer.codes(act["method"], x, {k: a[f"act_{k}"] for k in act["params"]}, act["bits"], weight=False)
  else:
    lhs = x
  exact = meta["weight"] is not None and meta["act"] is not None
  p = meta["op_params"]
  if exact:
    w = meta["weight"]
    operands = integer.operand_dtype(2 ** meta["act"]["bits"] - 1, abs(w["offset"]),
                                     abs(w["step"] * (2 ** w["bits"] - 1) + w["offset"]))
    if meta["op"] == "conv":
      acc = integer.integer_conv(lhs, rhs, p["strides"], [tuple(q) for q in p["padding"]], p["feature_group_count"],
                                 dtype=operands)
    else:
      acc = integer.integer_dot(lhs, rhs, _dimension_numbers(p), dtype=operands)
  elif meta["op"] == "conv":
    acc = lax.conv_general_dilated(lhs.astype(jnp.float32), rhs.astype(jnp.float32), p["strides"],
                                   [tuple(q) for q in p["padding"]], dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=p["feature_group_count"], precision="highest")
  else:
    acc = lax.dot_general(lhs.astype(jnp.float32), rhs.astype(jnp.float32), _dimension_numbers(p),
                          precision="highest")
  y = acc.astype(jnp.float32) * a["scale"] + a["bias"]
  return acc, y.astype(dtype)


def folded_output(a: Mapping[str, jax.Array], acc, dtype=jnp.float32) -> jax.Array:
  """The output of the BatchNorm folded into a layer, from the layer's accumulator: ``M' acc + B'``.

  Args:
    a: the layer's arrays, without the ``<path>/`` prefix (``folded_scale``, ``folded_bias``).
    acc: the layer's accumulator (:func:`integer_layer`).
    dtype: the BatchNorm's output dtype.

  Returns:
    ``folded_scale * acc + folded_bias``.
  """
  return (acc.astype(jnp.float32) * a["folded_scale"] + a["folded_bias"]).astype(dtype)


def forward_function(model: nn.Module, layers_meta: Mapping[str, dict], apply_kwargs: Mapping[str, Any] | None = None):
  """``forward(arrays, images) -> logits``: the model's ``apply`` with its quantized layers in integer form.

  What :func:`integer_model` exports; un-exported, it can be traced with further interceptors (e.g.
  to look at each layer's input).

  Args:
    model: the quantized model.
    layers_meta: ``IntegerModel.metadata["layers"]``.
    apply_kwargs: keyword arguments of ``model.apply`` (default ``{"train": False}``).

  Returns:
    The forward function of ``(IntegerModel.arrays, images)``.
  """
  apply_kwargs = {"train": False} if apply_kwargs is None else apply_kwargs
  folded = {meta["folded_bn"]: path for path, meta in layers_meta.items() if meta["folded_bn"]}

  def forward(arrays, images):
    per_layer = {path: {k[len(path) + 1:]: v for k, v in arrays.items() if k.startswith(path + "/")}
                 for path in layers_meta}
    fp = traverse_util.unflatten_dict({tuple(k.split("/")[1:]): v for k, v in arrays.items()
                                       if k.startswith(runtime.FP_PREFIX)})
    results: dict[str, tuple] = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = _path(module)
      if isinstance(module, QUANTIZED) and path in layers_meta:
        acc, y = integer_layer(layers_meta[path], per_layer[path], args[0])
        results[path] = (acc, y)
        return y
      if isinstance(module, nn.BatchNorm) and path in folded:
        acc, y = results.get(folded[path], (None, None))
        if y is None or args[0] is not y:
          raise NotImplementedError(f"BatchNorm {path!r} was folded into {folded[path]!r} but is called on "
                                    "another input")
        return folded_output(per_layer[folded[path]], acc, module.dtype or jnp.float32)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return model.apply(fp, images, **apply_kwargs)

  return forward


def integer_model(run_or_variables, config=None, *, model: nn.Module | None = None, image_shape=None,
                  apply_kwargs: Mapping[str, Any] | None = None, platforms=PLATFORMS) -> runtime.IntegerModel:
  """A quantized model as an integer-arithmetic forward, exported for every backend.

  Weight codes are packed (:mod:`ewgs_jax.export.packing`), BatchNorm is folded into the
  requantization scales, products accumulate in int32, and the layers' strides, padding and groups
  come from the model itself (module docstring). Every forward method exports (interval, PACT, LSQ,
  DoReFa and any registered one whose output is affine in its codes).

  Args:
    run_or_variables: a finished training workdir (its ``config.json`` and latest checkpoint), a
      :class:`ewgs_jax.export.workdir.Run`, or the model's variables (``{"params", "batch_stats"}``).
    config: the run's config (``ml_collections.ConfigDict`` or dict) to build the model from
      (:func:`ewgs_jax.training.build_model`) and to read the dataset's shape from; read from the
      workdir when ``None``. Not needed with ``model`` and ``image_shape``.
    model: the quantized Flax model itself, instead of building it from ``config``.
    image_shape: one input's shape ``(H, W, C)``; from the config's dataset when ``None``.
    apply_kwargs: keyword arguments of ``model.apply`` for inference (default ``{"train": False}``,
      the model zoo's).
    platforms: the backends the forward is exported for.

  Returns:
    The :class:`ewgs_jax.export.runtime.IntegerModel` (call it on a float NHWC batch; ``save``).
  """
  from ewgs_jax.export import workdir as workdir_lib
  apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
  source: dict[str, Any] = {}
  run = run_or_variables
  if isinstance(run, (str, os.PathLike)):
    run = workdir_lib.load_run(os.fspath(run), config)
  if isinstance(run, workdir_lib.Run):
    variables, config = run.variables, run.config
    source = {"workdir": os.path.abspath(run.workdir), "step": run.step}
  else:
    variables = run_or_variables
  variables = {k: v for k, v in _host(dict(variables)).items() if k in (names.PARAMS, names.BATCH_STATS)}
  info = None
  if model is None or image_shape is None:
    if config is None:
      raise ValueError("integer_model needs the run's config (or model= and image_shape=) with bare variables")
    from ewgs_jax import data
    info = data.get_dataset_info(config["dataset"], data_dir=config.get("data_dir"))
  if model is None:
    from ewgs_jax import training
    assert info is not None
    model = training.build_model(_config_dict(config), info.num_classes)
  if image_shape is None:
    assert info is not None
    image_shape = info.image_shape
  image_shape = tuple(image_shape)
  return _export(model, variables, image_shape, apply_kwargs, platforms, source=source, info=info, config=config)


def _config_dict(config):
  import ml_collections
  return config if isinstance(config, ml_collections.ConfigDict) else ml_collections.ConfigDict(dict(config))


def _export(model, variables, image_shape, apply_kwargs, platforms, *, source, info, config) -> runtime.IntegerModel:
  example = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  captured = _capture(model, variables, example, apply_kwargs)
  if not captured:
    raise ValueError("the model has no quantized layer; a full-precision model has no integer form "
                     "(quantize it first, e.g. with ewgs_jax.ptq)")
  arrays: dict[str, np.ndarray] = {}
  layers_meta: dict[str, dict] = {}
  quantities = _quantities(captured)
  for path, layer in captured.items():
    layer_arrays, layers_meta[path] = _prepare(layer, quantities[path])
    arrays.update({f"{path}/{k}": v for k, v in layer_arrays.items()})
  folded = {layer.folded_bn for layer in captured.values() if layer.folded_bn}
  # The full-precision variables the forward still reads: all but the quantized layers' and the folded BatchNorms'.
  replaced = set(captured) | set(folded)
  flat = traverse_util.flatten_dict(variables)
  for key, value in flat.items():
    collection, module_path = key[0], "/".join(key[1:-1])
    if module_path not in replaced:
      arrays["/".join((runtime.FP_PREFIX.rstrip("/"), collection, *key[1:]))] = np.asarray(value)
  forward = forward_function(model, layers_meta, apply_kwargs)
  batch = jax.export.symbolic_shape("batch")[0]
  specs = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()},
           jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32))
  exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(*specs)
  metadata = {
      "format": runtime.FORMAT,
      "input": {"shape": ["batch", *image_shape], "dtype": "float32", "layout": "NHWC",
                "normalization": None if info is None else {"mean": list(info.mean), "std": list(info.std)}},
      "num_classes": None if info is None else info.num_classes,
      "platforms": list(exported.platforms),
      "layers": layers_meta,
      # the same network at full precision: its parameters (not the quantizers') as float32
      "fp_bytes": int(4 * sum(np.size(v) for k, v in flat.items()
                              if k[0] == names.PARAMS and not names.is_quantizer_param(k))),
      "source": {**source, **({"model": config["model"], "dataset": config["dataset"],
                               "quant": _jsonable(config["quant"])} if config is not None else {})},
  }
  return runtime.IntegerModel(exported, arrays, metadata)


def _jsonable(value):
  return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, default=str))
