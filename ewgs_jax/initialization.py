"""Model-level quantization helpers: data-driven initialisation, warm start, and what the rules resolve to.

* :func:`init_variables`: ``model.init`` on a real batch, so every quantizer parameter gets its
  method's data-driven initialisation (EWGS Sec. 4.1).
* :func:`warm_start`: the quantized twin of a trained full-precision model.
* :class:`LayerReport` / :func:`layer_report`: which layers take a setting and what each resolves to,
  which backward rules the model therefore runs (the machinery that runs follows these), and
  per-layer overrides that match nothing; from one traced call.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax

from ewgs_jax import hooks, names, rules
from ewgs_jax.layers import QuantContext
from ewgs_jax.quantconfig import LayerQuant, QuantConfig

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What the quantized layers of a model resolved to, from one traced call (:func:`ewgs_jax.hooks.recording`).

  Attributes:
    calls: each quantized layer's first call, in call order (a layer called twice appears once).
  """
  calls: tuple[hooks.LayerCall, ...]

  @classmethod
  def of(cls, calls) -> LayerReport:
    """The report of recorded calls, each layer once (the first call).

    Args:
      calls: :class:`~ewgs_jax.hooks.LayerCall` s in call order.

    Returns:
      The report.
    """
    seen, unique = set(), []
    for call in calls:
      if call.path not in seen:
        seen.add(call.path)
        unique.append(call)
    return cls(tuple(unique))

  @property
  def paths(self) -> list[str]:
    """Module paths of every layer that takes a quantization setting, in call order."""
    return ["/".join(c.path) for c in self.calls if not c.note]

  def quantized(self) -> dict[str, LayerQuant]:
    """``{path: setting}`` of the layers with at least one active quantizer."""
    return {"/".join(c.path): c.setting for c in self.calls if c.setting is not None}

  def rules(self) -> list[str]:
    """The backward rules some active quantizer uses (per-layer overrides included), in registration order.

    What training runs follows from these, not from the global ``quant.rule``.
    """
    used = set().union(*(setting.rules() for setting in self.quantized().values()))
    return [name for name in rules.RULES if name in used]

  def lines(self) -> list[str]:
    """One line per layer: ``stage1_block0/conv1 (QuantConv): weights interval/ewgs/2b, inputs interval/ewgs/2b``."""
    out = []
    for c in self.calls:
      what = ("full precision" if c.setting is None
              else f"weights {c.setting.weight.describe()}, inputs {c.setting.act.describe()}")
      if c.note:
        what += f" ({c.note})"
      out.append(f"{'/'.join(c.path) or '<root>'} ({c.kind}): {what}")
    return out

  def check(self, quant: QuantConfig | None) -> None:
    """Raises ``ValueError`` naming every override of ``quant`` that matches no quantizable layer.

    Args:
      quant: the model's setting (``None``: nothing to check).
    """
    if quant is None or not quant.overrides:
      return
    unmatched = quant.unmatched(self.paths)
    if unmatched:
      raise ValueError(f"quantization overrides {unmatched} match no quantizable layer; layers: {self.paths}")


def layer_report(model: nn.Module, *args, **kwargs) -> LayerReport:
  """Which layers of ``model`` are quantized and how, from one abstract trace of ``model.init`` (no compute).

  Args:
    model: a model built from the quantized layers (or a :class:`~ewgs_jax.interception.QuantizedModel`).
    *args: its inputs: a batch or ``jax.ShapeDtypeStruct`` s.
    **kwargs: its other call arguments (static: ``train=True``, ...).

  Returns:
    The :class:`LayerReport`.
  """
  with hooks.recording() as calls:
    jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)
  return LayerReport.of(calls)


def init_variables(model: nn.Module, rng: Array, images: Array, ctx: QuantContext | None = None) -> dict:
  """Initialises ``model`` on a real batch (data-driven quantizer initialisation, EWGS Sec. 4.1).

  BatchNorm uses the batch's statistics during this pass (as the reference's train-mode
  initialisation); running statistics keep their initial values.

  Args:
    model: the model.
    rng: the ``params`` key (for the network weights' random initialisers).
    images: a real batch (the quantizer initialisers read it).
    ctx: passed to the model's forward (default: none, i.e. per-step factors 0 and no replacement).

  Returns:
    The variables: ``params``, ``batch_stats`` and ``quant_state`` as the model has them.
  """
  return dict(model.init({names.PARAMS: rng}, images, train=True, ctx=ctx))


def _flat(tree) -> dict[str, tuple]:
  flat: dict[str, tuple] = {}
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
                             mutable=[names.PARAMS, names.BATCH_STATS, names.QUANT_STATE])
  variables = dict(variables)
  if "batch_stats" in fp:
    variables["batch_stats"] = fp["batch_stats"]
  return variables
