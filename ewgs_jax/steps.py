"""The training program's state, optimiser, loss and jitted steps (module level, as the Flax examples).

``train_step`` and ``eval_step`` return a dict of measurements; every key reaches the metrics file
and TensorBoard with no further edit (the comparison plots the rules' declared traces from there),
and the rules' per-step factors
(:meth:`ewgs_jax.qat.QAT.metrics`) are just more keys. The per-step quantization context comes from
the public QAT API (:class:`ewgs_jax.qat.QAT`), as in any user's loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ewgs_jax import initialization, names, parallel
from ewgs_jax.layers import QuantContext
from ewgs_jax.losses import cross_entropy
from ewgs_jax.qat import QAT

#: ``prepare(batch, *, train) -> batch``: what the device does to a host batch before the model sees it
#: (uint8 -> normalised float, augmentation: :func:`ewgs_jax.data.device_transform`); the identity by default.
Prepare = Callable[..., dict]


def identity(batch: dict, *, train: bool) -> dict:
  """The default :data:`Prepare`: the batch as it came.

  Args:
    batch: a host batch.
    train: whether it is a training batch.

  Returns:
    ``batch``.
  """
  del train
  return batch


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a plain pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  batch_stats: Any
  quant_state: Any
  opt_state: Any

  def variables(self) -> dict:
    """The model's variables: ``params``, ``batch_stats``, ``quant_state``."""
    return {names.PARAMS: self.params, names.BATCH_STATS: self.batch_stats, names.QUANT_STATE: self.quant_state}


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """Network weights and quantizer parameters get separate optimisers (EWGS Sec. 4.1).

  Weights: Adam (CIFAR ResNet-20) or SGD with momentum 0.9 (ImageNet), with coupled L2 weight
  decay on every network parameter as PyTorch's ``weight_decay`` does in the reference code.
  Quantizer parameters (bounds, output scale, PACT clip, LSQ step): Adam, no weight decay. Both
  decay to 0 with a cosine schedule over the run: per step (``lr_schedule="cosine"``), or held
  constant within each epoch as the official code's per-epoch scheduler (``"cosine_epochs"``).

  Args:
    config: the run's config (``optimizer``, ``learning_rate``, ``momentum``, ``nesterov``,
      ``weight_decay``, ``quant_learning_rate``, ``lr_schedule``).
    total_steps: the run's training steps, the cosine schedules' length.
    steps_per_epoch: steps in one epoch (for ``"cosine_epochs"``).

  Returns:
    An ``optax.multi_transform`` labelling quantizer parameters ``"quant"``, the rest ``"weights"``.
  """
  def lr(base):
    if config.lr_schedule == "cosine":
      return optax.cosine_decay_schedule(base, total_steps)
    if config.lr_schedule == "cosine_epochs":
      epochs = -(-total_steps // steps_per_epoch)
      per_epoch = optax.cosine_decay_schedule(base, epochs)
      return lambda count: per_epoch(count // steps_per_epoch)
    return base

  if config.optimizer == "adam":
    weights = optax.adam(lr(config.learning_rate))
  else:
    weights = optax.sgd(lr(config.learning_rate), momentum=config.momentum, nesterov=config.nesterov)
  weights = optax.chain(optax.add_decayed_weights(config.weight_decay), weights)
  quant = optax.adam(lr(config.quant_learning_rate))

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "quant" if names.is_quantizer_param(path) else "weights", params)

  return optax.multi_transform({"weights": weights, "quant": quant}, labels)


def classification_loss(model, variables: dict, batch: dict, ctx: QuantContext | None = None):
  """The mean softmax cross-entropy of ``model`` in training mode (BatchNorm on batch statistics).

  Args:
    model: the model (called as ``model.apply(variables, images, train=True, ctx=ctx)``).
    variables: its variables.
    batch: ``image`` and ``label`` (already prepared for the device).
    ctx: the per-step quantization context (``None``: no replacement, per-step factors 0).

  Returns:
    ``(loss, (accuracy, new batch_stats))``.
  """
  logits, updates = model.apply(variables, batch["image"], train=True, ctx=ctx, mutable=[names.BATCH_STATS])
  loss, accuracy = cross_entropy(logits, batch["label"])
  return loss, (accuracy, updates.get(names.BATCH_STATS, variables.get(names.BATCH_STATS)))


def action_loss(model, prepare: Prepare = identity) -> Callable[[dict, dict], jax.Array]:
  """The loss the rules' actions (EWGS's delta refresh) differentiate: the training loss without
  the per-step context, on prepared batches (:meth:`ewgs_jax.qat.QAT.run_due`'s ``loss_fn``).

  Args:
    model: the model.
    prepare: the device-side batch transform.

  Returns:
    ``loss(variables, batch) -> scalar``.
  """
  def loss(variables, batch):
    return classification_loss(model, variables, prepare(batch, train=True))[0]
  return loss


def train_step(state: TrainState, batch: dict, key: jax.Array, *, model, tx: optax.GradientTransformation,
               qat: QAT | None, prepare: Prepare = identity) -> tuple[TrainState, dict]:
  """One optimisation step.

  Args:
    state: the training state.
    batch: a host batch (prepared on the device here).
    key: the run's replacement key (folded with the step by :meth:`~ewgs_jax.qat.QAT.context`).
    model: the model.
    tx: the optimiser.
    qat: the rules' machinery (``None``: full precision).
    prepare: the device-side batch transform.

  Returns:
    ``(new state, measurements)``: ``loss``, ``accuracy`` and the rules' per-step factors.
  """
  ctx = qat.context(state.step, key) if qat is not None else None
  batch = prepare(batch, train=True)

  def loss_fn(params):
    return classification_loss(model, {**state.variables(), names.PARAMS: params}, batch, ctx)

  (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = dataclasses.replace(state, step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
  factors = qat.metrics(ctx) if qat is not None and ctx is not None else {}
  return state, {"loss": loss, "accuracy": accuracy, **factors}


def eval_step(state: TrainState, batch: dict, *, model, prepare: Prepare = identity) -> dict:
  """Sums of the loss and correct predictions over a padded evaluation batch.

  Args:
    state: the training state.
    batch: ``image``, ``label`` and ``mask`` (0 for padding rows).
    model: the model.
    prepare: the device-side batch transform.

  Returns:
    ``{"loss_sum", "correct", "count"}``.
  """
  batch = prepare(batch, train=False)
  logits = model.apply(state.variables(), batch["image"], train=False)
  loss_sum, correct = cross_entropy(logits, batch["label"], batch["mask"])
  return {"loss_sum": loss_sum, "correct": correct, "count": batch["mask"].sum()}


def compile_steps(model, tx, qat: QAT | None, mesh, prepare: Prepare = identity):
  """``train_step`` and ``eval_step`` under ``jax.jit``: batch sharded over the ``data`` axis, state
  replicated (and donated by the train step).

  Args:
    model: the model.
    tx: the optimiser.
    qat: the rules' machinery (``None``: full precision).
    mesh: the device mesh.
    prepare: the device-side batch transform.

  Returns:
    ``(train(state, batch, key) -> (state, measurements), evaluate(state, batch) -> sums)``.
  """
  replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  train = jax.jit(functools.partial(train_step, model=model, tx=tx, qat=qat, prepare=prepare),
                  in_shardings=(replicated, batch_sharded, replicated), out_shardings=(replicated, replicated),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model, prepare=prepare),
                     in_shardings=(replicated, batch_sharded), out_shardings=replicated)
  return train, evaluate


def initial_state(model, tx, rng, images, fp_variables: dict | None = None) -> TrainState:
  """The state at step 0: a data-driven initialisation on ``images`` (EWGS Sec. 4.1), warm-started
  from full-precision variables when given.

  Args:
    model: the model.
    tx: the optimiser.
    rng: the initialisation key.
    images: a real training batch (prepared).
    fp_variables: a full-precision run's ``params`` / ``batch_stats``, or ``None``.

  Returns:
    The :class:`TrainState`.
  """
  if fp_variables is None:
    variables = initialization.init_variables(model, rng, images)
  else:
    variables = initialization.warm_start(model, fp_variables, rng, images)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables[names.PARAMS],
                    batch_stats=variables.get(names.BATCH_STATS, {}),
                    quant_state=variables.get(names.QUANT_STATE, {}), opt_state=tx.init(variables[names.PARAMS]))
