"""Dataset sources: the registry, IDX and npz files, and bad input refused before anything compiles."""

import gzip

import numpy as np
import pytest

from ewgs_jax import data
from ewgs_jax.data import datasets, idx


# --- the registry -----------------------------------------------------------------------------------


def test_a_new_dataset_is_one_function_and_one_registration(monkeypatch):
  monkeypatch.setattr(data.sources, "REGISTRY", dict(data.REGISTRY))   # leave the real registry as it was
  rng = np.random.default_rng(0)
  arrays = {split: (rng.integers(0, 256, (n, 5, 5, 3)).astype(np.uint8), rng.integers(0, 3, n))
            for split, n in (("train", 20), ("test", 6))}

  def tiny(name, split, data_dir):
    return data.ArraySource(*arrays[split])

  data.register("tiny", tiny, info=data.DatasetInfo("tiny", 3, (5, 5, 3), (0.5,) * 3, (0.25,) * 3))
  info = data.check_splits("tiny", subset=data.Split(validation=4))
  assert info.num_classes == 3 and info.augmentation == "shift"
  batch = data.make_train_iterator("tiny", global_batch_size=4, seed=0).batch_at(0, 0)
  assert batch["image"].shape == (4, 5, 5, 3) and batch["image"].dtype == np.uint8
  assert sum(b["mask"].sum() for b in data.make_eval_iterator("tiny", global_batch_size=4)) == 6
  assert "tiny" in data.sources.dataset_names()


def test_built_in_kinds_are_registered():
  assert {"digits", "mnist", "fashion_mnist", "npz", "tfds"} <= set(data.REGISTRY)
  assert data.sources.kind_of("npz:/x.npz").key == "npz" and data.sources.kind_of("cifar10").key == "tfds"
  assert data.sources.kind_of("digits").key == "digits"


def test_unknown_dataset_is_one_line_with_near_misses():
  with pytest.raises(data.DataError) as raised:
    data.get_dataset_info("cifar11")
  message = str(raised.value)
  assert "\n" not in message and len(message) < 400
  assert message.startswith("unknown dataset 'cifar11': did you mean ") and "'cifar10'" in message
  with pytest.raises(data.DataError, match="'fashion_mnist'"):
    data.get_dataset_info("fashion_mnits")


# --- IDX files --------------------------------------------------------------------------------------


