"""Input pipeline iterators: uint8 batches, order, determinism, resume, host shards, eval, hold-out."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from ewgs_jax import data


def test_digits_ship_offline_with_fixed_split():
  info = data.get_dataset_info("digits")
  assert info.num_classes == 10 and info.image_shape == (8, 8, 1) and info.pixel_max == 16
  train, test = data.digits_source("train"), data.digits_source("test")
  assert (len(train), len(test)) == (1437, 360)
  it = data.make_train_iterator("digits", global_batch_size=100, seed=0, augment=False)
  batch = next(it)
  assert batch["image"].shape == (100, 8, 8, 1) and batch["image"].dtype == np.uint8
  assert batch["image"].max() <= 16 and set(np.unique(batch["label"])) <= set(range(10))
  # normalised on the device with the training split's statistics: about zero mean and unit variance
  prepare = data.device_transform(data.device_spec(info, augment=False))
  everything = np.concatenate([prepare(it.batch_at(0, s), train=False)["image"] for s in range(it.steps_per_epoch)])
  assert abs(everything.mean()) < 0.05 and abs(everything.std() - 1) < 0.05


def test_batches_are_uint8_with_their_global_positions():
  it = data.make_train_iterator("digits", global_batch_size=64, seed=7, process_index=1, process_count=2)
  batch = it.batch_at(3, 5)
  assert set(batch) == {"image", "label", "position"}
  assert batch["image"].dtype == np.uint8 and batch["image"].nbytes == 32 * 8 * 8
  assert batch["label"].dtype == np.int32 and batch["position"].dtype == np.uint32
  np.testing.assert_array_equal(batch["position"], [[7, 3, 5, r] for r in range(32, 64)])   # rows 32..63 of 64


def test_batch_order_is_the_seeded_permutation_as_before():
  # Which examples form each batch must not change: batch s of epoch e holds examples
  # permutation(seed, e)[s*B:(s+1)*B], this process's block of rows.
  labels = data.digits_source("train").labels
  for processes, index in ((1, 0), (2, 1)):
    it = data.make_train_iterator("digits", global_batch_size=128, seed=3, process_index=index,
                                  process_count=processes)
    for epoch, step in ((0, 0), (2, 7)):
      order = np.random.default_rng([3, epoch]).permutation(1437)[step * 128:(step + 1) * 128]
      np.testing.assert_array_equal(it.batch_at(epoch, step)["label"], labels[order][it.rows])


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
    for key in ("image", "label", "position"):
      np.testing.assert_array_equal(x[key], y[key])
  it.set_state({"epoch": 1, "step": 0})    # a restore mid-run drops the prefetched batches
  np.testing.assert_array_equal(next(it)["position"], expected[2]["position"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(processes):
  whole = data.make_train_iterator("digits", global_batch_size=128, seed=1)
  parts = [data.make_train_iterator("digits", global_batch_size=128, seed=1, process_index=i, process_count=processes)
           for i in range(processes)]
  for _ in range(2):
    g = next(whole)
    shards = [next(p) for p in parts]
    for key in ("image", "label", "position"):
      np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), g[key])
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    data.make_train_iterator("digits", global_batch_size=128, seed=1, process_index=0, process_count=3)


def test_eval_iterator_counts_every_example_once():
  batches = list(data.make_eval_iterator("digits", global_batch_size=100))
  assert len(batches) == 4 and [b["image"].shape[0] for b in batches] == [100] * 4
  assert batches[0]["image"].dtype == np.uint8 and set(batches[0]) == {"image", "label", "mask"}
  assert sum(b["mask"].sum() for b in batches) == 360
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, data.digits_source("test").labels)
  halves = [list(data.make_eval_iterator("digits", global_batch_size=100, process_index=i, process_count=2))
            for i in range(2)]
  assert sum(b["mask"].sum() for h in halves for b in h) == 360


def test_tfds_dataset_through_data_source_offline():
  with tfds.testing.mock_data(num_examples=96):
    info = data.get_dataset_info("cifar10")
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3) and info.augmentation == "crop_flip"
    it = data.make_train_iterator("cifar10", global_batch_size=32, seed=0)
    batch = next(it)
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8 and it.steps_per_epoch == 3
    evals = list(data.make_eval_iterator("cifar10", global_batch_size=64))
    assert sum(b["mask"].sum() for b in evals) == 96


def test_unprepared_dataset_says_what_to_do(tmp_path):
  try:
    import tensorflow  # noqa: F401
    pytest.skip("TensorFlow is installed: the dataset would be prepared instead")
  except ImportError:
    pass
  # A DataError (a ValueError): the command line prints it as one line, no traceback.
  with pytest.raises(data.DataError, match=r"not prepared.*tfds build cifar10 --file_format=array_record"):
    data.make_train_iterator("cifar10", global_batch_size=32, seed=0, data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match=r"ILSVRC2012_img_train\.tar.*downloads/manual"):
    data.make_train_iterator("imagenet2012", global_batch_size=32, seed=0, data_dir=str(tmp_path))


def test_mnist_through_mock_data_is_grayscale():
  with tfds.testing.mock_data(num_examples=40):
    info = data.get_dataset_info("mnist")
    assert info.image_shape == (28, 28, 1) and len(info.mean) == 1 and info.augmentation == "crop"
    batch = next(data.make_train_iterator("mnist", global_batch_size=16, seed=0))
    assert batch["image"].shape == (16, 28, 28, 1) and batch["label"].dtype == np.int32


def test_validation_hold_out_is_fixed_and_disjoint_from_training():
  subset = data.Split(validation=100, train_limit=500)
  train = data.open_split("digits", "train", None, subset)
  held = data.open_split("digits", "validation", None, subset)
  assert (len(train), len(held)) == (500, 100) and subset.eval_split == "validation"
  assert not set(train.indices) & set(held.indices)
  again = data.open_split("digits", "validation", None, data.Split(validation=100))   # any train_limit, any seed
  np.testing.assert_array_equal(held.indices, again.indices)
  assert len(data.open_split("digits", "train", None, data.Split(validation=100))) == 1437 - 100
  batches = list(data.make_eval_iterator("digits", global_batch_size=64, subset=subset))
  assert sum(b["mask"].sum() for b in batches) == 100
  test = list(data.make_eval_iterator("digits", global_batch_size=64, split="test", subset=subset))
  assert sum(b["mask"].sum() for b in test) == 360
  with pytest.raises(ValueError, match="validation split needs"):
    data.open_split("digits", "validation", None, data.Split(train_limit=500))
  with pytest.raises(ValueError, match="cannot hold out 1437"):
    data.open_split("digits", "train", None, data.Split(validation=1437))
