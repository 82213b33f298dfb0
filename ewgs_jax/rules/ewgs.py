"""EWGS (Lee, Kim, Ham, CVPR 2021): ``g_n = g_q (1 + delta sign(g_q) (x_n - x_q))`` (Eq. 4), with a
per-quantizer delta from Hessian traces (Sec. 3.2, Eq. 8-10), refreshed between steps.

What the rule declares (:mod:`ewgs_jax.rules.base`):

* discretizer :func:`ewgs_jax.estimators.ewgs`, factor ``delta`` read from the quantizer's
  ``quant_state`` variable (0 until the first refresh, as the reference code);
* one action, ``delta_refresh`` (``config.ewgs.mode``): ``"hessian"``: Eq. 10 every
  ``every_epochs`` epochs, never at step 0, as the reference; ``"fixed"``: every delta set to
  ``fixed_value`` once, at step 0 (EWGS Table 4, "fixed"); ``"off"``: delta stays 0;
* the trace of the mean delta over weight and activation quantizers at each refresh.

The refresh works on any state and any loss: :mod:`ewgs_jax.hessian` finds the quantizers whose
rule is this one by tracing the user's ``loss_fn(state, batch)`` once, estimates ``Tr(H)/N`` and
``sigma(g_q)`` for each, and the new deltas are written into the state leaves the quantizers read
them from, wherever they live (Linen variables, an ``nnx.State``, ...). Only deltas change.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np

from ewgs_jax import estimators, hessian, names
from ewgs_jax.rules import base

log = logging.getLogger(__name__)
NAME = "ewgs"
MODES = ("hessian", "fixed", "off")


def _positive_int(value) -> str | None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
  return None if ok else "it must be a positive integer"


def _non_negative(value) -> str | None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
  return None if ok else "it must be a number >= 0"


SETTINGS = {
    "mode": base.Setting("hessian", "delta refresh: 'hessian' (Eq. 10 every every_epochs; delta = 0 before the "
                         "first), 'fixed' (fixed_value from step 0), 'off' (delta = 0: STE)", choices=MODES),
    "every_epochs": base.Setting(10, "epochs between Hessian refreshes (the reference: 10 on CIFAR, 1 on "
                                 "ImageNet)", check=_positive_int),
    "fixed_value": base.Setting(1e-3, "delta of every quantizer with mode='fixed' (EWGS Table 4)",
                                check=_non_negative),
    "hessian_mode": base.Setting("joint", "'joint': one HVP per sample probes every quantizer at once; "
                                 "'blockwise': one HVP per quantizer per sample (the reference)",
                                 choices=hessian.HESSIAN_MODES),
    "hvp": base.Setting("linearize", "'linearize': one gradient pass per batch, HVPs reuse it; 'jvp': a fresh "
                        "forward-over-reverse pass per probe (less memory)", choices=hessian.HVP_METHODS),
    "num_batches": base.Setting(3, "batches the traces are averaged over (EWGS Algorithm 1)", check=_positive_int),
    "batch_size": base.Setting(256, "images per refresh batch (global)", check=_positive_int),
    "max_samples": base.Setting(50, "most Hutchinson samples per quantizer and batch (Eq. 8)",
                                check=_positive_int),
    "tolerance": base.Setting(1e-3, "stop sampling once the running mean moves by less than this, relatively",
                              check=_non_negative),
}


def refresh_due(mode: str, step: int, steps_per_epoch: int, every_epochs: int) -> bool:
  """Whether delta is refreshed before training step ``step`` (a host-side Python decision).

  Args:
    mode: one of :data:`MODES`.
    step: the number of steps done.
    steps_per_epoch: steps in one epoch.
    every_epochs: the refresh period in epochs (``"hessian"`` mode).

  Returns:
    True at step 0 for ``"fixed"``; at every ``every_epochs``-th epoch boundary after step 0 for
    ``"hessian"``; never for ``"off"``.
  """
  if mode not in MODES:
    raise ValueError(f"unknown delta mode {mode!r}; valid choices: {list(MODES)}")
  if mode == "fixed":
    return step == 0
  if mode == "off" or step == 0:
    return False
  return step % steps_per_epoch == 0 and (step // steps_per_epoch) % every_epochs == 0


class DeltaRefresh:
  """The ``delta_refresh`` action: new deltas for every EWGS quantizer of a state (Eq. 8-10).

  One jitted estimate per (loss function, state structure, batch shape), reused across refreshes.
  """

  def __init__(self, settings: Mapping[str, Any]):
    self.settings = dict(settings)
    self._estimates: dict[Any, Any] = {}

  def due(self, clock: base.Clock) -> bool:
    """Whether a refresh is due before step ``clock.step`` (:func:`refresh_due`)."""
    return refresh_due(self.settings["mode"], clock.step, clock.steps_per_epoch, self.settings["every_epochs"])

  def _estimate(self, loss_fn, state, batch, quantizers):
    key = (loss_fn, jax.tree.structure(state), tuple((np.shape(x), str(getattr(x, "dtype", type(x))))
                                                      for x in jax.tree.leaves(batch)))
    if key not in self._estimates:
      s = self.settings
      self._estimates[key] = jax.jit(hessian.trace_fn(
          loss_fn, quantizers, mode=s["hessian_mode"], max_samples=s["max_samples"], tolerance=s["tolerance"],
          hvp=s["hvp"]))
    return self._estimates[key]

  def __call__(self, inp: base.ActionInput) -> tuple[Any, dict[str, float]]:
    """Runs the refresh.

    Args:
      inp: the state, the loss, the batches (the first ``num_batches`` are used), a key and the
        stop flag, polled between batches.

    Returns:
      ``(state with new deltas, metrics)``; ``(None, {})`` when stopped.
    """
    s = self.settings
    batches = []
    for batch in inp.batches:
      batches.append(batch)
      if len(batches) == s["num_batches"] or s["mode"] == "fixed":
        break
    if not batches:
      raise ValueError("the EWGS delta refresh got no batches")
    quantizers = hessian.find_quantizers(inp.loss_fn, inp.state, batches[0], rule=NAME)
    previous = hessian.read_leaves(inp.state, quantizers)
    if s["mode"] == "fixed":
      new: dict[int, float] = {leaf: float(s["fixed_value"]) for leaf in previous}
    else:
      estimate = self._estimate(inp.loss_fn, inp.state, batches[0], quantizers)
      per_batch: dict[int, list[float]] = {leaf: [] for leaf in previous}
      for i, batch in enumerate(batches):
        if inp.stop():
          return None, {}
        traces, sigmas, _ = jax.device_get(estimate(inp.state, batch, jax.random.fold_in(inp.key, i)))
        for q, trace, sigma in zip(quantizers.ordered, traces, sigmas):
          if q.leaf is not None:   # every quantizer of this rule reads a leaf (find_quantizers checks)
            per_batch[q.leaf].append(float(hessian.delta_from_trace(trace, sigma)))
      new = {leaf: hessian.combine_batches(values, previous[leaf], quantizers.leaf_names[leaf])
             for leaf, values in per_batch.items()}
    state = hessian.write_leaves(inp.state, new)
    metrics = {}
    for kind in names.KINDS:
      values = [new[q.leaf] for q in quantizers.ordered if q.leaf is not None and q.path[-1] == names.probe_name(kind)]
      if values:
        metrics[names.delta_name(kind)] = float(np.mean(values))
    return state, metrics


def _actions(settings: Mapping[str, Any]) -> tuple[base.Action, ...]:
  if settings["mode"] == "off":
    return ()
  refresh = DeltaRefresh(settings)
  return (base.Action("delta_refresh", refresh.due, refresh,
                      batch_size=settings["batch_size"] if settings["mode"] == "hessian" else None,
                      num_batches=settings["num_batches"] if settings["mode"] == "hessian" else 1,
                      describe=f"EWGS delta ({settings['mode']})"),)


RULE = base.register(base.Rule(
    NAME, estimators.ewgs, factor="delta", source="quant_state", settings=SETTINGS, actions=_actions,
    traces=tuple(base.Trace(base.metric_key(NAME, names.delta_name(kind)),
                            f"EWGS delta, {side} (mean over layers)", "delta")
                 for kind, side in zip(names.KINDS, ("weights", "activations"))),
    summary="EWGS: g_n = g_q (1 + delta sign(g_q)(x_n - x_q)) (Eq. 4), delta from Hessian traces (Eq. 10)"))
