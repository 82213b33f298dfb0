"""EWGS scaling factors from Hessian traces (EWGS Sec. 3.2, Eq. 8-10, Algorithm 1).

For each quantizer, ``Tr(H)/N`` of the task loss with respect to its discrete output ``x_q`` (the
[0, 1] value each quantizer exposes to :func:`ewgs_jax.hooks.probing`, a zero probe added inside
the user's loss) is estimated with Hutchinson's method, ``Tr(H) = E[v^T H v]`` for Rademacher ``v`` (Eq. 8), where
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

The code is model-agnostic: :func:`find_quantizers` traces the user's ``loss_fn(state, batch)`` once
to list the quantizers and where each one's delta lives in ``state``; :func:`trace_fn` estimates
their traces with probes added inside the same loss. The EWGS rule's refresh
(:mod:`ewgs_jax.rules.ewgs`) combines the two.

Convolutions: the samples run in a ``lax.while_loop``, where XLA:CPU leaves gradient convolutions
as naive loop nests (far slower than its fast kernels); with ``conv_impl="auto"`` the model's
convolutions are the custom-VJP ones of :mod:`ewgs_jax.ops` on CPU, which stay fast there.
Forcing ``"xla"`` on CPU makes the estimate an order of magnitude slower (figures:
``benchmarks/README.md``, section "Figures cited by module docstrings", ``hessian``).

Deviations from the official code (README, "Deviations from the official code"):

* BatchNorm uses batch statistics during the estimate (as the reference, in train mode) but its
  running statistics are *not* updated (the reference's estimate changes them).
* The second-order path through the quantizers *after* a probed one follows STE (the discretizers'
  forward rule carries an STE derivative, ``ARCHITECTURE.md`` "The rule contract"), whereas the official
  double-backward differentiates through its EWGS backward rule there. Measured against the
  official code on a small network: 0.06 % of ``v^T H v`` at delta = 0.01, 2.9 % at delta = 0.5.
* ImageNet: the official code estimates on a fresh single-GPU model with 10 batches of 16 images;
  ``configs/imagenet_resnet18.py`` uses the EWGS rule's defaults (``ewgs_jax/rules/ewgs.py``: 3 batches
  of 256, the CIFAR setting). ``--config.ewgs.num_batches=10 --config.ewgs.batch_size=16`` reproduces the batches.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ewgs_jax import hooks, names


log = logging.getLogger(__name__)
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


def combine_batches(per_batch: Sequence[float] | np.ndarray, previous: float, name: str = "") -> float:
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


@dataclasses.dataclass(frozen=True)
class Probe:
  """One quantizer the estimate probes.

  Attributes:
    path: its layer's module path plus the probe name (``("conv1", "w_q")``).
    rule: its backward rule.
    shape: the shape of its discrete output ``x_q``.
    call: its position among the quantizer calls of the loss (:func:`ewgs_jax.hooks.probing`).
    leaf: the index, in ``jax.tree.leaves(state)``, of the state leaf its factor is read from
      (``None`` if it reads none).
  """
  path: tuple[str, ...]
  rule: str
  shape: tuple[int, ...]
  call: int
  leaf: int | None


@dataclasses.dataclass(frozen=True)
class Quantizers:
  """The quantizers a loss calls, as :func:`find_quantizers` found them.

  Attributes:
    ordered: the probed quantizers sorted by path (the order of the estimates and of their random
      probes; the order of a nested dict of the same paths).
    calls: how many quantizer calls the loss makes in all (probed or not).
    leaf_names: ``{leaf index: "quant_state/conv1/delta_w"}`` for the leaves the quantizers read.
  """
  ordered: tuple[Probe, ...]
  calls: int
  leaf_names: dict[int, str]

  @property
  def paths(self) -> list[str]:
    """The probed quantizers' paths as strings (``"conv1/w_q"``), in :attr:`ordered` order."""
    return ["/".join(p.path) for p in self.ordered]


