"""The device transform: the same float images as the old host transform with augmentation off (every
dataset kind), and an augmentation keyed by (seed, epoch, step, global row)."""

import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ewgs_jax import data
from ewgs_jax.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the host transform batches had before they travelled as uint8 (ewgs_jax/data.py at 4056d39) ----


def _old_float(images):
  batch = np.stack(images)
  return batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else batch.astype(np.float32)


def _old_imagenet_eval(image):
  h, w = image.shape[:2]
  scale = 256 / min(h, w)
  resized = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
  top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
  return resized[top:top + 224, left:left + 224]


def _old_eval_transform(images, info):
  """The old ``data.transform(images, info, None)``: what the model saw with augmentation off."""
  if info.augmentation == "imagenet":
    batch = _old_float([_old_imagenet_eval(im) for im in images])
  else:
    batch = _old_float(images)
  return (batch - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


def _old_digits_images():
  """The old digits source held float32 images / 16."""
  images, _ = datasets._digits()
  return (images.astype(np.float64) / 16.0).astype(np.float32)


def _device_images(batch, info, train):
  prepare = jax.jit(data.device_transform(data.device_spec(info, augment=False)), static_argnames="train")
  return np.asarray(prepare(batch, train=train)["image"])


def _check_train_and_eval(name, old_train_images, old_test_images, data_dir=None, batch=8):
  """augment=False training batches and eval batches equal the old transform of the same examples."""
  info = data.get_dataset_info(name, data_dir)
  it = data.make_train_iterator(name, global_batch_size=batch, seed=5, augment=False, data_dir=data_dir)
  order = np.random.default_rng([5, 1]).permutation(len(old_train_images))[2 * batch:3 * batch]
  new = _device_images(it.batch_at(1, 2), info, train=True)
  old = _old_eval_transform(list(old_train_images[order]), info)
  np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-6)
  first = next(data.make_eval_iterator(name, global_batch_size=batch, data_dir=data_dir))
  new = _device_images(first, info, train=False)
  np.testing.assert_allclose(new, _old_eval_transform(list(old_test_images[:batch]), info), rtol=1e-6, atol=1e-6)


def test_digits_equal_the_old_float_images():
  images = _old_digits_images()
  _check_train_and_eval("digits", images[:1437], images[1437:])


def test_idx_files_equal_the_old_images(tmp_path):
  from tests.test_data_sources import idx_dataset
  arrays = idx_dataset(tmp_path / "fashion_mnist")
  _check_train_and_eval("fashion_mnist", arrays["train"][0][..., None].astype(np.uint8),
                        arrays["test"][0][..., None].astype(np.uint8), data_dir=str(tmp_path))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npz_arrays_equal_the_old_images(tmp_path, dtype):
  rng = np.random.default_rng(0)
  x_train = rng.integers(0, 256, (30, 6, 6, 3)).astype(np.uint8)
  x_test = rng.integers(0, 256, (9, 6, 6, 3)).astype(np.uint8)
  if dtype == "float32":
    x_train, x_test = x_train / np.float32(255), x_test / np.float32(255)
  path = tmp_path / "mine.npz"
  np.savez(path, x_train=x_train, y_train=rng.integers(0, 3, 30), x_test=x_test, y_test=rng.integers(0, 3, 9))
  datasets.npz_arrays.cache_clear()
  _check_train_and_eval(f"npz:{path}", x_train, x_test, batch=6)


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_tfds_datasets_equal_the_old_images(name):
  with tfds.testing.mock_data(num_examples=24):
    source = data.open_split(name, "train")
    train = np.stack(source.get(np.arange(24))[0])
    test = np.stack(data.open_split(name, "test").get(np.arange(24))[0])
    _check_train_and_eval(name, train, test)


def _jpeg(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def test_imagenet_style_eval_crops_equal_the_old_images():
  # The old path decoded the JPEG to an array (tfds with PIL), then resized; now the host decodes the
  # bytes itself and the device normalises: the same pixels.
  info = data.DatasetInfo("imagenet2012", 1000, (224, 224, 3), *data.MEAN_STD["imagenet2012"])
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (300 + 10 * i, 400 - 20 * i, 3), dtype=np.uint8) for i in range(3)]
  encoded = [_jpeg(im) for im in images]
  decoded = [np.asarray(Image.open(io.BytesIO(e))) for e in encoded]
  records = data.RecordSource([{"image": e, "label": i} for i, e in enumerate(encoded)])
  batch = data.EvalBatches(records, info, global_batch_size=3, rows=slice(0, 3))(0)
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (3, 224, 224, 3)
  np.testing.assert_allclose(_device_images(batch, info, train=False), _old_eval_transform(decoded, info),
                             rtol=1e-6, atol=1e-6)
  arrays = data.EvalBatches(data.ArraySource(np.stack([images[0]] * 2), np.zeros(2)), info, global_batch_size=2,
                            rows=slice(0, 2))(0)
  np.testing.assert_allclose(_device_images(arrays, info, train=False), _old_eval_transform([images[0]] * 2, info),
                             rtol=1e-6, atol=1e-6)


# --- the augmentation ------------------------------------------------------------------------------


def _augment(info, batch):
  prepare = jax.jit(data.device_transform(data.device_spec(info, augment=True)), static_argnames="train")
  return np.asarray(prepare(batch, train=True)["image"])


