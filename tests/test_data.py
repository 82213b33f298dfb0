"""Input pipeline: bundled digits, tfds (mocked, offline), determinism, resume, host shards, eval."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ewgs_jax import data


def test_digits_ship_offline_with_fixed_split():
  info = data.get_dataset_info("digits")
  assert info.num_classes == 10 and info.image_shape == (8, 8, 1)
  train, test = data.digits_source("train"), data.digits_source("test")
  assert (len(train), len(test)) == (1437, 360)
  it = data.make_train_iterator("digits", global_batch_size=100, seed=0, augment=False)
  batch = next(it)
  assert batch["image"].shape == (100, 8, 8, 1) and batch["image"].dtype == np.float32
  assert set(np.unique(batch["label"])) <= set(range(10))
  # normalised with the training split's statistics: about zero mean and unit variance
  everything = np.concatenate([it.batch_at(0, s)["image"] for s in range(it.steps_per_epoch)])
  assert abs(everything.mean()) < 0.05 and abs(everything.std() - 1) < 0.05


def test_deterministic_and_each_example_once_per_epoch():
  a = data.make_train_iterator("digits", global_batch_size=128, seed=3)
  b = data.make_train_iterator("digits", global_batch_size=128, seed=3)
  c = data.make_train_iterator("digits", global_batch_size=128, seed=4)
  first = [next(a) for _ in range(3)]
  for x in first:
    y = next(b)
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(first[0]["label"], next(c)["label"])
  order = a._order(0)
  assert sorted(order.tolist()) == list(range(1437))
  assert not np.array_equal(order, a._order(1))   # reshuffled every epoch


def test_state_resumes_mid_epoch_and_across_epochs():
  it = data.make_train_iterator("digits", global_batch_size=128, seed=0)
  for _ in range(9):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]       # crosses into epoch 1 (11 steps per epoch)
  assert state == {"epoch": 0, "step": 9} and it.get_state() == {"epoch": 1, "step": 3}
  resumed = data.make_train_iterator("digits", global_batch_size=128, seed=0)
  resumed.set_state(state)
  for x in expected:
    y = next(resumed)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(processes):
  whole = data.make_train_iterator("digits", global_batch_size=128, seed=1)
  parts = [data.make_train_iterator("digits", global_batch_size=128, seed=1, process_index=i, process_count=processes)
           for i in range(processes)]
  for _ in range(2):
    g = next(whole)
    shards = [next(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), g["image"])
    np.testing.assert_array_equal(np.concatenate([s["label"] for s in shards]), g["label"])
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    data.make_train_iterator("digits", global_batch_size=128, seed=1, process_index=0, process_count=3)


def test_eval_iterator_counts_every_example_once():
  batches = list(data.make_eval_iterator("digits", global_batch_size=100))
  assert len(batches) == 4 and [b["image"].shape[0] for b in batches] == [100] * 4
  assert sum(b["mask"].sum() for b in batches) == 360
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, data.digits_source("test").labels)
  halves = [list(data.make_eval_iterator("digits", global_batch_size=100, process_index=i, process_count=2))
            for i in range(2)]
  assert sum(b["mask"].sum() for h in halves for b in h) == 360


def test_crop_and_flip():
  rng = np.random.default_rng(0)
  batch = rng.uniform(0.1, 1, (64, 6, 6, 1)).astype(np.float32)
  out = data.crop_and_flip(batch, np.random.default_rng(1), pad=2, flip=True)
  assert out.shape == batch.shape
  zero_rows = (out == 0).all(axis=(2, 3)).any(axis=1)     # some crops show the zero padding
  assert zero_rows.any()
  unshifted = data.crop_and_flip(batch, _FixedOffsets(pad=2), pad=2, flip=True)
  np.testing.assert_array_equal(unshifted, batch[:, :, ::-1])  # centre crop + flip = mirror


class _FixedOffsets:
  """A generator stand-in: centre offsets and flip everything."""

  def __init__(self, pad):
    self.pad = pad

  def integers(self, low, high, size):
    return np.full(size, self.pad)

  def random(self, n):
    return np.zeros(n)


def test_tfds_dataset_through_data_source_offline():
  with tfds.testing.mock_data(num_examples=96):
    info = data.get_dataset_info("cifar10")
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3) and info.augmentation == "crop_flip"
    it = data.make_train_iterator("cifar10", global_batch_size=32, seed=0)
    batch = next(it)
    assert batch["image"].shape == (32, 32, 32, 3) and it.steps_per_epoch == 3
    evals = list(data.make_eval_iterator("cifar10", global_batch_size=64))
    assert sum(b["mask"].sum() for b in evals) == 96


def test_unprepared_dataset_says_what_to_do(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  try:
    import tensorflow  # noqa: F401
    pytest.skip("TensorFlow is installed: the dataset would be prepared instead")
  except ImportError:
    pass
  with pytest.raises(RuntimeError, match=r"not prepared.*tfds build cifar10 --file_format=array_record"):
    data.make_train_iterator("cifar10", global_batch_size=32, seed=0, data_dir=str(tmp_path))
  with pytest.raises(RuntimeError, match=r"ILSVRC2012_img_train\.tar.*downloads/manual"):
    data.make_train_iterator("imagenet2012", global_batch_size=32, seed=0, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
    data.get_dataset_info("cifar11")


def test_imagenet_transforms_and_process_shards():
  info = data.DatasetInfo("imagenet2012", 1000, (224, 224, 3), *data.MEAN_STD["imagenet2012"])
  assert info.augmentation == "imagenet"
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 300, 400, 3), dtype=np.uint8)
  source = data.ArraySource(images, np.arange(8))
  evals = data.transform(list(images[:2]), info, None)
  assert evals.shape == (2, 224, 224, 3) and evals.dtype == np.float32
  # eval: shorter side to 256 (300x400 -> 256x341), centre 224 crop, deterministic
  np.testing.assert_array_equal(evals, data.transform(list(images[:2]), info, None))
  whole = data.TrainIterator(source, info, global_batch_size=4, seed=0)
  parts = [data.TrainIterator(source, info, global_batch_size=4, seed=0, process_index=i, process_count=2)
           for i in range(2)]
  g, shards = next(whole), [next(p) for p in parts]
  assert g["image"].shape == (4, 224, 224, 3)
  np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), g["image"])
  assert not np.array_equal(g["image"], data.TrainIterator(source, info, global_batch_size=4, seed=1).batch_at(0, 0)["image"])


def test_mnist_through_mock_data_is_grayscale():
  with tfds.testing.mock_data(num_examples=40):
    info = data.get_dataset_info("mnist")
    assert info.image_shape == (28, 28, 1) and len(info.mean) == 1 and info.augmentation == "crop"
    batch = next(data.make_train_iterator("mnist", global_batch_size=16, seed=0))
    assert batch["image"].shape == (16, 28, 28, 1) and batch["label"].dtype == np.int32
