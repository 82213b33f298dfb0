"""The integer model measured against the fake-quantized model it came from, on a run's data.

:func:`logit_agreement` compares two sets of logits (predicted classes and the largest relative logit
error); :func:`compare_on_split` runs both models over a whole evaluation split.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from ewgs_jax import data


def logit_agreement(reference, candidate, mask=None) -> dict[str, float]:
  """How far ``candidate`` logits are from ``reference`` ones, per example.

  The relative error of an example is ``max_c |candidate - reference| / max_c |reference|``: its
  largest logit difference in units of its largest logit, so it means the same at any logit scale.

  Args:
    reference: ``[batch, classes]`` logits (the fake-quantized model's).
    candidate: ``[batch, classes]`` logits (the integer model's).
    mask: ``[batch]`` weights (1 real example, 0 padding); all ones when ``None``.

  Returns:
    ``{"agreement": fraction of equal predicted classes, "max_rel_logit_error": the largest
    per-example relative error, "count": number of examples}`` over the masked examples.
  """
  reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
  mask = np.ones(len(reference), bool) if mask is None else np.asarray(mask) > 0
  same = reference.argmax(-1) == candidate.argmax(-1)
  scale = np.maximum(np.abs(reference).max(-1), np.finfo(np.float32).tiny)
  rel = np.abs(candidate - reference).max(-1) / scale
  count = int(mask.sum())
  return {"agreement": float(same[mask].mean()) if count else float("nan"),
          "max_rel_logit_error": float(rel[mask].max(initial=0.0)), "count": count}


def compare_on_split(integer_forward: Callable, fake_forward: Callable, config, split: str | None = None) -> dict:
  """Both models over one split of the run's dataset (as training evaluates it: same batches, same subset).

  Args:
    integer_forward: ``images -> logits`` of the integer model.
    fake_forward: ``images -> logits`` of the fake-quantized model (jitted by the caller).
    config: the run's config (``dataset``, ``data_dir``, ``eval_batch_size``, ``validation_examples``,
      ``train_examples``).
    split: the split; the run's evaluation split when ``None``.

  Returns:
    ``{"split", "count", "agreement", "max_rel_logit_error", "accuracy" (the integer model's),
    "fake_quant_accuracy"}``.
  """
  subset = data.Split(validation=config.validation_examples, train_limit=config.train_examples)
  split = split or subset.eval_split
  fake_all: list[np.ndarray] = []
  int_all: list[np.ndarray] = []
  labels: list[np.ndarray] = []
  masks: list[np.ndarray] = []
  inputs = data.model_inputs(data.get_dataset_info(config.dataset, data_dir=config.data_dir))
  for batch in data.make_eval_iterator(config.dataset, global_batch_size=config.eval_batch_size, split=split,
                                       data_dir=config.data_dir, subset=subset, process_index=0, process_count=1):
    images = inputs(batch)       # uint8 host batches -> the normalised floats the model sees
    fake_all.append(np.asarray(jax.device_get(fake_forward(images))))
    int_all.append(np.asarray(jax.device_get(integer_forward(images))))
    labels.append(batch["label"])
    masks.append(batch["mask"] > 0)
  fake, integer, label, mask = (np.concatenate(a) for a in (fake_all, int_all, labels, masks))
  result = {"split": split, **logit_agreement(fake, integer, mask)}
  result["accuracy"] = float((integer.argmax(-1) == label)[mask].mean())
  result["fake_quant_accuracy"] = float((fake.argmax(-1) == label)[mask].mean())
  return result
