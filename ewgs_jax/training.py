"""The training program: ``train_and_evaluate(config, workdir)``, readable top to bottom.

Sections: set up; model, optimiser and steps; state; the loop; summary. One ``jax.jit`` per step
function with ``NamedSharding`` over a 1-D ``data`` mesh (batch sharded, state replicated, state
donated); BatchNorm therefore normalises over the global batch with no ``axis_name``. Multi-host runs
call ``jax.distributed.initialize`` (``config.distributed``) and each process feeds its own rows.

The backward rules' machinery (PEGE's per-step mu_T and p_T, EWGS's delta refresh) runs through
the public QAT API (:class:`ewgs_jax.qat.QAT`) for the rules the model's layers resolve to
(per-layer overrides included), exactly as in a user's own loop; nothing here names a rule.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import jax
import ml_collections

from ewgs_jax import actions, checkpoints, config as config_lib, data, hooks, initialization, models
from ewgs_jax import parallel, reporting, steps, workdir as workdir_guard
from ewgs_jax.actions import due
from ewgs_jax.qat import QAT

log = logging.getLogger(__name__)
RUNTIME_KEYS = ("distributed", "progress_bar", "data_workers", "host_allocator")   # not part of what defines a run
# Stored with the run, but a resume may change them (with a warning): they decide what is logged,
# evaluated and kept, not what is trained.
RESUMABLE_CHANGES = ("log_every_steps", "keep_checkpoints", "checkpoint_every_steps", "eval_every_epochs")
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def matmul_precision(config: ml_collections.ConfigDict) -> contextlib.AbstractContextManager:
  """The run's ``matmul_precision`` as a context (what trains, evaluates, calibrates and exports under it).

  Args:
    config: the run's config.

  Returns:
    ``jax.default_matmul_precision(...)``, or a no-op for ``"default"``.
  """
  if config.get("matmul_precision", "default") == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(config.matmul_precision)


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The model named by the config, quantized as ``config.quant`` says (disabled: full precision).

  Args:
    config: the run's config.
    num_classes: the dataset's number of classes.

  Returns:
    The (unbound) Flax module; bfloat16 computation when ``config.half_precision``.
  """
  dtype = jax.numpy.bfloat16 if config.half_precision else jax.numpy.float32
  return models.get_model(config.model, num_classes=num_classes, quant=config_lib.quant_config(config), dtype=dtype,
                          conv_impl=config.conv_impl, **config.model_kwargs.to_dict())


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
    # --- Set up. Everything that can fail on bad input fails here, before anything compiles. ---
    config_lib.validate(config)
    parallel.maybe_initialize_distributed(config.distributed)
    if jax.process_index() == 0:
      cleanup.enter_context(workdir_guard.WorkdirLock(workdir))
    cleanup.enter_context(matmul_precision(config))   # traced (and so compiled) under this precision
    if config.deterministic and not deterministic_ops_enabled():
      log.warning("config.deterministic is set but XLA_FLAGS lacks %s: set it before JAX starts (train.py does)",
                  DETERMINISTIC_FLAG)
    mesh = parallel.make_mesh()
    for size, what in ((config.batch_size, "batch size"), (config.eval_batch_size, "eval batch size")):
      parallel.check_batch_divisible(size, mesh, what)
    # Per-process and cosmetic settings may differ between processes and between a run and its resume.
    # A run with its own warm-start copy never reads init_from again, so init_from may change.
    has_copy = os.path.exists(os.path.join(workdir, checkpoints.WARM_START_FILE))
    workdir_guard.save_or_check_config(workdir, {k: v for k, v in config.to_dict().items() if k not in RUNTIME_KEYS},
                                     ignore=RESUMABLE_CHANGES + (("init_from",) if has_copy else ()))
    workdir_guard.install_preemption_handler()
    cleanup.callback(workdir_guard.uninstall_preemption_handler)
    subset = data.Split(validation=config.validation_examples, train_limit=config.train_examples)
    info = data.check_splits(config.dataset, config.data_dir, subset)   # every split the run reads, now
    prepare = data.device_transform(data.device_spec(info, augment=config.augment))   # uint8 -> float, on device

    def train_batches(batch_size: int, seed: int):
      return data.make_train_iterator(config.dataset, global_batch_size=batch_size, seed=seed,
                                      data_dir=config.data_dir, augment=config.augment,
                                      workers=config.data_workers, subset=subset)

    def eval_batches(split: str):
      return data.make_eval_iterator(config.dataset, global_batch_size=config.eval_batch_size, split=split,
                                     data_dir=config.data_dir, subset=subset, workers=config.data_workers)

    train_iter = train_batches(config.batch_size, config.seed)
    cleanup.callback(train_iter.close)
    steps_per_epoch = train_iter.steps_per_epoch
    total_steps = steps_per_epoch * config.num_epochs
    if config.num_train_steps > 0:
      total_steps = min(total_steps, config.num_train_steps)

    # --- Model, optimiser, steps: one abstract trace of the initialisation says which layers are ---
    # quantized and with which rules; the rules' machinery follows from that (QAT).
    model = build_model(config, info.num_classes)
    tx = steps.make_optimizer(config, total_steps, steps_per_epoch)
    replicated = parallel.replicated(mesh)
    init_state = jax.jit(lambda rng, images, fp: steps.initial_state(model, tx, rng, images, fp),
                         out_shardings=replicated)
    first_images = jax.jit(prepare, static_argnames="train")(
        parallel.shard_batch(train_iter.batch_at(0, 0), mesh), train=True)["image"]
    resuming = bool(checkpoints.committed_steps(workdir))
    fp_variables = None if resuming else warm_start_source(config, workdir)
    init_key, step_key, action_key = jax.random.split(jax.random.key(config.seed), 3)
    with hooks.recording() as calls:
      abstract = jax.eval_shape(init_state, init_key, first_images, fp_variables)
    report = initialization.LayerReport.of(calls)
    report.check(model.quant if config.quant.enabled else None)
    qat = None
    if config.quant.enabled:
      qat = QAT(model.quant, total_steps=total_steps, steps_per_epoch=steps_per_epoch, rules=report.rules())
      log.info("quantized layers:\n  %s", "\n  ".join(report.lines()))
      for d in qat.actions:
        if d.action.batch_size:
          parallel.check_batch_divisible(d.action.batch_size, mesh, f"{d.name} batch size")
          if d.action.batch_size > len(train_iter.source):   # else it fails only when first due, epochs later
            raise ValueError(f"the {d.name} batch size {d.action.batch_size} exceeds the {len(train_iter.source)} "
                             f"training examples; lower it (python train.py --config_keys: config.{d.rule}.*)")
      if qat.key_impl != "threefry2x32":   # replacement masks from a cheaper PRNG (one per element per step)
        step_key = jax.random.key(config.seed, impl=qat.key_impl)
    train_step, eval_step = steps.compile_steps(model, tx, qat, mesh, prepare)
    evaluate = actions.evaluator(eval_step, eval_batches, mesh)
    action_loss = steps.action_loss(model, prepare)

    # --- State: the latest checkpoint, or a data-driven initialisation (EWGS Sec. 4.1) on the first ---
    # training batch, warm-started from a full-precision run when ``init_from`` is set.
    keeper = checkpoints.CheckpointKeeper(workdir, max_to_keep=config.keep_checkpoints)
    cleanup.callback(keeper.close)
    restored = keeper.restore_latest(jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract))
    if restored is None:
      if fp_variables is None and resuming:   # nothing restored after all: start from the initialisation
        fp_variables = warm_start_source(config, workdir)
      state, extra = init_state(init_key, first_images, fp_variables), {"data": None}
    else:
      state, extra = restored
      train_iter.set_state(extra["data"])
    del first_images
    step = int(state.step)
    finished = reporting.read_summary(workdir)
    if step >= total_steps and finished is not None and not finished.get("preempted"):
      reporting.announce(f"{workdir} already holds this run, finished at step {step}; nothing to do "
                         f"(summary.json kept)")
      return finished
    if restored is not None:
      reporting.announce(f"resumed from step {step} of {total_steps} in {workdir}")

    # --- The loop: the rules' due actions, a step, then the periodic actions when due. ---
    writer = reporting.MetricsWriter(workdir)
    cleanup.callback(writer.close)
    history = actions.Bookkeeper.new_history(extra.get("history"))
    timer = reporting.RunTimer(config.batch_size, history.get("timing"))
    progress = reporting.ProgressBar(total_steps, config.batch_size, enabled=config.progress_bar,
                                     clock=timer.training_seconds)
    books = actions.Bookkeeper(workdir, writer, progress, keeper, history, info.num_classes, train_iter.get_state,
                               subset.eval_split)
    evaluate_every = steps_per_epoch * config.eval_every_epochs
    preempted = False
    last_evaluation: tuple[int, dict] | None = None   # (step, results): the summary reuses the last step's
    while step < total_steps:
      state, acted = actions.run_rule_actions(qat, state, step, books, timer, loss_fn=action_loss, key=action_key,
                                              batches=functools.partial(_action_batches, train_batches, config, mesh),
                                              mesh=mesh)
      stop = acted and workdir_guard.preemption_requested()   # during a long action: save, do not train on
      trained = not stop
      if trained:
        state, measurements = train_step(state, parallel.shard_batch(next(train_iter), mesh), step_key)
        step += 1
        books.record(step, measurements)
        if not timer.started:              # time from the end of the first (compiling) step
          jax.block_until_ready(measurements)
          timer.start_training(step)
        if due(step, config.log_every_steps):
          books.flush()
        stop = workdir_guard.preemption_requested() or keeper.reached_preemption(step)
      epoch_end = trained and due(step, steps_per_epoch, total_steps)
      if epoch_end or due(step, config.checkpoint_every_steps) or stop:
        # evaluation, snapshots, checkpoints: not training time; the queued steps are (the pause waits for them)
        with timer.paused(sync=state):
          results = None
          if epoch_end and due(step, evaluate_every, total_steps):
            results = books.evaluate(lambda split: evaluate(state, split), step, step / steps_per_epoch)
            last_evaluation = (step, results)
            if config.quant.enabled:       # l, u, alpha (and delta) at every evaluation, for every rule
              books.snapshot(state.variables(), step, step / steps_per_epoch, "eval")
          books.save(state, step, timer.totals(step), None if results is None else results["accuracy"])
      keeper.check_for_errors()            # a failed asynchronous save stops the run at once
      if stop:
        keeper.wait_until_finished()
        reporting.announce(f"stopped early: saved step {step} of {total_steps} in {workdir}; "
                           f"re-run the same command to resume")
        preempted = True
        break
    books.flush()
    with timer.paused(sync=state):   # the last checkpoint's write is not training time
      keeper.wait_until_finished()
    progress.close()

    # --- Summary and plots. ---
    def evaluate_final(split: str) -> dict:
      if last_evaluation is not None and last_evaluation[0] == step and split == subset.eval_split:
        return last_evaluation[1]   # evaluated at this very step already (one pass, not two, over the split)
      return evaluate(state, split)

    summary = _summary(config, step, steps_per_epoch, timer.totals(step), history, report, qat, state, preempted,
                       evaluate_final, subset.eval_split)
    if jax.process_index() == 0:
      reporting.write_summary(workdir, summary)
      reporting.write_plots(workdir, history["snapshots"], title=os.path.basename(os.path.normpath(workdir)))
      if not preempted:
        reporting.announce(reporting.final_message(workdir, summary))
    return summary


