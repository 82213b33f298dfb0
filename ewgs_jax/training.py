"""The training program: ``train_and_evaluate(config, workdir)``, readable top to bottom.

Sections: state and optimisers; the jitted steps; the loop. One ``jax.jit`` per step function
with ``NamedSharding`` over a 1-D ``data`` mesh (batch sharded, state replicated, state donated);
BatchNorm therefore normalises over the global batch with no ``axis_name``. Multi-host runs call
``jax.distributed.initialize`` (``config.distributed``) and each process feeds its own rows.

Per step, PEGE's replacement rate p_T and mu_T (PEGE Eq. 4 and Sec. 3.2) come from the step
counter inside the jitted step; EWGS's delta (EWGS Eq. 10) is refreshed between epochs by
:mod:`ewgs_jax.hessian` and lives in the ``quant_state`` collection. Which of this machinery runs
follows the backward rules the model's layers resolve to (:func:`ewgs_jax.initialization.rules_in_use`,
per-layer rules included), not the global ``quant.backward``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ewgs_jax import checkpoints, config as config_lib, data, estimators, hessian, initialization, layers, models
from ewgs_jax import names, parallel, reporting, schedules
from ewgs_jax.losses import cross_entropy

log = logging.getLogger(__name__)
RUNTIME_KEYS = ("distributed", "progress_bar", "data_workers", "host_allocator")   # not part of what defines a run
DIVERGED_LOSS_FACTOR = 100.0   # a training loss above this many times chance level (ln C) has diverged


# --- state and optimisers ----------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a plain pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  batch_stats: Any
  quant_state: Any
  opt_state: Any

  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats, "quant_state": self.quant_state}


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Network weights and quantizer parameters get separate optimisers (EWGS Sec. 4.1).

  Weights: Adam (CIFAR ResNet-20) or SGD with momentum 0.9 (ImageNet), with coupled L2 weight
  decay on every network parameter as PyTorch's ``weight_decay`` does in the reference code.
  Quantizer parameters (bounds, output scale, PACT clip, LSQ step): Adam, no weight decay. Both
  decay to 0 with a cosine schedule over the run.

  Args:
    config: the run's config (``optimizer``, ``learning_rate``, ``momentum``, ``nesterov``,
      ``weight_decay``, ``quant_learning_rate``, ``lr_schedule``).
    total_steps: the run's training steps, the cosine schedules' length.

  Returns:
    An ``optax.multi_transform`` labelling quantizer parameters ``"quant"``, the rest ``"weights"``.
  """
  def lr(base):
    return optax.cosine_decay_schedule(base, total_steps) if config.lr_schedule == "cosine" else base

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


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model named by the config, quantized as ``config.quant`` says (``None``: full precision).

  Args:
    config: the run's config.
    num_classes: the dataset's number of classes.

  Returns:
    The (unbound) Flax module; bfloat16 computation when ``config.half_precision``.
  """
  quant = None
  if config.quant.enabled:
    q = config.quant
    quant = layers.QuantConfig(
        weight=layers.QuantizerSpec(method=q.weight_method, backward=q.backward, bits=q.weight_bits),
        act=layers.QuantizerSpec(method=q.act_method, backward=q.backward, bits=q.act_bits),
        quantize_first_last=q.quantize_first_last,
        rules=tuple((pattern, dict(overrides)) for pattern, overrides in q.rules),
        replacement_granularity=config.pege.granularity, pege_mu_scale=config.pege.mu_scale,
        context_factor_on=config.pege.mu_on)
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  return models.get_model(config.model, num_classes=num_classes, quant=quant, dtype=dtype,
                          conv_impl=config.conv_impl, **config.model_kwargs.to_dict())


def pege_schedules(config, total_steps: int, rules_in_use):
  """(p_T, mu_T) as functions of the step (PEGE Eq. 4 and Sec. 3.2) for the rules the layers use.

  Args:
    config: the run's config (``config.pege`` holds the schedules).
    total_steps: the run's length.
    rules_in_use: names of the backward rules some layer resolves to.

  Returns:
    ``(rate_fn, mu_fn)``: ``config.pege``'s when a rule in use has replacement / a ``context``
    factor ``mu``; otherwise rate 1 (no replacement) / mu 0.
  """
  rules = [estimators.get_rule(name) for name in rules_in_use]
  rate_fn, mu_fn = config_lib.pege_schedules(config.pege, total_steps)
  if not any(r.replacement for r in rules):
    rate_fn = schedules.constant_rate(1.0)
  if not any(r.source == "context" and r.factor == "mu" for r in rules):
    mu_fn = schedules.constant_mu(0.0)
  return rate_fn, mu_fn


def refreshes_deltas(rules_in_use) -> bool:
  """Whether some rule in use reads its factor from ``quant_state`` (EWGS delta), so needs the refresh.

  Args:
    rules_in_use: names of the backward rules some layer resolves to.

  Returns:
    True if the Hessian (or fixed) delta refresh must run.
  """
  return any(estimators.get_rule(name).source == "quant_state" for name in rules_in_use)


# --- the jitted steps --------------------------------------------------------------------------


def task_loss(logits, labels):
  """The loss training minimises, as the Hessian code takes it (``cross_entropy``'s mean).

  Args:
    logits: ``[batch, classes]``.
    labels: ``[batch]`` integers.

  Returns:
    The mean softmax cross-entropy (float32 scalar).
  """
  return cross_entropy(logits, labels)[0]


def make_steps(model, tx, config, mesh, total_steps: int, rules_in_use, prepare=None):
  """Jitted train and eval steps.

  The per-step context (mu_T, p_T, the replacement key) follows the rules the layers resolve to
  (``rules_in_use``, from :func:`ewgs_jax.initialization.rules_in_use`), not ``quant.backward``.

  Args:
    model: the model.
    tx: the optimiser.
    config: the run's config.
    mesh: the device mesh.
    total_steps: the run's length (the schedules' ramps are fractions of it).
    rules_in_use: names of the backward rules some layer of ``model`` resolves to.
    prepare: ``prepare(batch, train=...)`` run first in each step, on the device: the input
      pipeline's :func:`ewgs_jax.data.device_transform` (uint8 -> augmented, normalised float);
      ``None`` for batches that are already float.

  Returns:
    ``(train_step(state, batch, key) -> (state, metrics), eval_step(state, batch) -> sums)``.
  """
  replicated, batch_sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  rate_fn, mu_fn = pege_schedules(config, total_steps, rules_in_use)
  replaces = any(estimators.get_rule(name).replacement for name in rules_in_use)

  def train_step(state: TrainState, batch, key):
    if prepare is not None:
      batch = prepare(batch, train=True)
    rate, mu = rate_fn(state.step), mu_fn(state.step)
    ctx = layers.QuantContext(mu=mu, rate=rate, key=jax.random.fold_in(key, state.step) if replaces else None)

    def loss_fn(params):
      variables = {**state.variables(), "params": params}
      logits, new_model_state = model.apply(variables, batch["image"], train=True, ctx=ctx,
                                            mutable=["batch_stats"])
      loss, accuracy = cross_entropy(logits, batch["label"])
      return loss, (accuracy, new_model_state.get("batch_stats", state.batch_stats))

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    metrics = {"loss": loss, "accuracy": accuracy}
    if replaces:   # p_T and mu_T mean something only for PEGE
      metrics.update(rate=rate, mu=mu)
    return state, metrics

  def eval_step(state: TrainState, batch):
    if prepare is not None:
      batch = prepare(batch, train=False)
    logits = model.apply(state.variables(), batch["image"], train=False)
    loss_sum, correct = cross_entropy(logits, batch["label"], batch["mask"])
    return {"loss_sum": loss_sum, "correct": correct, "count": batch["mask"].sum()}

  train = jax.jit(train_step, in_shardings=(replicated, batch_sharded, replicated),
                  out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(replicated, batch_sharded), out_shardings=replicated)
  return train, evaluate


# --- the loop ----------------------------------------------------------------------------------


def _quantizer_snapshot(state: TrainState) -> dict[str, dict[str, float]]:
  """Per quantized layer: its scalar quantizer parameters (l, u, alpha, ...) and deltas."""
  snapshot: dict[str, dict[str, float]] = {}
  host = parallel.to_host({"params": state.params, "quant_state": state.quant_state})

  def visit(path, leaf):
    keys = names.path_keys(path)
    if (names.is_quantizer_param(keys) or names.is_delta(keys[-1])) and np.size(leaf) == 1:
      snapshot.setdefault("/".join(keys[1:-1]), {})[keys[-1]] = float(np.asarray(leaf).reshape(()))

  jax.tree_util.tree_map_with_path(visit, host)
  return snapshot


def warm_start_source(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The full-precision variables a QAT run starts from: its own copy, else ``init_from`` (then
  copied into the run, so that it resumes even if ``init_from`` is moved or deleted).

  Args:
    config: the run's config (``init_from``, ``quant.enabled``).
    workdir: the run's directory.

  Returns:
    The ``params`` (and ``batch_stats``) to warm start from, or ``None`` when the run is not a
    quantized one with ``init_from``.
  """
  if not (config.init_from and config.quant.enabled):
    return None
  variables = checkpoints.load_warm_start(workdir)
  if variables is None:
    variables = checkpoints.load_variables(config.init_from)
    checkpoints.save_warm_start(workdir, variables, config.init_from)
  return variables


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def enable_deterministic_ops(environ=os.environ) -> None:
  """Adds XLA's deterministic-GPU-ops flag to ``XLA_FLAGS`` (call before JAX starts its backend).

  On a GPU, reductions (e.g. in convolution gradients) may otherwise run in a different order
  from one run to the next, so a killed-and-resumed run is not bit-identical to an uninterrupted
  one. No effect on CPU, whose results are already reproducible.

  Args:
    environ: the environment to change (default: ``os.environ``).
  """
  flags = environ.get("XLA_FLAGS", "")
  if DETERMINISTIC_FLAG not in flags.split():
    environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()