def find_quantizers(loss_fn: Callable, state: Any, batch: Any, rule: str | None = None) -> Quantizers:
  """The quantizers ``loss_fn(state, batch)`` calls, from one abstract trace (no computation).

  Each quantizer reports the ``quant_state`` value its factor was read from; matching it against
  the traced leaves of ``state`` tells where that value lives in ``state``, whatever its structure
  (Linen variables, an ``nnx.State``, a user's own pytree).

  Args:
    loss_fn: ``loss_fn(state, batch) -> scalar``: the task loss, calling the model with ``state``.
    state: the pytree holding the model's variables.
    batch: a batch (only its shapes matter).
    rule: keep only the quantizers of this rule (``None``: all). A rule whose factor lives in
      ``quant_state`` must find it in ``state`` for each of its quantizers.

  Returns:
    The :class:`Quantizers`.

  Raises:
    ValueError: when the loss calls no quantizer (of ``rule``), or one of them reads its factor from
      something that is not a leaf of ``state``.
  """
  found: dict[str, Any] = {}

  def trace(state, batch):
    leaves = jax.tree.leaves(state)
    by_id = {id(leaf): i for i, leaf in enumerate(leaves)}
    with hooks.probing("record") as probing:
      loss_fn(state, batch)
    found["quantizers"] = [(q, by_id.get(id(q.state)) if q.state is not None else None) for q in probing.quantizers]

  jax.eval_shape(trace, state, batch)
  calls = found["quantizers"]
  probes = [Probe(q.path, q.rule, q.shape, i, leaf) for i, (q, leaf) in enumerate(calls)
            if rule is None or q.rule == rule]
  if not probes:
    raise ValueError(f"the loss function calls no quantizer{'' if rule is None else f' with rule {rule!r}'}: it "
                     "must apply the quantized model to the state it is given")
  if rule is not None:
    unread = [p for p in probes if p.leaf is None]
    if unread:
      raise ValueError(f"quantizer {'/'.join(unread[0].path)} (rule {rule!r}) reads its factor from nothing in the "
                       f"state given: pass the model's variables including the {names.QUANT_STATE!r} collection, "
                       "and call the model with them in the loss")
  leaf_paths = [names.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  return Quantizers(tuple(sorted(probes, key=lambda p: (p.path, p.call))), len(calls),
                    {p.leaf: leaf_paths[p.leaf] for p in probes if p.leaf is not None})


def read_leaves(state: Any, quantizers: Quantizers) -> dict[int, float]:
  """The current values of the state leaves the quantizers read their factors from.

  Args:
    state: the pytree passed to :func:`find_quantizers`.
    quantizers: its result.

  Returns:
    ``{leaf index: value}``.
  """
  leaves = jax.tree.leaves(state)
  return {leaf: float(np.asarray(jax.device_get(leaves[leaf])).reshape(-1)[0]) for leaf in quantizers.leaf_names}


def write_leaves(state: Any, values: dict[int, float]) -> Any:
  """``state`` with some scalar leaves replaced (float32, same shape as before).

  Args:
    state: the pytree.
    values: ``{leaf index: new value}``.

  Returns:
    The new pytree; every other leaf is the same object as before.
  """
  leaves, treedef = jax.tree.flatten(state)
  leaves = [jnp.full(jnp.shape(leaf), values[i], jnp.float32) if i in values else leaf
            for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, leaves)


def probe_loss(loss_fn: Callable, state: Any, batch: Any, quantizers: Quantizers) -> tuple[Callable, list]:
  """The task loss as a function of zero probes on the quantizers' discrete outputs ``x_q``.

  Args:
    loss_fn: ``loss_fn(state, batch) -> scalar``.
    state: the pytree of the model's variables.
    batch: the batch.
    quantizers: from :func:`find_quantizers`.

  Returns:
    ``(loss(probes), zero probes)``, the probes a list in ``quantizers.ordered`` order.
  """
  ordered = quantizers.ordered
  by_call = sorted(range(len(ordered)), key=lambda i: ordered[i].call)
  select = frozenset(p.call for p in ordered)
  zeros = [jnp.zeros(p.shape, jnp.float32) for p in ordered]

  def loss(probes):
    with hooks.probing("add", [probes[i] for i in by_call], select):
      return loss_fn(state, batch)

  return loss, zeros


HVP_METHODS = ("linearize", "jvp")


def trace_fn(loss_fn: Callable, quantizers: Quantizers, *, mode: str = "joint", max_samples: int = 50,
             tolerance: float = 1e-3, hvp: str = "linearize") -> Callable:
  """The pure, jittable estimate ``(state, batch, key) -> (traces, sigmas, counts)``, each
  ``[num quantizers]`` in ``quantizers.ordered`` order (EWGS Eq. 8-9 and the sigma of Eq. 10).

  ``traces`` is ``Tr(H_ii)/N_i``, ``sigmas`` the unbiased std of ``dL/dx_q``, ``counts`` the samples
  used. No Python control flow on traced values and no host callbacks: the caller can ``jax.jit``
  it; it follows the shardings of its inputs (a data-sharded batch runs data-parallel).

  Args:
    loss_fn: ``loss_fn(state, batch) -> scalar``: the loss whose Hessian is estimated (the training
      loss, without the per-step context).
    quantizers: the quantizers to probe (:func:`find_quantizers` on the same structures).
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

  def estimate(state, batch, key):
    loss, zeros = probe_loss(loss_fn, state, batch, quantizers)
    grad_fn = jax.grad(loss)
    if hvp == "linearize":   # one forward-over-reverse pass; its primal is the gradient (EWGS Eq. 9-10)
      grads, hvp_fn = jax.linearize(grad_fn, zeros)
    else:
      grads = grad_fn(zeros)
      hvp_fn = lambda tangent: jax.jvp(grad_fn, (zeros,), (tangent,))[1]
    sigmas = jnp.stack([jnp.std(g, ddof=1) for g in grads])

    def vhv(key, block_mask):
      keys = jax.random.split(key, len(zeros))
      vs = [jax.random.rademacher(k, z.shape, jnp.float32) * m for k, z, m in zip(keys, zeros, block_mask)]
      hv = hvp_fn(vs)
      return jnp.stack([jnp.vdot(v, h) for v, h in zip(vs, hv)])

    n = len(zeros)
    if mode == "joint":
      means, counts = _running_mean_loop(lambda k: vhv(k, jnp.ones((n,))), key, n, max_samples, tolerance)
    else:
      def one_block(i):
        mask = jax.nn.one_hot(i, n)
        m, c = _running_mean_loop(lambda k: vhv(k, mask) * mask, jax.random.fold_in(key, i), n,
                                  max_samples, tolerance)
        return m[i], c[i]
      means, counts = jax.lax.map(one_block, jnp.arange(n))
    sizes = jnp.asarray([z.size for z in zeros], jnp.float32)
    return means / sizes, sigmas, counts

  return estimate
