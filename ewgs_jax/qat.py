"""The public QAT API for any training loop: the step's context, the rules' due actions, their metrics.

An estimator is more than its backward pass: EWGS needs each quantizer's delta refreshed from
Hessian traces between steps, PEGE needs mu_T and p_T at every step and a key for its replacement
masks. :class:`QAT` runs that machinery, as each rule in :mod:`ewgs_jax.rules` declares it, for a
training loop it does not own. It assumes nothing about the model's call signature or the batch:
the loop hands it a loss function ``loss_fn(state, batch) -> scalar`` of its own::

    qat = ej.QAT(quant, total_steps=1000, steps_per_epoch=100)

    @jax.jit
    def train_step(variables, opt_state, batch, step):
      ctx = qat.context(step, key)                  # per-step factors + replacement key
      loss, grads = jax.value_and_grad(lambda p: my_loss({**variables, "params": p}, batch, ctx))(...)
      ...
      return variables, opt_state, {"loss": loss, **qat.metrics(ctx)}

    refresh_loss = lambda v, b: my_loss(v, b, None)   # one function for the whole run (compiled once)
    for step in range(1000):
      variables, _ = qat.run_due(step, variables, refresh_loss, refresh_batches, key)
      variables, opt_state, metrics = train_step(variables, opt_state, next(batches), step)

``key`` for the context is made with ``jax.random.key(seed, impl=qat.key_impl)``: a rule may ask for a
cheaper PRNG for its replacement masks (PEGE's ``rng_impl``).

``run_due`` works on Linen variables, on any pytree holding them, and on a Flax NNX model (changed
in place). The training program (:mod:`ewgs_jax.training`) uses exactly this API.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax

from ewgs_jax import rules as rules_lib
from ewgs_jax.layers import QuantContext
from ewgs_jax.quantconfig import QuantConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DueAction:
  """A rule's action that is due (:meth:`QAT.due`).

  Attributes:
    rule: the rule's name.
    action: the :class:`~ewgs_jax.rules.Action`.
  """
  rule: str
  action: rules_lib.Action

  @property
  def name(self) -> str:
    """``"<rule>/<action>"``, e.g. ``"ewgs/delta_refresh"``."""
    return rules_lib.metric_key(self.rule, self.action.name)


class QAT:
  """The machinery of the backward rules a model uses, for any training loop.

  Args:
    quant: the model's quantization setting (its rules' settings included).
    total_steps: the run's length (the schedules' ramps are fractions of it).
    steps_per_epoch: steps in one epoch, for actions timed in epochs (default: ``total_steps``).
    rules: the rules whose machinery runs (default: every rule ``quant`` can resolve to,
      :meth:`ewgs_jax.quantconfig.QuantConfig.rule_names`; the training program passes the rules
      the model's layers actually resolve to).

  Raises:
    ValueError: for a rule whose per-step factor its step factors do not provide.
  """

  def __init__(self, quant: QuantConfig, *, total_steps: int, steps_per_epoch: int | None = None,
               rules: Iterable[str] | None = None):
    if total_steps <= 0:
      raise ValueError(f"total_steps must be > 0, got {total_steps}")
    self.quant = quant
    self.total_steps = int(total_steps)
    self.steps_per_epoch = int(steps_per_epoch or total_steps)
    self.rules = [rules_lib.get(name) for name in (quant.rule_names() if rules is None else rules)]
    self.settings = {rule.name: quant.rule_settings(rule.name) for rule in self.rules}
    self._factors: dict[str, Mapping[str, Callable]] = {}
    for rule in self.rules:
      if rule.step_factors is not None:
        factors = dict(rule.step_factors(self.settings[rule.name], self.total_steps))
        rules_lib.check_provided(rule, factors)
        self._factors[rule.name] = factors
    self.actions = [DueAction(rule.name, action) for rule in self.rules if rule.actions is not None
                    for action in rule.actions(self.settings[rule.name])]
    self.replaces = any(rule.replacement is not None for rule in self.rules)
    impls = {quant.options(rule.name).rng_impl for rule in self.rules if rule.replacement is not None}
    if len(impls) > 1:
      raise ValueError(f"the rules in use ask for different replacement PRNGs {sorted(impls)}; choose one")
    self.key_impl = impls.pop() if impls else "threefry2x32"
    self._nnx_losses: dict[Any, Callable] = {}

  # --- inside the jitted step ---------------------------------------------------------------------

  def context(self, step, key=None) -> QuantContext:
    """The per-step context of the quantizers (jittable; ``step`` may be traced).

    Args:
      step: the training step (the number of steps done).
      key: the run's replacement key (folded with ``step``), made with
        ``jax.random.key(seed, impl=self.key_impl)``; ``None``: no replacement.

    Returns:
      ``QuantContext(factors={rule: {name: value}}, key=...)``.

    Raises:
      ValueError: for a key of another PRNG than :attr:`key_impl` (the rules asked for that one).
    """
    if self.replaces and key is not None:
      typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
      impl = str(jax.random.key_impl(key)) if typed else "threefry2x32"
      if impl != self.key_impl:
        raise ValueError(f"the replacement key is a {impl} key, but the rules asked for {self.key_impl} "
                         f"(rng_impl): make it with jax.random.key(seed, impl={self.key_impl!r})")
    factors = {rule: {name: fn(step) for name, fn in fns.items()} for rule, fns in self._factors.items()}
    step_key = jax.random.fold_in(key, step) if self.replaces and key is not None else None
    return QuantContext(factors=factors, key=step_key)

  def metrics(self, ctx: QuantContext) -> dict[str, Any]:
    """The rules' per-step factors as metrics, ``{"pege/mu": ..., "pege/rate": ...}``.

    Args:
      ctx: a context from :meth:`context`.

    Returns:
      A flat dict (empty when no rule has per-step factors).
    """
    return {rules_lib.metric_key(rule, name): value for rule, values in (ctx.factors or {}).items()
            for name, value in values.items()}

  # --- between steps ------------------------------------------------------------------------------

  def clock(self, step: int) -> rules_lib.Clock:
    """The run's position at ``step`` (for the actions' timing)."""
    return rules_lib.Clock(int(step), self.steps_per_epoch, self.total_steps)

  def due(self, step: int) -> list[DueAction]:
    """The actions due before training step ``step`` (a host-side Python decision).

    Args:
      step: the number of steps done.

    Returns:
      The due actions, in the rules' order.
    """
    clock = self.clock(step)
    return [due for due in self.actions if due.action.due(clock)]

  def run_due(self, step: int, state: Any, loss_fn: Callable[[Any, Any], Any],
              batches: Iterable[Any] | Callable[[DueAction], Iterable[Any]], key: Any = None, *,
              stop: Callable[[], bool] | None = None,
              skip: Sequence[str] = ()) -> tuple[Any, dict[str, float]]:
    """Runs the actions due before step ``step`` (e.g. EWGS's delta refresh).

    Args:
      step: the number of steps done.
      state: Linen variables (or any pytree holding them), or a Flax NNX model (updated in place).
      loss_fn: ``loss_fn(state, batch) -> scalar``: the training loss without the per-step context
        (no replacement); for an NNX model, ``loss_fn(model, batch)``. Pass the same function every
        time (the actions compile once per function and batch shape), and not one wrapped in
        ``jax.jit``: the actions trace it themselves (the Hessian probes are found while tracing).
      batches: the batches the actions read (an iterable; each action takes the first ones it
        needs), or ``batches(due_action) -> iterable`` to give each action its own.
      key: the actions' random key (the rules' first action gets it as it is, the i-th of
        :attr:`actions` ``fold_in(key, i)``, whichever of them are due or skipped).
      stop: polled between units of work; when True, the running action gives up, the state of
        that action is left as it was, and the actions due after it do not run (e.g. a preemption).
      skip: names (``"ewgs/delta_refresh"``) of due actions not to run (already done at this step).

    Returns:
      ``(state, metrics)``: the new state (the same NNX model object), and the actions' metrics as
      ``{"<rule>/<name>": value}``; an action that ran reports itself in ``"<rule>/<action>"``
      (1.0 done, 0.0 stopped).
    """
    due = [d for d in self.due(step) if d.name not in skip]
    if not due:
      return state, {}
    if hasattr(loss_fn, "lower"):   # a jax.jit-wrapped function: its trace hides the quantizers
      raise ValueError("run_due's loss_fn is wrapped in jax.jit; pass the plain function (the actions compile it)")
    nnx_model = _nnx_module(state)
    if nnx_model is not None:
      from flax import nnx
      graphdef, state = nnx.split(nnx_model)
      loss_fn = self._nnx_loss(loss_fn, graphdef)
    key = jax.random.key(0) if key is None else key
    metrics: dict[str, float] = {}
    for d in due:
      source = batches(d) if callable(batches) else batches
      i = self.actions.index(d)   # its place among all the actions: the same key whatever ran before it
      action_key = key if i == 0 else jax.random.fold_in(key, i)
      inp = rules_lib.ActionInput(self.clock(step), state, loss_fn, source, action_key, stop or (lambda: False))
      new_state, values = d.action.run(inp)
      metrics[d.name] = 0.0 if new_state is None else 1.0
      if new_state is None:
        log.warning("%s stopped before it finished at step %d; the state is unchanged", d.name, step)
        break
      state = new_state
      metrics.update({rules_lib.metric_key(d.rule, k): v for k, v in values.items()})
    if nnx_model is not None:
      from flax import nnx
      nnx.update(nnx_model, state)
      return nnx_model, metrics
    return state, metrics


  def _nnx_loss(self, loss_fn: Callable, graphdef: Any) -> Callable:
    """``loss_fn(model, batch)`` as a loss of the model's pure state, one function per (loss, graph) so
    that the actions compile once."""
    key = (loss_fn, graphdef)
    if key not in self._nnx_losses:
      from flax import nnx

      def loss(state, batch):
        # fresh Variable objects at the trace level the loss runs at (inside the Hessian's grad/linearize):
        # NNX refuses to mutate (RNG counts) a Variable made at another level; the leaves stay the same objects
        return loss_fn(nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state)), batch)

      self._nnx_losses[key] = loss
    return self._nnx_losses[key]


def _nnx_module(state: Any):
  """``state`` if it is a Flax NNX module, else ``None`` (NNX is not imported for Linen users)."""
  nnx = sys.modules.get("flax.nnx")
  return state if nnx is not None and isinstance(state, nnx.Module) else None