def test_crops_are_windows_of_the_padded_image_and_flips_mirror_them():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (64, 6, 6, 1)).astype(np.uint8)          # no zero pixel of its own
  position = np.stack([np.full(64, 1), np.zeros(64), np.zeros(64), np.arange(64)], 1).astype(np.uint32)
  spec = data.DeviceSpec((0.0,), (1.0,), 255.0, pad=2, flip=True)
  out = np.asarray(jax.jit(data.device_transform(spec), static_argnames="train")(
      {"image": images, "label": np.zeros(64, np.int32), "position": position}, train=True)["image"])
  padded = np.pad(images / np.float32(255), ((0, 0), (2, 2), (2, 2), (0, 0)))
  shifts, flips = set(), 0
  for i in range(64):
    def window(dy, dx, flip):
      crop = padded[i, dy:dy + 6, dx:dx + 6]
      return crop[:, ::-1] if flip else crop
    windows = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
               if np.allclose(out[i], window(dy, dx, f), rtol=1e-6, atol=0)]
    assert windows, f"row {i} is not a window of its padded image"
    shifts.add(windows[0][:2])
    flips += windows[0][2]
  assert len(shifts) > 10 and 10 < flips < 54
  info = data.DatasetInfo("cifar10", 10, (32, 32, 3), (0.5,) * 3, (0.2,) * 3)
  assert data.device_spec(info, augment=True) == data.DeviceSpec(info.mean, info.std, 255.0, pad=4, flip=True)
  assert not data.device_spec(data.DatasetInfo("mnist", 10, (28, 28, 1), (0.1,), (0.3,)), augment=True).flip
  assert data.device_spec(data.get_dataset_info("digits"), augment=True).pad == 1
  assert data.device_spec(info, augment=False).pad == 0


def test_augmentation_is_keyed_by_position_for_any_process_count_and_after_resume():
  info = data.get_dataset_info("digits")
  whole = data.make_train_iterator("digits", global_batch_size=64, seed=2)
  halves = [data.make_train_iterator("digits", global_batch_size=64, seed=2, process_index=i, process_count=2)
            for i in range(2)]
  for _ in range(3):
    next(whole), [next(h) for h in halves]
  state = whole.get_state()
  g = next(whole)
  parts = [next(h) for h in halves]
  augmented = _augment(info, g)
  np.testing.assert_array_equal(np.concatenate([_augment(info, p) for p in parts]), augmented)
  resumed = data.make_train_iterator("digits", global_batch_size=64, seed=2)
  resumed.set_state(state)
  np.testing.assert_array_equal(_augment(info, next(resumed)), augmented)
  assert not np.array_equal(_augment(info, whole.batch_at(0, 4)), augmented)   # another step, other crops
  other_seed = data.make_train_iterator("digits", global_batch_size=64, seed=3)
  batch = dict(g, position=other_seed.batch_at(*state.values())["position"])
  assert not np.array_equal(_augment(info, batch), augmented)


MESH = """
import json, sys
import jax, numpy as np
from ewgs_jax import data, parallel
info = data.DatasetInfo("cifar10", 10, (8, 8, 3), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
prepare = data.device_transform(data.device_spec(info, augment=True))
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (16, 8, 8, 3)).astype(np.uint8), "label": np.arange(16, dtype=np.int32),
         "position": np.stack([np.full(16, 4), np.full(16, 1), np.full(16, 2), np.arange(16)], 1).astype(np.uint32)}
mesh = parallel.make_mesh()
sharded = jax.jit(prepare, static_argnames="train")(parallel.shard_batch(batch, mesh), train=True)
single = jax.jit(prepare, static_argnames="train")(batch, train=True)
hlo = jax.jit(prepare, static_argnames="train").lower(parallel.shard_batch(batch, mesh), train=True).compile().as_text()
spec = str(sharded["image"].sharding.spec).replace("PartitionSpec", "P")
print(json.dumps({"devices": jax.device_count(), "sharding": spec,
                  "equal": bool(np.array_equal(np.asarray(sharded["image"]), np.asarray(single["image"]))),
                  "all_gather": "all-gather" in hlo}))
"""


def test_device_transform_on_a_batch_sharded_over_eight_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(MESH)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  # Every row is cropped where it lives: the same images as on one device, no gathering of the batch.
  assert result == {"devices": 8, "sharding": "P('data',)", "equal": True, "all_gather": False}


def test_host_crops_keyed_by_global_row():
  rng = np.random.default_rng(0)
  info = data.DatasetInfo("imagenet2012", 1000, (224, 224, 3), *data.MEAN_STD["imagenet2012"])
  source = data.RecordSource([{"image": _jpeg(rng.integers(0, 256, (240 + 30 * i, 260, 3), dtype=np.uint8)),
                               "label": i} for i in range(4)])
  whole = data.TrainIterator(source, info, global_batch_size=4, seed=0, workers=0)
  parts = [data.TrainIterator(source, info, global_batch_size=4, seed=0, process_index=i, process_count=2, workers=0)
           for i in range(2)]
  g, shards = whole.batch_at(0, 0), [p.batch_at(0, 0) for p in parts]
  assert g["image"].shape == (4, 224, 224, 3) and g["image"].dtype == np.uint8
  np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), g["image"])
  other = data.TrainIterator(source, info, global_batch_size=4, seed=1, workers=0).batch_at(0, 0)
  assert not np.array_equal(g["image"], other["image"])
