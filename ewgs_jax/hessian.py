"""EWGS scaling factors from Hessian traces (EWGS Sec. 3.2, Eq. 8-10, Algorithm 1).

For each quantizer, ``Tr(H)/N`` of the task loss with respect to its discrete output ``x_q`` (the
[0, 1] value the layers expose through a zero probe, ``perturbations/.../w_q`` or ``a_q``) is
estimated with Hutchinson's method, ``Tr(H) = E[v^T H v]`` for Rademacher ``v`` (Eq. 8), where
``H v`` is a forward-over-reverse product ``jax.jvp(jax.grad(loss))`` (Eq. 9), never forming H.
Then ``delta = max(0, (Tr(H)/N) / (3 sigma(g_q)))`` (Eq. 10), ``sigma`` the unbiased standard
deviation of the loss gradient with respect to ``x_q``.

Modes:

* ``"blockwise"``: for each quantizer, HVPs with a probe on that quantizer alone: the
  diagonal-block estimator of the reference code (one HVP per quantizer per sample).
* ``"joint"``: one HVP per sample with independent probes on every quantizer at once;
  ``v_i^T (H v)_i`` is unbiased for block i's trace (the off-diagonal terms have zero mean), at the
  cost of one HVP per sample for all blocks.

HVPs (``hvp``): ``"linearize"`` (default) runs the forward-over-reverse pass once per batch with
``jax.linearize(jax.grad(loss))`` -- its primal output is the gradient that Eq. 10's sigma needs --
and applies the stored linear map to every probe, so each further sample costs only the tangent
half of a ``jax.jvp`` (``benchmarks/bench_hessian.py`` measures both). It keeps the residuals of
the gradient pass for the whole batch (about the memory of one train step's activations, twice).
``"jvp"`` calls ``jax.jvp(jax.grad(loss))`` afresh for every probe and takes the gradient from a
separate reverse pass: the same numbers (tested), less memory, more time.

Sampling stops at ``max_samples`` or once the running mean changes by less than ``tolerance``
relative to its magnitude (with ``abs`` in the denominator; the reference code omits it and so
stops after two samples whenever the trace is negative). Several batches are averaged as the
reference does: ``delta = max(0, mean_batches((Tr/N) / (3 sigma)))``.

Convolutions: the samples run in a ``lax.while_loop``, where XLA:CPU leaves gradient convolutions
as naive loop nests (far slower than its fast kernels); with ``conv_impl="auto"`` the model's
convolutions are the custom-VJP ones of :mod:`ewgs_jax.ops` on CPU, which stay fast there.
Forcing ``"xla"`` on CPU makes the estimate an order of magnitude slower (figures:
``benchmarks/README.md``, section "Figures cited by module docstrings", ``hessian``).

Deviations from the official code (README, "Deviations from the official code"):

* BatchNorm uses batch statistics during the estimate (as the reference, in train mode) but its
  running statistics are *not* updated (the reference's estimate changes them).
* The second-order path through the quantizers *after* a probed one follows STE (the discretizers'
  forward rule carries an STE derivative, ``DESIGN.md`` "Contracts"), whereas the official
  double-backward differentiates through its EWGS backward rule there. Measured against the
  official code on a small network: 0.06 % of ``v^T H v`` at delta = 0.01, 2.9 % at delta = 0.5.
* ImageNet: the official code estimates on a fresh single-GPU model with 10 batches of 16 images;
  ``configs/imagenet_resnet18.py`` uses this module's defaults (3 batches of 256, the CIFAR
  setting). ``--config.delta.num_batches=10 --config.delta.batch_size=16`` reproduces the batches.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ewgs_jax import losses, names, schedules


log = logging.getLogger(__name__)
PROBE_TO_DELTA = names.PROBE_TO_DELTA
delta_path = names.delta_path
HESSIAN_MODES = ("joint", "blockwise")
_EPS = 1e-6


def delta_from_trace(trace_per_element, grad_sigma):
  """EWGS Eq. 10 for one batch: ``(Tr(H)/N) / (3 sigma)``, NaN where it is undefined.

  ``grad_sigma`` is the unbiased standard deviation of ``dL/dx_q``. The clipping ``max(0, .)``
  is applied after averaging over batches (:func:`combine_batches`), as the reference does.

  Args:
    trace_per_element: the estimate of ``Tr(H)/N`` (scalar or array).
    grad_sigma: the unbiased standard deviation of the gradient, broadcastable against it.

  Returns:
    The unclipped delta; NaN where either input is non-finite or ``grad_sigma <= 1e-12``.
  """
  trace_per_element, grad_sigma = jnp.asarray(trace_per_element), jnp.asarray(grad_sigma)
  ok = jnp.isfinite(trace_per_element) & jnp.isfinite(grad_sigma) & (grad_sigma > 1e-12)
  return jnp.where(ok, trace_per_element / (3.0 * jnp.where(ok, grad_sigma, 1.0)), jnp.nan)


def delta_from_gradient(trace_per_element, grad):
  """EWGS Eq. 10 for one batch from the gradient ``dL/dx_q`` itself: ``(Tr(H)/N) / (3 std(grad))``,
  std unbiased (``ddof=1``, torch's default, as the reference); NaN where undefined (zero spread).

  Args:
    trace_per_element: the estimate of ``Tr(H)/N``.
    grad: the gradient ``dL/dx_q`` of the quantizer's output (any shape).

  Returns:
    The unclipped delta of :func:`delta_from_trace`.
  """
  return delta_from_trace(trace_per_element, jnp.std(jnp.asarray(grad, jnp.float32), ddof=1))


def combine_batches(per_batch: np.ndarray, previous: float, name: str = "") -> float:
  """``max(0, mean)`` over the batches with a defined value; keeps ``previous`` if there is none.

  A vanishing gradient spread or a non-finite trace (the reference code's NaN on detection
  models) leaves delta finite; the event is logged with the quantizer's name.

  Args:
    per_batch: one quantizer's per-batch deltas (:func:`delta_from_trace`), NaN where undefined.
    previous: the quantizer's current delta, kept when no batch has a defined value.
    name: the quantizer's name, for the log message.

  Returns:
    The new delta, ``>= 0``.
  """
  per_batch = np.asarray(per_batch, np.float64)
  valid = per_batch[np.isfinite(per_batch)]
  if len(valid) < len(per_batch):
    log.warning("delta for %s: %d of %d batches had a zero gradient spread or a non-finite trace%s",
                name, len(per_batch) - len(valid), len(per_batch),
                "; keeping the previous delta" if not len(valid) else "; they are ignored")
  if not len(valid):
    return float(previous)
  return float(max(0.0, valid.mean()))


def _running_mean_loop(sample_fn: Callable, key, num_blocks: int, max_samples: int, tolerance: float):
  """Averages ``sample_fn(key) -> [num_blocks]`` until every block converges or max_samples.

  Returns ``(means, counts)``; a block stops accumulating once its running mean changes by less
  than ``tolerance * (|previous mean| + 1e-6)`` (from the second sample on).
  """
  def cond(carry):
    k, _, _, done = carry
    return (k < max_samples) & ~jnp.all(done)

  def body(carry):
    k, sums, counts, done = carry
    values = sample_fn(jax.random.fold_in(key, k))
    active = ~done
    new_sums = jnp.where(active, sums + values, sums)
    new_counts = jnp.where(active, counts + 1, counts)
    prev_mean = sums / jnp.maximum(counts, 1)
    new_mean = new_sums / jnp.maximum(new_counts, 1)
    converged = (counts >= 1) & (jnp.abs(new_mean - prev_mean) < tolerance * (jnp.abs(prev_mean) + _EPS))
    return k + 1, new_sums, new_counts, done | (active & converged)

  zeros = jnp.zeros((num_blocks,), jnp.float32)
  _, sums, counts, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(0), zeros, jnp.zeros((num_blocks,), jnp.int32), jnp.zeros((num_blocks,), bool)))
  return sums / jnp.maximum(counts, 1), counts


def probe_loss(model, variables: dict, batch: dict,
               task_loss: Callable = losses.mean_cross_entropy) -> tuple[Callable, Any]:
  """The task loss as a function of the probes on every quantizer's ``x_q``.

  BatchNorm uses batch statistics; its updates are discarded.

  Args:
    model: the quantized model.
    variables: its ``params``, ``quant_state`` and (if any) ``batch_stats``.
    batch: ``image`` and ``label``.
    task_loss: ``task_loss(logits, labels) -> scalar``, the loss training minimises.

  Returns:
    ``(loss(perturbations), zero perturbations)``.
  """
  images, labels = batch["image"], batch["label"]
  shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), images)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes[names.PERTURBATIONS])
  base = {k: v for k, v in variables.items() if k != names.PERTURBATIONS}

  def loss(perturbations):
    logits, _ = model.apply({**base, names.PERTURBATIONS: perturbations}, images, train=True,
                            mutable=[names.BATCH_STATS])
    return task_loss(logits, labels)

  return loss, zeros


HVP_METHODS = ("linearize", "jvp")


def trace_fn(model, task_loss: Callable = losses.mean_cross_entropy, *, mode: str = "joint",
             max_samples: int = 50, tolerance: float = 1e-3, hvp: str = "linearize") -> Callable:
  """The pure, jittable estimate ``(params, batch_stats, quant_state, batch, key) -> (traces, sigmas,
  counts)``, each ``[num quantizers]`` in probe-path order (EWGS Eq. 8-9 and the sigma of Eq. 10).

  ``traces`` is ``Tr(H_ii)/N_i``, ``sigmas`` the unbiased std of ``dL/dx_q``, ``counts`` the samples
  used. No Python control flow on traced values and no host callbacks: the caller can ``jax.jit``
  it with ``in_shardings`` (batch sharded on ``data``, state replicated) as the train step.
  ``batch_stats`` may be ``None`` (no BatchNorm).

  Args:
    model: the quantized model.
    task_loss: ``task_loss(logits, labels) -> scalar``: the loss whose Hessian is estimated (the
      training loss; training passes its own).
    mode: ``"joint"`` or ``"blockwise"`` (:data:`HESSIAN_MODES`).
    max_samples: the most Hutchinson samples per quantizer.
    tolerance: the relative change of the running mean that stops sampling.
    hvp: ``"linearize"`` or ``"jvp"`` (:data:`HVP_METHODS`).

  Returns:
    The estimate function.
  """
  if mode not in HESSIAN_MODES:
    raise ValueError(f"unknown Hessian mode {mode!r}; valid choices: {list(HESSIAN_MODES)}")
  if hvp not in HVP_METHODS:
    raise ValueError(f"unknown HVP method {hvp!r}; valid choices: {list(HVP_METHODS)}")

  def estimate(params, batch_stats, quant_state, batch, key):
    variables = {names.PARAMS: params, names.QUANT_STATE: quant_state}
    if batch_stats is not None:
      variables[names.BATCH_STATS] = batch_stats
    loss, zeros = probe_loss(model, variables, batch, task_loss)
    leaves, treedef = jax.tree.flatten(zeros)
    grad_fn = jax.grad(loss)
    if hvp == "linearize":   # one forward-over-reverse pass; its primal is the gradient (EWGS Eq. 9-10)
      grads, hvp_fn = jax.linearize(grad_fn, zeros)
    else:
      grads = grad_fn(zeros)
      hvp_fn = lambda tangent: jax.jvp(grad_fn, (zeros,), (tangent,))[1]
    sigmas = jnp.stack([jnp.std(g, ddof=1) for g in jax.tree.leaves(grads)])

    def vhv(key, block_mask):
      keys = jax.random.split(key, len(leaves))
      vs = [jax.random.rademacher(k, leaf.shape, jnp.float32) * m
            for k, leaf, m in zip(keys, leaves, block_mask)]
      hv = hvp_fn(jax.tree.unflatten(treedef, vs))
      return jnp.stack([jnp.vdot(v, h) for v, h in zip(vs, jax.tree.leaves(hv))])

    n = len(leaves)
    if mode == "joint":
      means, counts = _running_mean_loop(lambda k: vhv(k, jnp.ones((n,))), key, n, max_samples, tolerance)
    else:
      def one_block(i):
        mask = jax.nn.one_hot(i, n)
        m, c = _running_mean_loop(lambda k: vhv(k, mask) * mask, jax.random.fold_in(key, i), n,
                                  max_samples, tolerance)
        return m[i], c[i]
      means, counts = jax.lax.map(one_block, jnp.arange(n))
    sizes = jnp.asarray([leaf.size for leaf in leaves], jnp.float32)
    return means / sizes, sigmas, counts

  return estimate


def make_trace_estimator(model, task_loss: Callable = losses.mean_cross_entropy, *, mode: str = "joint",
                         max_samples: int = 50, tolerance: float = 1e-3, hvp: str = "linearize"):
  """Returns ``estimate(variables, batch, key) -> {probe path: (Tr(H)/N, sigma(g_q), samples)}``.

  ``variables`` holds ``params``, ``batch_stats``, ``quant_state``; ``batch`` has ``image`` and
  ``label``. The work is :func:`trace_fn` under ``jax.jit`` (one compilation per batch shape),
  which follows the shardings of its inputs, so a data-sharded batch runs data-parallel on every
  device and host; only the per-quantizer scalars come back to the host.

  Args:
    model, task_loss, mode, max_samples, tolerance, hvp: as :func:`trace_fn`.

  Returns:
    The estimator.
  """
  estimate = jax.jit(trace_fn(model, task_loss, mode=mode, max_samples=max_samples, tolerance=tolerance,
                              hvp=hvp))

  @functools.lru_cache(maxsize=8)
  def probe_paths(image_shape, dtype) -> list[str]:
    shapes = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0),
                            jax.ShapeDtypeStruct(image_shape, dtype))
    return [names.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes[names.PERTURBATIONS])[0]]

  def run(variables, batch, key) -> dict[str, tuple[float, float, int]]:
    traces, sigmas, counts = jax.device_get(estimate(
        variables[names.PARAMS], variables.get(names.BATCH_STATS), variables[names.QUANT_STATE], batch, key))
    paths = probe_paths(tuple(batch["image"].shape), batch["image"].dtype)
    return {p: (float(t), float(s), int(c)) for p, t, s, c in zip(paths, traces, sigmas, counts)}

  return run


@dataclasses.dataclass(frozen=True)
class DeltaRefreshPolicy:
  """When and how EWGS delta is refreshed (EWGS Sec. 4.1, Table 4).

  ``mode``: ``"hessian"`` (Eq. 10 every ``every_epochs`` epochs; delta = 0 until the first refresh,
  which is never at step 0, as in the reference code), ``"fixed"`` (every delta set to
  ``fixed_delta`` once, at step 0), or ``"off"`` (delta stays 0). The timing itself is
  :func:`ewgs_jax.schedules.delta_refresh_due`, with the other schedules.
  """
  mode: str = "hessian"
  every_epochs: int = 10
  fixed_delta: float = 1e-3

  def __post_init__(self):
    schedules.check_delta_mode(self.mode)
    if self.every_epochs <= 0:
      raise ValueError("every_epochs must be > 0")
    if self.fixed_delta < 0:
      raise ValueError(f"fixed_delta must be >= 0, got {self.fixed_delta}")

  def should_refresh(self, step: int, steps_per_epoch: int) -> bool:
    """Whether to refresh before step ``step``.

    Args:
      step: steps done.
      steps_per_epoch: steps in one epoch.

    Returns:
      :func:`ewgs_jax.schedules.delta_refresh_due` for this policy.
    """
    return schedules.delta_refresh_due(self.mode, step, steps_per_epoch, self.every_epochs)

  def refresh(self, estimator: Callable | None, variables: dict, batches: list[dict], key) -> tuple[Any, dict]:
    """New ``quant_state`` (only deltas change) and a report.

    Args:
      estimator: from :func:`make_trace_estimator` (unused in ``"fixed"`` mode).
      variables: ``params``, ``batch_stats``, ``quant_state``.
      batches: the batches to average over (EWGS Algorithm 1).
      key: the probes' random key.

    Returns:
      ``(quant_state, {delta path: delta})``.
    """
    flat = {names.path_str(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(variables[names.QUANT_STATE]))[0]}
    if self.mode == "fixed":
      new = {p: np.float32(self.fixed_delta) for p in flat}
    else:
      per_batch: dict[str, list[float]] = {}
      for i, batch in enumerate(batches):
        for probe, (trace, sigma, _) in estimator(variables, batch, jax.random.fold_in(key, i)).items():
          per_batch.setdefault(delta_path(probe), []).append(float(delta_from_trace(trace, sigma)))
      new = {p: np.float32(combine_batches(per_batch[p], flat[p], p)) if p in per_batch else flat[p]
             for p in flat}
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables[names.QUANT_STATE])
    quant_state = jax.tree.unflatten(treedef, [jnp.asarray(new[names.path_str(p)], jnp.float32)
                                               for p, _ in leaves_with_paths])
    return quant_state, {p: float(v) for p, v in new.items()}


def refresh_deltas(estimator: Callable | None, variables: dict, batches: list[dict], key,
                   policy: DeltaRefreshPolicy | None = None) -> dict:
  """New ``quant_state`` from ``policy.refresh`` (default: Hessian mode); params and batch_stats
  are neither read back nor returned, so the caller's copies stay exactly as they were.

  Args:
    estimator: from :func:`make_trace_estimator` (unused in ``"fixed"`` mode).
    variables: ``params``, ``batch_stats``, ``quant_state``.
    batches: the batches to average over (EWGS Algorithm 1).
    key: the probes' random key.
    policy: the refresh policy; ``None`` for the default :class:`DeltaRefreshPolicy`.

  Returns:
    The new ``quant_state`` (only the deltas change).
  """
  return (policy or DeltaRefreshPolicy()).refresh(estimator, variables, batches, key)[0]