def deterministic_ops_enabled(environ=os.environ) -> bool:
  """Whether ``XLA_FLAGS`` in ``environ`` holds XLA's deterministic-GPU-ops flag.

  Args:
    environ: the environment to read (default: ``os.environ``).

  Returns:
    ``True`` if the flag is set.
  """
  return DETERMINISTIC_FLAG in environ.get("XLA_FLAGS", "").split()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config.model`` on ``config.dataset`` in ``workdir``, resuming if it holds a run.

  The workdir is locked for the run.

  Args:
    config: the run's config (validated here).
    workdir: the run's directory: checkpoints, metrics, summary and plots.

  Returns:
    The summary also written to ``workdir/summary.json`` (``summary["preempted"]``: stopped early
    by SIGTERM or Ctrl-C after saving; re-running resumes).
  """
  with contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack) -> dict:
  # 1. Setup. Everything that can fail on bad input fails here, before anything compiles.
  config_lib.validate(config)
  parallel.maybe_initialize_distributed(config.distributed)
  if jax.process_index() == 0:
    cleanup.enter_context(checkpoints.WorkdirLock(workdir))
  if config.matmul_precision != "default":    # traced (and so compiled) under this precision
    cleanup.enter_context(jax.default_matmul_precision(config.matmul_precision))
  if config.deterministic and not deterministic_ops_enabled():
    log.warning("config.deterministic is set but XLA_FLAGS lacks %s: set it before JAX starts (train.py does)",
                DETERMINISTIC_FLAG)
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.batch_size, mesh)
  parallel.check_batch_divisible(config.eval_batch_size, mesh, "eval batch size")
  # Per-process and cosmetic settings may differ between processes and between a run and its resume.
  # A run with its own warm-start copy never reads init_from again, so init_from may change.
  has_copy = os.path.exists(os.path.join(workdir, checkpoints.WARM_START_FILE))
  checkpoints.save_or_check_config(workdir, {k: v for k, v in config.to_dict().items() if k not in RUNTIME_KEYS},
                                   ignore=("init_from",) if has_copy else ())
  checkpoints.install_preemption_handler()
  cleanup.callback(checkpoints.uninstall_preemption_handler)
  subset = data.Split(validation=config.validation_examples, train_limit=config.train_examples)
  info = data.check_splits(config.dataset, config.data_dir, subset)   # every split the run reads, now
  prepare = data.device_transform(data.device_spec(info, augment=config.augment))   # uint8 -> float, on device
  prepare_batch = jax.jit(prepare, static_argnames="train")

  def train_iterator(batch_size, seed):
    return data.make_train_iterator(config.dataset, global_batch_size=batch_size, seed=seed,
                                    data_dir=config.data_dir, augment=config.augment,
                                    workers=config.data_workers, subset=subset)

  train_iter = train_iterator(config.batch_size, config.seed)
  cleanup.callback(train_iter.close)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = steps_per_epoch * config.num_epochs
  if config.num_train_steps > 0:
    total_steps = min(total_steps, config.num_train_steps)
  model = build_model(config, info.num_classes)
  first_batch = prepare_batch(parallel.shard_batch(train_iter.batch_at(0, 0), mesh), train=True)
  initialization.check_rules(model, first_batch["image"])
  rules_in_use = initialization.rules_in_use(model, first_batch["image"])
  if refreshes_deltas(rules_in_use) and config.delta.mode == "hessian":
    parallel.check_batch_divisible(config.delta.batch_size, mesh, "delta batch size")
  resuming = bool(checkpoints.committed_steps(workdir))
  fp_variables = None if resuming else warm_start_source(config, workdir)
  tx = make_optimizer(config, total_steps)
  train_step, eval_step = make_steps(model, tx, config, mesh, total_steps, rules_in_use, prepare)
  replicated = parallel.replicated(mesh)
  init_key, step_key, delta_key = jax.random.split(jax.random.key(config.seed), 3)
  if config.pege.rng_impl != "threefry2x32":   # replacement masks from a cheaper PRNG (one per element per step)
    step_key = jax.random.key(config.seed, impl=config.pege.rng_impl)

  # 2. State: the latest checkpoint, or a data-driven initialisation (EWGS Sec. 4.1) on the first
  # training batch, warm-started from a full-precision run when ``init_from`` is set.
  @functools.partial(jax.jit, out_shardings=replicated)
  def init_state(rng, batch, fp_variables=None):
    if fp_variables is None:
      variables = initialization.init_variables(model, rng, batch["image"])
    else:
      variables = initialization.warm_start(model, fp_variables, rng, batch["image"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), quant_state=variables.get("quant_state", {}),
                      opt_state=tx.init(variables["params"]))

  keeper = checkpoints.CheckpointKeeper(workdir, max_to_keep=config.keep_checkpoints)
  cleanup.callback(keeper.close)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          jax.eval_shape(init_state, init_key, first_batch))
  restored = keeper.restore_latest(abstract)
  if restored is None:
    if fp_variables is None and resuming:   # every checkpoint was unreadable: start again
      fp_variables = warm_start_source(config, workdir)
    state, extra = init_state(init_key, first_batch, fp_variables), {}
  else:
    state, extra = restored
    train_iter.set_state(extra["data"])
  del first_batch
  history = extra.get("history", {"quantizers": [], "refreshed_at": -1})
  history.setdefault("best_eval_accuracy", history.pop("best_test_accuracy", 0.0))   # older checkpoints

  # 3. EWGS delta (EWGS Sec. 3.2): 0 until the first refresh, then every k epochs.
  # Runs when some layer's rule reads quant_state (per-layer rules included), whatever quant.backward says.
  policy = hessian.DeltaRefreshPolicy(mode=config.delta.mode if refreshes_deltas(rules_in_use) else "off",
                                      every_epochs=config.delta.every_epochs, fixed_delta=config.delta.fixed_value)
  estimator = hessian.make_trace_estimator(model, task_loss, mode=config.delta.hessian_mode,
                                           max_samples=config.delta.max_samples, tolerance=config.delta.tolerance,
                                           hvp=config.delta.hvp)

  def refresh_deltas(state, step):
    """Fresh batches (the first ``num_batches`` of a new pass, as the reference) -> new deltas."""
    delta_iter = train_iterator(config.delta.batch_size, config.seed + 1 + step)
    batches = [prepare_batch(parallel.shard_batch(delta_iter.batch_at(0, i), mesh), train=True)
               for i in range(config.delta.num_batches)]
    quant_state, _ = policy.refresh(estimator, state.variables(), batches, jax.random.fold_in(delta_key, step))
    return state.replace(quant_state=parallel.replicate(quant_state, mesh))

  # 4. The loop, with evaluation every epoch and checkpoints (data position included).
  step = int(state.step)
  finished = reporting.read_summary(workdir)
  if step >= total_steps and finished is not None and not finished.get("preempted"):
    reporting.announce(f"{workdir} already holds this run, finished at step {step}; nothing to do "
                       f"(summary.json kept)")
    return finished
  if restored is not None:
    reporting.announce(f"resumed from step {step} of {total_steps} in {workdir}")
  writer = reporting.MetricsWriter(workdir)
  cleanup.callback(writer.close)
  progress = reporting.ProgressBar(total_steps, config.batch_size, enabled=config.progress_bar)
  pending: list[tuple[int, dict]] = []   # step metrics not yet fetched from the device
  timer = reporting.RunTimer(config.batch_size, history.get("timing"), on_pause=progress.exclude)
  diverged_loss = DIVERGED_LOSS_FACTOR * math.log(max(info.num_classes, 2))

  def flush_metrics():
    """Fetches pending metrics; a non-finite loss stops the run before anything is saved."""
    nonlocal pending
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (at, _), m in zip(pending, fetched):
      loss = float(m["loss"])
      if not math.isfinite(loss) or loss > diverged_loss:
        keeper.wait_until_finished()
        last = keeper.latest_step()
        kept = (f"The last good checkpoint (step {last}) in {workdir} is kept" if last is not None
                else f"No checkpoint was saved in {workdir}")
        what = "non-finite training loss" if not math.isfinite(loss) else "training diverged: loss"
        raise FloatingPointError(
            f"{what} ({loss:.4g}) at step {at}; stopping. {kept}: lower the learning rate, or check the data.")
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    writer.write(pending[-1][0], "train", means)
    progress.update(pending[-1][0], loss=means["loss"], accuracy=means["accuracy"])
    pending = []

  def evaluate(state, split: str = subset.eval_split) -> dict:
    totals = np.zeros(3)
    for batch in data.make_eval_iterator(config.dataset, global_batch_size=config.eval_batch_size, split=split,
                                         data_dir=config.data_dir, subset=subset, workers=config.data_workers):
      out = jax.device_get(eval_step(state, parallel.shard_batch(batch, mesh)))
      totals += [out["loss_sum"], out["correct"], out["count"]]
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}

  def save(state, step, test_accuracy=None):
    if keeper.latest_step() == step:     # already saved at this step (e.g. preempted at an epoch end)
      return
    flush_metrics()
    history["timing"] = timer.totals(step)
    keeper.save(step, state, extra={"data": train_iter.get_state(), "history": history},
                metrics=None if test_accuracy is None else {"test_accuracy": test_accuracy})

  def stop_after_bookkeeping(state, step) -> bool:
    """Evaluation and checkpoints due at ``step``; True when the run must stop (preemption)."""
    if step % steps_per_epoch == 0 or step == total_steps:
      epoch = step / steps_per_epoch
      results = None
      if math.ceil(epoch) % config.eval_every_epochs == 0 or step == total_steps:
        flush_metrics()
        results = evaluate(state)
        history["best_eval_accuracy"] = max(history["best_eval_accuracy"], results["accuracy"])
        writer.write(step, subset.eval_split, results)
        progress.message(f"epoch {epoch:g}: {subset.eval_split} accuracy {results['accuracy']:.4f}, loss {results['loss']:.4f}")
        if config.quant.enabled:   # l, u, alpha (and delta) at every evaluation, for every rule
          writer.write_quantizers(step, _quantizer_snapshot(state), reason="eval")
      save(state, step, None if results is None else results["accuracy"])
    elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
      save(state, step)
    keeper.check_for_errors()            # a failed asynchronous save stops the run at once
    if checkpoints.preemption_requested() or keeper.reached_preemption(step):
      save(state, step)
      keeper.wait_until_finished()
      reporting.announce(f"stopped early: saved step {step} of {total_steps} in {workdir}; "
                         f"re-run the same command to resume")
      return True
    return False

  preempted = False
  while step < total_steps:
    if policy.should_refresh(step, steps_per_epoch) and history["refreshed_at"] != step:
      with timer.paused() as pause:
        progress.message(f"step {step}: refreshing EWGS delta ({config.delta.mode}) ...")
        state = refresh_deltas(state, step)
        history["refreshed_at"] = step
        snapshot = _quantizer_snapshot(state)
        history["quantizers"].append({"step": step, "epoch": step / steps_per_epoch, "quantizers": snapshot})
        writer.write_quantizers(step, snapshot, reason="delta_refresh")
      progress.message(f"step {step}: delta refreshed in {pause['seconds']:.1f} s")
    state, metrics = train_step(state, parallel.shard_batch(next(train_iter), mesh), step_key)
    step += 1
    pending.append((step, metrics))
    if not timer.started:                # time from the end of the first (compiling) step
      jax.block_until_ready(metrics)
      timer.start_training(step)
    if step % config.log_every_steps == 0:
      flush_metrics()
    with timer.paused():                 # evaluation, checkpoints, preemption: not training time
      if stop_after_bookkeeping(state, step):
        preempted = True
        break
  flush_metrics()
  jax.block_until_ready(state)
  timing = timer.totals(step)
  keeper.wait_until_finished()
  progress.close()

  # 5. Summary and plots.
  # With a validation split, the run is judged (best checkpoint, curves) on it; the test split is
  # evaluated once at the end, to be reported, never to choose anything.
  final = evaluate(state) if not preempted else {}
  eval_name = subset.eval_split
  summary = {
      f"final_{eval_name}_accuracy": final.get("accuracy"),
      f"final_{eval_name}_loss": final.get("loss"),
      f"best_{eval_name}_accuracy": max(history["best_eval_accuracy"], final.get("accuracy", 0.0)),
      "train_steps": step,
      "epochs": step / steps_per_epoch,
      "wall_time_s": timing["wall_time_s"],
      "train_images_per_s": reporting.RunTimer.images_per_s(timing),
      "preempted": preempted,
      "eval_split": subset.eval_split,
      "device": f"{jax.devices()[0].platform} {jax.devices()[0].device_kind} x {jax.device_count()}",
      "delta_refreshes": len(history["quantizers"]),
      "quantizers": {layer: {"bits": _layer_bits(model, layer), **values}
                     for layer, values in _quantizer_snapshot(state).items()},
      "config": config.to_dict(),
  }
  if eval_name != "test":
    test = evaluate(state, "test") if not preempted else {}
    summary.update(final_test_accuracy=test.get("accuracy"), final_test_loss=test.get("loss"))
  if jax.process_index() == 0:
    reporting.write_summary(workdir, summary)
    name = os.path.basename(os.path.normpath(workdir))
    reporting.write_plots(workdir, history["quantizers"], title=name)
    if not preempted:
      reporting.announce(reporting.final_message(workdir, summary))
  return summary


def _layer_bits(model, layer: str) -> dict[str, int | None]:
  setting = model.quant.resolve(layer) if getattr(model, "quant", None) is not None else None
  if setting is None:
    return {"weight": None, "act": None}
  return {"weight": setting.weight.bits if setting.weight.active else None,
          "act": setting.act.bits if setting.act.active else None}
