"""The training loop's periodic actions, each deciding with the one :func:`due` helper.

Logging (with the divergence stop), evaluation, quantizer snapshots and checkpoints are methods of
:class:`Bookkeeper`, which holds what they share (the metrics writer, the progress line, the
checkpoint keeper, the run's history); the rules' own actions (EWGS's delta refresh) run through
the public QAT API (:meth:`ewgs_jax.qat.QAT.run_due`). ``training.train_and_evaluate`` calls them in
order, each when :func:`due`.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable, Iterable

import jax
import numpy as np

from ewgs_jax import names, parallel, reporting, workdir as workdir_guard

DIVERGED_LOSS_FACTOR = 100.0   # a training loss above this many times chance level (ln C) has diverged


def due(step: int, every: int, last: int | None = None) -> bool:
  """Whether a periodic action runs after ``step``: every ``every`` steps (``every <= 0``: never),
  and at the run's last step.

  Args:
    step: the number of steps done.
    every: the period in steps.
    last: the run's last step, or ``None``.

  Returns:
    ``step % every == 0`` (for ``every > 0``) or ``step == last``.
  """
  return (every > 0 and step % every == 0) or (last is not None and step == last)


def quantizer_values(name: str, value) -> dict[str, float]:
  """A quantizer parameter or delta as loggable scalars: ``{name: value}``, or for a per-channel one
  (:attr:`ewgs_jax.quantconfig.QuantizerSpec.per_channel`) its mean, min and max over the channels as
  ``{name/mean, name/min, name/max}`` (every value stays in the checkpoint).

  Args:
    name: the variable's name (``q_w_lower``, ``q_alpha``, ``delta_w``).
    value: its value (host array or scalar).

  Returns:
    The scalars by name.
  """
  value = np.asarray(value, np.float64)
  if value.size == 1:
    return {name: float(value.reshape(()))}
  return {f"{name}/mean": float(value.mean()), f"{name}/min": float(value.min()), f"{name}/max": float(value.max())}


def quantizer_snapshot(variables: dict) -> dict[str, dict[str, float]]:
  """Per quantized layer: its quantizer parameters (l, u, alpha, ...) and deltas, as :func:`quantizer_values`.

  Args:
    variables: ``params`` and ``quant_state`` (device or host arrays).

  Returns:
    ``{layer path: {name: value}}``.
  """
  snapshot: dict[str, dict[str, float]] = {}
  host = parallel.to_host({names.PARAMS: variables[names.PARAMS],
                           names.QUANT_STATE: variables.get(names.QUANT_STATE, {})})

  def visit(path, leaf):
    keys = names.path_keys(path)
    if (names.is_quantizer_param(keys) or names.is_delta(keys[-1])) and np.size(leaf) > 0:
      snapshot.setdefault("/".join(keys[1:-1]), {}).update(quantizer_values(keys[-1], leaf))

  jax.tree_util.tree_map_with_path(visit, host)
  return snapshot


class Bookkeeper:
  """The loop's logging, evaluation, snapshots and checkpoints (see the module docstring).

  Args:
    workdir: the run's directory.
    writer: the metrics writer.
    progress: the progress line.
    keeper: the checkpoint keeper.
    history: the run's history (restored from the last checkpoint, or new).
    num_classes: for the divergence threshold (``DIVERGED_LOSS_FACTOR * ln(classes)``).
    data_state: ``() -> dict``: the data position to checkpoint.
    eval_split: the split the run is judged on (``"validation"`` or ``"test"``).
  """

  def __init__(self, workdir: str, writer: reporting.MetricsWriter, progress: reporting.ProgressBar, keeper,
               history: dict, num_classes: int, data_state: Callable[[], dict], eval_split: str):
    self.workdir, self.writer, self.progress, self.keeper = workdir, writer, progress, keeper
    self.history, self.data_state, self.eval_split = history, data_state, eval_split
    self.diverged_loss = DIVERGED_LOSS_FACTOR * math.log(max(num_classes, 2))
    self.pending: list[tuple[int, dict]] = []   # step measurements not yet fetched from the device

  @staticmethod
  def new_history(restored: dict | None) -> dict:
    """The run's history: restored from a checkpoint (older layouts converted), or a new one.

    Args:
      restored: the checkpoint's ``history``, or ``None``.

    Returns:
      ``{"best_eval_accuracy", "snapshots", "actions_done", "timing"?}``.
    """
    history = dict(restored or {})
    history.setdefault("best_eval_accuracy", history.pop("best_test_accuracy", 0.0))
    history.setdefault("snapshots", history.pop("quantizers", []))
    done = history.setdefault("actions_done", {})
    refreshed_at = history.pop("refreshed_at", -1)   # before 0.2.0: the delta refresh's last step
    if refreshed_at >= 0:
      done.setdefault("ewgs/delta_refresh", refreshed_at)
    return history

  def record(self, step: int, measurements: dict) -> None:
    """Keeps a step's measurements (device arrays) until the next :meth:`flush`."""
    self.pending.append((step, measurements))

  def flush(self) -> None:
    """Fetches the pending measurements and logs their means; a non-finite or diverged loss stops
    the run (``FloatingPointError``) before anything else is saved."""
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    for (at, _), m in zip(self.pending, fetched):
      loss = float(m["loss"])
      if not math.isfinite(loss) or loss > self.diverged_loss:
        self.keeper.wait_until_finished()
        what = "non-finite training loss" if not math.isfinite(loss) else "training diverged: loss"
        advice = workdir_guard.config_change_advice(self.workdir, "lower the learning rate, or check the data")
        raise FloatingPointError(f"{what} ({loss:.4g}) at step {at}; stopping. {advice}")
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    self.writer.write(self.pending[-1][0], "train", means)
    self.progress.update(self.pending[-1][0], loss=means["loss"], accuracy=means["accuracy"])
    self.pending = []

  def evaluate(self, evaluate_split: Callable[[str], dict], step: int, epoch: float) -> dict:
    """Evaluates on the run's evaluation split, logs it and tracks the best accuracy.

    Args:
      evaluate_split: ``split -> {"loss", "accuracy"}``.
      step: the number of steps done.
      epoch: the epoch it corresponds to.

    Returns:
      The results.
    """
    self.flush()
    results = evaluate_split(self.eval_split)
    self.history["best_eval_accuracy"] = max(self.history["best_eval_accuracy"], results["accuracy"])
    self.writer.write(step, self.eval_split, results)
    self.progress.message(f"epoch {epoch:g}: {self.eval_split} accuracy {results['accuracy']:.4f}, "
                          f"loss {results['loss']:.4f}")
    return results

  def snapshot(self, variables: dict, step: int, epoch: float, reason: str) -> None:
    """Logs every quantizer's scalar parameters and deltas; after a rule's action also keeps them in
    the history (``deltas.png``, EWGS Fig. 3).

    Args:
      variables: the model's variables.
      step: the number of steps done.
      epoch: the epoch it corresponds to.
      reason: ``"eval"`` or the action's name (``"ewgs/delta_refresh"``).
    """
    snapshot = quantizer_snapshot(variables)
    if reason != "eval":
      self.history["snapshots"].append({"step": step, "epoch": epoch, "reason": reason, "quantizers": snapshot})
    self.writer.write_quantizers(step, snapshot, reason=reason)

  def save(self, state: Any, step: int, timing: dict, eval_accuracy: float | None = None) -> None:
    """Saves a checkpoint with the data position and the history (once per step).

    Args:
      state: the training state.
      step: the number of steps done.
      timing: the run's clock totals, kept in the history.
      eval_accuracy: the evaluation accuracy at this step, if evaluated (the best checkpoint).
    """
    if self.keeper.latest_step() == step:     # already saved at this step (e.g. preempted at an epoch end)
      return
    self.flush()
    self.history["timing"] = timing
    # a copy: orbax writes the JSON in a background thread while the loop goes on changing the history
    self.keeper.save(step, state, extra={"data": self.data_state(), "history": copy.deepcopy(self.history)},
                     metrics=None if eval_accuracy is None else {"eval_accuracy": eval_accuracy})


