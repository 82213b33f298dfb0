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


# --- local files: IDX (mnist, fashion_mnist) and npz ----------------------------------------------


def _write_idx(path, array, gz):
  import gzip
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  opener = gzip.open if gz else open
  with opener(str(path) + (".gz" if gz else ""), "wb") as f:
    f.write(payload)


def _idx_dataset(directory, n_train=40, n_test=12, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
            "test": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
  directory.mkdir(parents=True, exist_ok=True)
  for split, (images, labels) in arrays.items():
    images_stem, labels_stem = data.IDX_FILES[split]
    _write_idx(directory / images_stem, images, gz=split == "train")    # one split gzipped, one not
    _write_idx(directory / labels_stem, labels, gz=False)
  return arrays


def test_idx_files_are_read_exactly_gzipped_or_not(tmp_path):
  arrays = _idx_dataset(tmp_path / "fashion_mnist")
  np.testing.assert_array_equal(data.read_idx(tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz"),
                                arrays["train"][0])
  for data_dir in (tmp_path, tmp_path / "fashion_mnist"):   # data_dir itself or data_dir/<name>
    info = data.get_dataset_info("fashion_mnist", str(data_dir))
    assert info.num_classes == 10 and info.image_shape == (28, 28, 1) and info.mean == data.MEAN_STD["fashion_mnist"][0]
    batches = list(data.make_eval_iterator("fashion_mnist", global_batch_size=5, data_dir=str(data_dir)))
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    expected = (arrays["test"][0][:5, :, :, None] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(batches[0]["image"], expected, rtol=1e-5, atol=1e-5)
  it = data.make_train_iterator("fashion_mnist", global_batch_size=8, seed=0, data_dir=str(tmp_path), augment=False)
  assert it.steps_per_epoch == 5 and next(it)["image"].shape == (8, 28, 28, 1)


def test_corrupt_idx_files_and_missing_ones_name_the_problem(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00junk")
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  short = tmp_path / "short"
  _write_idx(short, np.zeros((4, 3), np.uint8), gz=False)
  short.write_bytes(short.read_bytes()[:-2])
  with pytest.raises(ValueError, match=r"header says \(4, 3\)"):
    data.read_idx(short)
  (tmp_path / "mnist").mkdir()
  with pytest.raises(Exception, match=r"expected the IDX files train-images-idx3-ubyte\[\.gz\].*t10k-labels-idx1-ubyte"):
    list(data.make_eval_iterator("mnist", global_batch_size=4, data_dir=str(tmp_path)))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npz_arrays_of_a_user(tmp_path, dtype):
  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 256, (30, 12, 12, 3)).astype(np.uint8)
  x_test = rng.integers(0, 256, (7, 12, 12, 3)).astype(np.uint8)
  if dtype == "float32":
    x_train, x_test = x_train / np.float32(255), x_test / np.float32(255)
  path = tmp_path / f"mine_{dtype}.npz"
  np.savez(path, x_train=x_train, y_train=rng.integers(0, 4, 30), x_test=x_test, y_test=np.array([5, 0, 1, 2, 3, 4, 0]))
  name = f"npz:{path}"
  info = data.get_dataset_info(name)
  assert info.num_classes == 6 and info.image_shape == (12, 12, 3)
  scaled = np.asarray(x_train, np.float64) / (255.0 if dtype == "uint8" else 1.0)
  np.testing.assert_allclose(info.mean, scaled.mean((0, 1, 2)), rtol=1e-5)
  batch = data.make_train_iterator(name, global_batch_size=10, seed=0, augment=False).batch_at(0, 0)
  assert batch["image"].shape == (10, 12, 12, 3)
  assert sum(b["mask"].sum() for b in data.make_eval_iterator(name, global_batch_size=4)) == 7
  np.savez(tmp_path / "partial.npz", x_train=x_train, y_train=np.zeros(30))
  with pytest.raises(ValueError, match=r"lacks \['x_test', 'y_test'\]"):
    data.get_dataset_info(f"npz:{tmp_path / 'partial.npz'}")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_dataset_info(f"npz:{tmp_path / 'nothing.npz'}")


def test_validation_hold_out_is_fixed_and_disjoint_from_training():
  subset = data.Split(validation=100, train_limit=500)
  train = data._source("digits", "train", None, subset)
  held = data._source("digits", "validation", None, subset)
  assert (len(train), len(held)) == (500, 100) and subset.eval_split == "validation"
  assert not set(train.indices) & set(held.indices)
  again = data._source("digits", "validation", None, data.Split(validation=100))   # any train_limit, any seed
  np.testing.assert_array_equal(held.indices, again.indices)
  assert len(data._source("digits", "train", None, data.Split(validation=100))) == 1437 - 100
  batches = list(data.make_eval_iterator("digits", global_batch_size=64, subset=subset))
  assert sum(b["mask"].sum() for b in batches) == 100
  test = list(data.make_eval_iterator("digits", global_batch_size=64, split="test", subset=subset))
  assert sum(b["mask"].sum() for b in test) == 360
  with pytest.raises(ValueError, match="validation split needs"):
    data._source("digits", "validation", None, data.Split(train_limit=500))
  with pytest.raises(ValueError, match="cannot hold out 1437"):
    data._source("digits", "train", None, data.Split(validation=1437))
