"""Input pipeline: uint8 batches from the host, augmentation and normalisation on the device.

One job per module:

* :mod:`~ewgs_jax.data.metadata`: :class:`DatasetInfo`, :class:`Split` (the validation hold-out),
  :class:`DataError`.
* :mod:`~ewgs_jax.data.sources`: random-access sources and the dataset REGISTRY
  (:func:`register`: a new dataset is one function plus one registration), :func:`get_dataset_info`,
  :func:`open_split`, :func:`check_splits` (every split a run reads, checked at start-up).
* :mod:`~ewgs_jax.data.datasets`: the built-in kinds: ``digits`` (bundled), ``mnist`` /
  ``fashion_mnist`` (IDX files, :mod:`~ewgs_jax.data.idx`, else tfds), ``npz:PATH``, any tfds name.
* :mod:`~ewgs_jax.data.host`: per-image host work (ImageNet-style decode, crop, flip), uint8 out.
* :mod:`~ewgs_jax.data.device`: :func:`device_transform`, the jittable uint8 -> normalised float
  step, with the pad-crop and flip keyed by (seed, epoch, step, global row); :func:`model_inputs`,
  the same for evaluation outside the steps.
* :mod:`~ewgs_jax.data.workers`: batches produced ahead by threads or grain worker processes.
* :mod:`~ewgs_jax.data.iterators`: :func:`make_train_iterator` (resumable from ``{"epoch",
  "step"}``) and :func:`make_eval_iterator`, each process reading only its own rows.

Figures (benchmarks/bench_input.py): benchmarks/README.md, "Input pipeline".
"""

from ewgs_jax.data import datasets as _datasets  # noqa: F401  (registers the built-in kinds)
from ewgs_jax.data.datasets import digits_source, npz_arrays
from ewgs_jax.data.device import DeviceSpec, device_spec, device_transform, model_inputs
from ewgs_jax.data.idx import IDX_FILES, read_idx
from ewgs_jax.data.iterators import (EvalBatches, TrainBatches, TrainIterator, make_eval_iterator,
                                     make_train_iterator, process_rows)
from ewgs_jax.data.metadata import MEAN_STD, DataError, DatasetInfo, Split
from ewgs_jax.data.sources import (REGISTRY, ArraySource, RecordSource, SubsetSource, check_splits,
                                   get_dataset_info, open_split, register)

__all__ = [
    "ArraySource", "DataError", "DatasetInfo", "DeviceSpec", "EvalBatches", "IDX_FILES", "MEAN_STD", "REGISTRY",
    "RecordSource", "Split", "SubsetSource", "TrainBatches", "TrainIterator", "check_splits", "device_spec",
    "device_transform", "model_inputs", "digits_source", "get_dataset_info", "make_eval_iterator", "make_train_iterator",
    "npz_arrays", "open_split", "process_rows", "read_idx", "register",
]