def _summary(config, step: int, steps_per_epoch: int, timing: dict, history: dict, report, qat, state,
             preempted: bool, evaluate, eval_split: str) -> dict:
  """What ``summary.json`` holds. With a validation split, the run was judged (best checkpoint, curves)
  on it; the test split is evaluated once here, to be reported, never to choose anything."""
  final = evaluate(eval_split) if not preempted else {}
  summary = {
      f"final_{eval_split}_accuracy": final.get("accuracy"),
      f"final_{eval_split}_loss": final.get("loss"),
      f"best_{eval_split}_accuracy": max(history["best_eval_accuracy"], final.get("accuracy", 0.0)),
      "train_steps": step,
      "epochs": step / steps_per_epoch,
      "wall_time_s": timing["wall_time_s"],
      "train_images_per_s": reporting.RunTimer.images_per_s(timing),
      "preempted": preempted,
      "eval_split": eval_split,
      "device": reporting.device(),
      "environment": reporting.environment(),
      "rule_actions": {d.name: sum(s.get("reason") == d.name for s in history["snapshots"])
                       for d in (qat.actions if qat is not None else ())},
      "quantizers": {layer: {"bits": _layer_bits(report, layer), **values}
                     for layer, values in actions.quantizer_snapshot(state.variables()).items()},
      "config": config.to_dict(),
  }
  if eval_split != "test":
    test = evaluate("test") if not preempted else {}
    summary.update(final_test_accuracy=test.get("accuracy"), final_test_loss=test.get("loss"))
  return summary


def _action_batches(train_batches, config, mesh, step: int, d):
  """A rule action's batches: the first of a fresh pass over the training split, seeded by the step
  (as the reference draws its delta batches from a new data loader), sharded over the mesh; more
  batches than one pass holds continue into the next pass."""
  iterator = train_batches(d.action.batch_size or config.batch_size, config.seed + 1 + step)
  return (parallel.shard_batch(iterator.batch_at(*divmod(i, iterator.steps_per_epoch)), mesh)
          for i in range(max(d.action.num_batches, 1)))


def _layer_bits(report: initialization.LayerReport, layer: str) -> dict[str, int | None]:
  setting = report.quantized().get(layer)
  if setting is None:
    return {"weight": None, "act": None}
  return {"weight": setting.weight.bits if setting.weight.active else None,
          "act": setting.act.bits if setting.act.active else None}
