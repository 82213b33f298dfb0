"""Post-training quantization (PTQ): a trained full-precision run quantized with data-driven ranges, no training.

The rule-free baseline of quantization-aware training: what the quantized network does with the
full-precision weights and quantizer parameters set from data alone. Every quantizer gets its
forward method's data-driven initialisation (EWGS Sec. 4.1 for the interval method: weights
``-+3 sigma(w)``, activations ``[min(x), 3 sigma(x) / sqrt(1 - 2/pi)]``; PACT, LSQ as
:mod:`ewgs_jax.quantizers` documents, where PACT's activation clip starts at a constant, not from data; per output channel when the config asks for per-channel weights,
``quant.weight_per_channel``), computed on a few calibration batches of *training* images at
once (never the evaluation split), layer by layer in order, so each layer is calibrated on the
already-quantized outputs of the layers before it. Unlike the QAT warm start
(:func:`ewgs_jax.initialization.warm_start`, BatchNorm on the batch's statistics as in the reference
code's train-mode initialisation) the calibration pass runs the network as it will be evaluated:
BatchNorm on the full-precision running statistics, no augmentation.

:func:`evaluate` returns a summary shaped like a training run's ``summary.json`` (``train_steps`` 0),
so that a comparison tabulates PTQ beside the QAT rules; :func:`quantize_run` gives the quantized
model and variables, which :func:`ewgs_jax.export.integer_model` turns into an integer model.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ewgs_jax import actions, checkpoints, data, names, reporting, training
from ewgs_jax.export import workdir as workdir_lib
from ewgs_jax.losses import cross_entropy

CALIBRATION_BATCHES = 4   # training batches of config.batch_size images


def calibration_images(config: ml_collections.ConfigDict, batches: int = CALIBRATION_BATCHES) -> np.ndarray:
  """The first ``batches`` training batches of the run's data, without augmentation (seeded by ``config.seed``).

  Args:
    config: the run's config (``dataset``, ``data_dir``, ``batch_size``, ``seed``, ``validation_examples``,
      ``train_examples``).
    batches: how many batches of ``config.batch_size``.

  Returns:
    The normalised float NHWC images, ``batches * batch_size`` of them (the training examples of the
    run's subset: held-out validation examples are never used).
  """
  if batches < 1:
    raise ValueError(f"PTQ needs at least one calibration batch, got {batches}")
  subset = data.Split(validation=config.validation_examples, train_limit=config.train_examples)
  iterator = data.make_train_iterator(config.dataset, global_batch_size=config.batch_size, seed=config.seed,
                                      data_dir=config.data_dir, augment=False, process_index=0, process_count=1,
                                      workers=1, subset=subset)
  batches = min(batches, iterator.steps_per_epoch)
  inputs = data.model_inputs(iterator.info)     # uint8 host batches -> the normalised floats the model sees
  return np.concatenate([np.asarray(inputs(iterator.batch_at(0, step))) for step in range(batches)])


def quantize(model, fp_variables: dict, images, rng=None) -> dict:
  """The quantized twin of full-precision variables, its quantizers calibrated on ``images`` (no training).

  Args:
    model: the quantized model (its ``quant`` setting: methods, bits, first/last layers).
    fp_variables: the full-precision ``params`` and ``batch_stats`` of the same architecture.
    images: the calibration images (one batch; every quantizer statistic is over all of them).
    rng: the key for any random initialiser (the data-driven ones use none); ``PRNGKey(0)`` by default.

  Returns:
    ``{"params", "batch_stats", "quant_state"}``: the full-precision weights and statistics, unchanged,
    plus every quantizer's calibrated parameters.
  """
  fp = {k: fp_variables[k] for k in (names.PARAMS, names.BATCH_STATS) if k in fp_variables}
  rng = jax.random.key(0) if rng is None else rng

  @jax.jit
  def calibrate(fp, images):
    _, variables = model.apply(fp, images, train=False, rngs={names.PARAMS: rng},
                               mutable=[names.PARAMS, names.QUANT_STATE])
    return variables

  variables = calibrate(fp, jnp.asarray(images))
  added = set(_flat_keys(variables[names.PARAMS])) - set(_flat_keys(fp[names.PARAMS]))
  if not added or not all(names.is_quantizer_param(k.split("/")) for k in added):
    raise ValueError("the full-precision variables do not match the quantized model: it created "
                     f"{sorted(k for k in added if not names.is_quantizer_param(k.split('/'))) or 'no quantizer'} "
                     "parameters of its own")
  return {names.PARAMS: variables[names.PARAMS], names.BATCH_STATS: fp.get(names.BATCH_STATS, {}),
          names.QUANT_STATE: variables.get(names.QUANT_STATE, {})}


def _flat_keys(tree) -> list[str]:
  return [names.path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_same_network(config, fp_config, fp_workdir: str) -> None:
  """The FP run must be the architecture and data the quantized config describes (the same hold-out:
  else its validation images may be ones the FP run trained on)."""
  keys = ("model", "dataset", "model_kwargs", "validation_examples")
  diffs = [f"{k}: {fp_config.get(k)!r} vs {config.get(k)!r}" for k in keys
           if _plain(fp_config.get(k)) != _plain(config.get(k))]
  if diffs:
    raise workdir_lib.RunError(f"{fp_workdir}: a different network from the config's ({'; '.join(diffs)})")


def _plain(value):
  value = value.to_dict() if hasattr(value, "to_dict") else value
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return list(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def quantize_run(fp_workdir: str, config: ml_collections.ConfigDict,
                 calibration_batches: int = CALIBRATION_BATCHES) -> tuple:
  """A finished full-precision run quantized as ``config`` says, calibrated on its training data.

  Args:
    fp_workdir: the full-precision run's directory.
    config: the quantized setting as a training config (``quant.*``: methods, bits, first/last; the
      model, dataset and data subset must be the FP run's).
    calibration_batches: how many training batches of ``config.batch_size`` calibrate the quantizers.

  Returns:
    ``(model, variables, info)``: the quantized model, its PTQ variables, and what was done
    (``source``, ``source_step``, ``calibration_images``).

  Raises:
    ewgs_jax.export.workdir.RunError: the FP run is missing, unfinished, quantized, unreadable or of
      another network.
  """
  if not config.quant.enabled:
    raise ValueError("PTQ needs a quantized config (quant.enabled=True): it says which methods and bits")
  run = workdir_lib.load_run(fp_workdir, quantized=False)
  _check_same_network(config, run.config, fp_workdir)
  info = data.get_dataset_info(config.dataset, data_dir=config.data_dir)
  model = training.build_model(config, info.num_classes)
  images = calibration_images(config, calibration_batches)
  variables = quantize(model, run.variables, images)
  return model, variables, {"source": os.path.abspath(fp_workdir), "source_step": run.step,
                            "calibration_images": int(len(images))}


def _evaluate_split(model, variables, config, split: str) -> dict:
  subset = data.Split(validation=config.validation_examples, train_limit=config.train_examples)
  step = jax.jit(lambda v, images, labels, mask: cross_entropy(model.apply(v, images, train=False), labels, mask))
  inputs = data.model_inputs(data.get_dataset_info(config.dataset, data_dir=config.data_dir))
  loss = correct = count = 0.0
  for batch in data.make_eval_iterator(config.dataset, global_batch_size=config.eval_batch_size, split=split,
                                       data_dir=config.data_dir, subset=subset, process_index=0, process_count=1):
    loss_sum, hits = jax.device_get(step(variables, inputs(batch), batch["label"], batch["mask"]))
    loss, correct, count = loss + float(loss_sum), correct + float(hits), count + float(batch["mask"].sum())
  return {"loss": loss / count, "accuracy": correct / count}


def _quantizer_values(model, variables) -> dict[str, dict]:
  """Per quantized layer, its bits and quantizer parameters (as a training summary lists them: per-channel
  ones as their mean, min and max, :func:`ewgs_jax.actions.quantizer_values`)."""
  values: dict[str, dict] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables[names.PARAMS]))[0]:
    keys = names.path_keys(path)
    if names.is_quantizer_param(keys) and np.size(leaf) > 0:
      layer = "/".join(keys[:-1])
      if layer not in values:
        setting = model.quant.resolve(layer)
        values[layer] = {"bits": {"weight": setting.weight.bits if setting.weight.active else None,
                                  "act": setting.act.bits if setting.act.active else None}}
      values[layer].update(actions.quantizer_values(keys[-1], leaf))
  return values


def evaluate(fp_workdir: str, config: ml_collections.ConfigDict, *, calibration_batches: int = CALIBRATION_BATCHES,
             workdir: str | None = None) -> dict:
  """PTQ of a full-precision run at ``config``'s setting, evaluated as training evaluates a run.

  Args:
    fp_workdir: the finished full-precision run.
    config: the quantized setting as a training config (the QAT runs' config: ``quant.*``, data,
      ``eval_batch_size``, ``validation_examples``).
    calibration_batches: how many training batches calibrate the quantizers.
    workdir: where to write ``summary.json`` (and read it back: a finished PTQ there with the same
      config and source is returned, not recomputed); nothing is written when ``None``.

  Returns:
    A dict with the keys of a training run's summary (``final_<split>_accuracy`` / ``_loss``,
    ``best_<split>_accuracy``, ``final_test_*`` with a validation split, ``train_steps`` 0, ``epochs``
    0, ``wall_time_s``, ``eval_split``, ``device``, ``quantizers``, ``config``, ...) plus ``ptq``:
    the source run, its step and the number of calibration images.
  """
  config_dict = config.to_dict()
  if workdir is not None:
    done = reporting.read_summary(workdir)
    if done is not None and _plain(done.get("config")) == _plain(config_dict) and \
        done.get("ptq", {}).get("source") == os.path.abspath(fp_workdir) and \
        done["ptq"].get("calibration_batches") == calibration_batches and \
        [done["ptq"].get("source_step")] == checkpoints.committed_steps(fp_workdir)[-1:]:   # not retrained since
      return done
  start = time.perf_counter()
  with training.matmul_precision(config):   # the precision the QAT runs beside it trained and evaluated at
    model, variables, info = quantize_run(fp_workdir, config, calibration_batches)
    subset = data.Split(validation=config.validation_examples, train_limit=config.train_examples)
    split = subset.eval_split
    final = _evaluate_split(model, variables, config, split)
  summary = {
      f"final_{split}_accuracy": final["accuracy"],
      f"final_{split}_loss": final["loss"],
      f"best_{split}_accuracy": final["accuracy"],
      "train_steps": 0,
      "epochs": 0.0,
      "train_images_per_s": None,
      "preempted": False,
      "eval_split": split,
      "device": reporting.device(),
      "environment": reporting.environment(),
      "rule_actions": {},   # no rule ran: nothing was trained
      "quantizers": _quantizer_values(model, variables),
      "config": config_dict,
      "ptq": {**info, "calibration_batches": calibration_batches},
  }
  if split != "test":
    with training.matmul_precision(config):
      test = _evaluate_split(model, variables, config, "test")
    summary.update(final_test_accuracy=test["accuracy"], final_test_loss=test["loss"])
  summary["wall_time_s"] = time.perf_counter() - start
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    reporting.write_summary(workdir, summary)
  return summary
