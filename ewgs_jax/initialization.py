"""Model-level quantization helpers: data-driven initialisation, warm start, and what the rules resolve to.

* :func:`init_variables`: ``model.init`` on a real batch, so every quantizer parameter gets its
  method's data-driven initialisation (EWGS Sec. 4.1).
* :func:`warm_start`: the quantized twin of a trained full-precision model.
* :func:`quantizable_layers`, :func:`resolved_layers`, :func:`rules_in_use`, :func:`check_rules`:
  which layers take a setting, what each resolves to, which backward rules the model therefore runs
  (training decides its machinery from this), and rules that match nothing.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax

from ewgs_jax import layers, names
from ewgs_jax.layers import QuantContext
from ewgs_jax.quantconfig import LayerQuant

Array = jax.Array

def _is_quantizable(module, method_name) -> bool:
  return isinstance(module, layers._Quantized) and module.quant is not None and method_name == "__call__"


def quantizable_layers(model: nn.Module, images: Array) -> list[str]:
  """Module paths of the layers that take a quantization setting (traced abstractly, no compute).

  Args:
    model: a model built from :class:`~ewgs_jax.layers.QuantConv` / ``QuantDense`` layers.
    images: a batch, or anything with its ``shape`` and ``dtype`` (e.g. ``jax.ShapeDtypeStruct``).

  Returns:
    The sorted module paths (``"stage1_block0/conv1"``) of the layers with a ``quant`` setting.
  """
  _, state = jax.eval_shape(functools.partial(
      model.apply, train=False, capture_intermediates=_is_quantizable, mutable=["intermediates"]),
      jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images), images)
  paths = []
  jax.tree_util.tree_map_with_path(
      lambda path, _: paths.append(names.path_str(path[:-2])),
      state["intermediates"])
  return sorted(set(paths))


def resolved_layers(model: nn.Module, images: Array) -> dict[str, LayerQuant]:
  """The setting each quantized layer of ``model`` resolves to, after the per-layer rules.

  Args:
    model: a model with a ``quant`` attribute (``None``: full precision).
    images: a batch or its ``jax.ShapeDtypeStruct``.

  Returns:
    ``{layer path: LayerQuant}`` for the layers with at least one active quantizer.
  """
  quant = getattr(model, "quant", None)
  if quant is None:
    return {}
  settings = {path: quant.resolve(path) for path in quantizable_layers(model, images)}
  return {path: s for path, s in settings.items() if s.active}


def rules_in_use(model: nn.Module, images: Array) -> frozenset[str]:
  """The backward rules that some active quantizer of ``model`` uses (after the per-layer rules).

  What training runs follows from these, not from the global ``quant.backward``: the per-step
  context (mu_T, p_T and the replacement key) when a rule with source ``context`` or with
  ``replacement`` is in use, the delta refresh when a rule with source ``quant_state`` is.

  Args:
    model: a model with a ``quant`` attribute.
    images: a batch or its ``jax.ShapeDtypeStruct``.

  Returns:
    The rule names.
  """
  return frozenset(spec.backward for s in resolved_layers(model, images).values()
                   for spec in (s.weight, s.act) if spec.active)


def check_rules(model: nn.Module, images: Array) -> None:
  """Raises ``ValueError`` naming every rule of ``model.quant`` that matches no quantizable layer.

  Args:
    model: a model with a ``quant`` attribute.
    images: a batch or its ``jax.ShapeDtypeStruct``.
  """
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
  initialisation); running statistics keep their initial values. Probes are dropped.

  Args:
    model: the model.
    rng: the ``params`` key (for the network weights' random initialisers).
    images: a real batch (the quantizer initialisers read it).
    ctx: passed to the model's forward (default: none, i.e. mu = 0 and no replacement).

  Returns:
    The variables: ``params``, ``batch_stats`` and ``quant_state`` as the model has them.
  """
  variables = model.init({names.PARAMS: rng}, images, train=True, ctx=ctx)
  return {k: v for k, v in variables.items() if k != names.PERTURBATIONS}


def _flat(tree) -> dict[str, tuple]:
  flat = {}
  jax.tree_util.tree_map_with_path(
      lambda path, leaf: flat.__setitem__(names.path_str(path),
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

  Args:
    model: the quantized model.
    fp_variables: the full-precision ``params`` and (optionally) ``batch_stats``.
    rng: the key of the quantizer initialisers.
    images: a batch of training images, for the data-driven initialisers.

  Returns:
    The quantized model's variables: ``params``, ``batch_stats`` and ``quant_state``.
  """
  expected = jax.eval_shape(functools.partial(model.init, train=True), rng, images)
  problems = []
  for collection in (names.PARAMS, names.BATCH_STATS):
    want = {k: v for k, v in _flat(expected.get(collection, {})).items()
            if not names.is_quantizer_param(k.split("/"))}
    have = _flat(fp_variables.get(collection, {}))
    problems += [f"missing {collection}/{k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {collection}/{k}" for k in sorted(set(have) - set(want))]
    problems += [f"shape of {collection}/{k}: checkpoint {have[k]} vs model {want[k]}"
                 for k in sorted(set(want) & set(have)) if have[k] != want[k]]
  if problems:
    raise ValueError("full-precision variables do not match the model: " + "; ".join(problems))
  fp = {k: fp_variables[k] for k in ("params", "batch_stats") if k in fp_variables}
  _, variables = model.apply(fp, images, train=True, rngs={"params": rng},
                             mutable=[names.PARAMS, names.BATCH_STATS, names.QUANT_STATE, names.PERTURBATIONS])
  variables = {k: v for k, v in variables.items() if k != names.PERTURBATIONS}
  if "batch_stats" in fp:
    variables["batch_stats"] = fp["batch_stats"]
  return variables