def write_idx(path, array, gz, magic=0x08):
  header = bytes([0, 0, magic, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
  opener = gzip.open if gz else open
  with opener(str(path) + (".gz" if gz else ""), "wb") as f:
    f.write(payload)


def idx_dataset(directory, n_train=40, n_test=12, seed=0):
  """Four IDX files in ``directory``: one split gzipped, one not; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train)),
            "test": (rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test))}
  directory.mkdir(parents=True, exist_ok=True)
  for split, (images, labels) in arrays.items():
    images_stem, labels_stem = data.IDX_FILES[split]
    write_idx(directory / images_stem, images, gz=split == "train")
    write_idx(directory / labels_stem, labels, gz=False)
  return arrays


@pytest.fixture(autouse=True)
def _fresh_file_caches():
  idx.idx_split.cache_clear()
  datasets.npz_arrays.cache_clear()
  yield
  idx.idx_split.cache_clear()
  datasets.npz_arrays.cache_clear()


def test_idx_files_are_read_exactly_gzipped_or_not(tmp_path):
  arrays = idx_dataset(tmp_path / "fashion_mnist")
  np.testing.assert_array_equal(data.read_idx(tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz"),
                                arrays["train"][0])
  for data_dir in (tmp_path, tmp_path / "fashion_mnist"):   # data_dir itself or data_dir/<name>
    info = data.get_dataset_info("fashion_mnist", str(data_dir))
    assert info.num_classes == 10 and info.image_shape == (28, 28, 1) and info.mean == data.MEAN_STD["fashion_mnist"][0]
    batches = list(data.make_eval_iterator("fashion_mnist", global_batch_size=5, data_dir=str(data_dir)))
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    np.testing.assert_array_equal(labels, arrays["test"][1])
    np.testing.assert_array_equal(batches[0]["image"][..., 0], arrays["test"][0][:5])
  it = data.make_train_iterator("fashion_mnist", global_batch_size=8, seed=0, data_dir=str(tmp_path), augment=False)
  assert it.steps_per_epoch == 5 and next(it)["image"].shape == (8, 28, 28, 1)


def test_corrupt_idx_files_and_missing_ones_name_the_problem(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00junk")
  with pytest.raises(data.DataError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  short = tmp_path / "short"
  write_idx(short, np.zeros((4, 3), np.uint8), gz=False)
  short.write_bytes(short.read_bytes()[:-2])
  with pytest.raises(data.DataError, match=r"header says \(4, 3\)"):
    data.read_idx(short)
  (tmp_path / "mnist").mkdir()
  expected = r"expected the IDX files train-images-idx3-ubyte\[\.gz\].*t10k-labels-idx1-ubyte"
  with pytest.raises(data.DataError, match=expected):
    list(data.make_eval_iterator("mnist", global_batch_size=4, data_dir=str(tmp_path)))


def _one_line(error):
  message = str(error)
  assert "\n" not in message and len(message) < 600, message
  return message


def test_truncated_gzip_idx_file_is_one_line(tmp_path):
  idx_dataset(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(data.DataError) as raised:
    data.check_splits("fashion_mnist", str(tmp_path))
  assert "train-images-idx3-ubyte.gz: corrupt or truncated gzip file" in _one_line(raised.value)


def test_missing_idx_directory_is_one_line(tmp_path):
  with pytest.raises(data.DataError) as raised:
    data.check_splits("fashion_mnist", str(tmp_path / "nowhere"))
  assert "nowhere (no such directory)" in _one_line(raised.value)


def test_every_split_is_checked_at_start_up(tmp_path):
  # A test split whose images and labels disagree, or a file with a wrong magic number, is found
  # before the first step, not at the first evaluation.
  idx_dataset(tmp_path)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(11), gz=False)    # 12 test images
  with pytest.raises(data.DataError, match=r"the test split has 12 images .* labels of shape \(11,\)"):
    data.check_splits("fashion_mnist", str(tmp_path))
  idx.idx_split.cache_clear()
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(12), gz=False, magic=0x07)
  with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte is not an IDX file \(bad magic number 00000701\)"):
    data.check_splits("fashion_mnist", str(tmp_path))
  idx.idx_split.cache_clear()
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(12, 10), gz=False)   # labels 0..9 only
  with pytest.raises(data.DataError, match=r"test split: label\[0\] = 10 is outside 0\.\.9"):
    data.check_splits("fashion_mnist", str(tmp_path))


def test_a_source_of_the_wrong_shape_is_named(monkeypatch):
  monkeypatch.setattr(data.sources, "REGISTRY", dict(data.REGISTRY))
  images = np.zeros((8, 5, 5, 3), np.uint8)
  data.register("odd", lambda name, split, data_dir: data.ArraySource(images, np.zeros(8)),
                info=data.DatasetInfo("odd", 2, (6, 6, 3), (0.5,) * 3, (0.25,) * 3))
  with pytest.raises(data.DataError, match=r"'odd', train split, record 0: image of shape \(5, 5, 3\), but .*6, 6, 3"):
    data.check_splits("odd")
  ragged = data.RecordSource([{"image": np.zeros((6, 6, 3), np.uint8), "label": 0}] * 3
                             + [{"image": np.zeros((6, 5, 3), np.uint8), "label": 1}], name="ragged")
  it = data.TrainIterator(ragged, data.get_dataset_info("odd"), global_batch_size=4, seed=0)
  with pytest.raises(data.DataError, match=r"ragged \(epoch 0, step 0\), record 3: .* shape \(6, 5, 3\)") as raised:
    next(it)
  _one_line(raised.value)


# --- npz ----------------------------------------------------------------------------------------------


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
  assert info.pixel_max == (255.0 if dtype == "uint8" else 1.0)
  scaled = np.asarray(x_train, np.float64) / (255.0 if dtype == "uint8" else 1.0)
  np.testing.assert_allclose(info.mean, scaled.mean((0, 1, 2)), rtol=1e-5)
  batch = data.make_train_iterator(name, global_batch_size=10, seed=0, augment=False).batch_at(0, 0)
  assert batch["image"].shape == (10, 12, 12, 3) and batch["image"].dtype == np.dtype(dtype)
  assert sum(b["mask"].sum() for b in data.make_eval_iterator(name, global_batch_size=4)) == 7
  np.savez(tmp_path / "partial.npz", x_train=x_train, y_train=np.zeros(30))
  with pytest.raises(ValueError, match=r"lacks \['x_test', 'y_test'\]"):
    data.get_dataset_info(f"npz:{tmp_path / 'partial.npz'}")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_dataset_info(f"npz:{tmp_path / 'nothing.npz'}")


def _npz(tmp_path, **changes):
  rng = np.random.default_rng(0)
  arrays = {"x_train": rng.random((20, 4, 4, 3), np.float32), "y_train": rng.integers(0, 3, 20),
            "x_test": rng.random((5, 4, 4, 3), np.float32), "y_test": rng.integers(0, 3, 5), **changes}
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  datasets.npz_arrays.cache_clear()
  return f"npz:{path}"


def _poke(array, index, value):
  array = array.copy()
  array[index] = value
  return array


@pytest.mark.parametrize("changes, pattern", [
    (lambda a: {"y_train": _poke(a["y_train"], 7, -1)}, r"y_train\[7\] = -1 is negative"),
    (lambda a: {"y_test": _poke(a["y_test"], 3, 3), "num_classes": 3}, r"y_test\[3\] = 3 >= num_classes 3"),
    (lambda a: {"x_train": _poke(a["x_train"], (11, 2, 1, 0), np.nan)}, r"x_train\[11\] holds NaN or infinite pixels"),
    (lambda a: {"x_test": _poke(a["x_test"], (4, 0, 0, 2), np.inf)}, r"x_test\[4\] holds NaN or infinite pixels"),
    (lambda a: {"x_test": a["x_test"][..., :1]},
     r"x_test images are float32 \(4, 4, 1\) but x_train images are float32 \(4, 4, 3\)"),
    (lambda a: {"x_test": (a["x_test"] * 255).astype(np.uint8)},
     r"x_test images are uint8 .* x_train images are float32"),
    (lambda a: {"y_train": a["y_train"] + 0.5}, r"y_train must hold integer class labels"),
    (lambda a: {"x_train": np.zeros((20, 64, 64, 3), np.float32), "x_test": np.zeros((5, 64, 64, 3), np.float32)},
     r"images of 64 pixels or more .* store them as uint8"),
])
def test_bad_npz_data_is_refused_naming_the_array_and_index(tmp_path, changes, pattern):
  rng = np.random.default_rng(0)
  good = {"x_train": rng.random((20, 4, 4, 3), np.float32), "y_train": rng.integers(0, 3, 20),
          "x_test": rng.random((5, 4, 4, 3), np.float32), "y_test": rng.integers(0, 3, 5)}
  name = _npz(tmp_path, **{**good, **changes(good)})
  with pytest.raises(data.DataError, match=pattern) as raised:
    data.check_splits(name)
  _one_line(raised.value)


def test_npz_num_classes_declares_classes_beyond_the_labels(tmp_path):
  info = data.check_splits(_npz(tmp_path, num_classes=7))
  assert info.num_classes == 7


def test_bad_data_on_the_command_line_is_one_line_before_compiling(tmp_path):
  import os
  import subprocess
  import sys
  from tests.training_configs import ROOT
  name = _npz(tmp_path, y_train=np.full(20, -1))
  command = [sys.executable, "-m", "ewgs_jax.train", "--config", "quickstart", "--workdir", str(tmp_path / "run"),
             f"--config.dataset={name}"]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      f"error: npz dataset {name[4:]!r}: y_train[0] = -1 is negative; labels are 0..num_classes-1"], out.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()