def evaluator(eval_step: Callable, batches: Callable[[str], Iterable[dict]], mesh) -> Callable:
  """``evaluate(state, split) -> {"loss", "accuracy"}`` over a whole split.

  Args:
    eval_step: the jitted evaluation step.
    batches: ``split -> host batches`` (padded, with ``mask``).
    mesh: the device mesh.

  Returns:
    The function.
  """
  def evaluate(state, split: str) -> dict:
    totals = np.zeros(3)
    for batch in batches(split):
      out = jax.device_get(eval_step(state, parallel.shard_batch(batch, mesh)))
      totals += [out["loss_sum"], out["correct"], out["count"]]
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
  return evaluate


def run_rule_actions(qat, state, step: int, books: Bookkeeper, timer: reporting.RunTimer, *, loss_fn: Callable,
                     key, batches: Callable, mesh) -> tuple[Any, bool]:
  """Runs the rules' actions due before ``step`` (EWGS's delta refresh) through the public QAT API,
  as a pause of the training clock; each finished action is logged, snapshotted and remembered in
  the history (so a resume at the same step does not run it again).

  Args:
    qat: the rules' machinery (``None``: full precision, nothing to do).
    state: the training state.
    step: the number of steps done.
    books: the bookkeeper (history, writer, progress).
    timer: the run's clocks.
    loss_fn: ``loss_fn(variables, batch)``: the training loss without the per-step context.
    key: the run's action key (folded with the step).
    batches: ``batches(step, due_action) -> iterable`` of sharded batches.
    mesh: the device mesh (the new rule state is replicated on it).

  Returns:
    ``(state, whether an action was due)``.
  """
  history = books.history
  pending = [d for d in qat.due(step) if history["actions_done"].get(d.name) != step] if qat is not None else []
  if not pending:
    return state, False
  with timer.paused(sync=state) as pause:
    books.progress.message(f"step {step}: {', '.join(d.action.describe or d.name for d in pending)} ...")
    variables, results = qat.run_due(step, state.variables(), loss_fn, functools.partial(batches, step),
                                     jax.random.fold_in(key, step), stop=workdir_guard.stop_requested,   # polled
                                     skip=[d.name for d in qat.actions if d not in pending])
    state = state.replace(quant_state=parallel.replicate(variables[names.QUANT_STATE], mesh))
    books.writer.write(step, "qat", results)
    for d in pending:
      if results.get(d.name):
        history["actions_done"][d.name] = step
        books.snapshot(state.variables(), step, step / qat.steps_per_epoch, d.name)
  books.progress.message(f"step {step}: done in {pause['seconds']:.1f} s")
  return state, True
