"""ImageNet-style loading in grain worker processes: the same batches as in-process, the data position
as the loader's state, and failures (a corrupt JPEG, a dying worker, a wrong shape) as one line."""

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ewgs_jax import data
from ewgs_jax.data import host

pytest.importorskip("grain")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = data.DatasetInfo("imagenet2012", 1000, (224, 224, 3), *data.MEAN_STD["imagenet2012"])


def jpeg(seed, height=260, width=300):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, "JPEG", quality=85)
  return buffer.getvalue()


def records(n=12, corrupt=None):
  encoded = [jpeg(i, 240 + 7 * i, 330 - 5 * i) for i in range(n)]
  if corrupt is not None:
    encoded[corrupt] = encoded[corrupt][:300]    # a truncated JPEG
  return data.RecordSource([{"image": e, "label": i % 5} for i, e in enumerate(encoded)], name="shard")


def test_worker_processes_give_the_in_process_batches_and_resume_from_the_data_position():
  source = records()
  it = data.TrainIterator(source, INFO, global_batch_size=4, seed=0, workers=2)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  expected = [next(it) for _ in range(3)]          # crosses into epoch 1 (3 steps per epoch)
  it.close()
  assert state == {"epoch": 0, "step": 2} and it.get_state() == {"epoch": 1, "step": 2}
  inline = data.TrainIterator(source, INFO, global_batch_size=4, seed=0, workers=0)
  for batch in first + expected:
    reference = next(inline)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 224, 224, 3)
    for key in ("image", "label", "position"):
      np.testing.assert_array_equal(batch[key], reference[key])
  resumed = data.TrainIterator(source, INFO, global_batch_size=4, seed=0, workers=2)
  resumed.set_state(state)
  for batch in expected:
    np.testing.assert_array_equal(next(resumed)["image"], batch["image"])
  resumed.close()


@pytest.mark.slow
def test_eval_batches_from_workers_equal_in_process_ones():
  source = records(6)
  batches = data.EvalBatches(source, INFO, global_batch_size=4, rows=slice(0, 4))
  from ewgs_jax.data import iterators
  by_workers = list(iterators._eval_batches(batches, workers=2))
  inline = list(iterators._eval_batches(batches, workers=0))
  assert len(by_workers) == 2 and by_workers[1]["mask"].tolist() == [1, 1, 0, 0]
  for a, b in zip(by_workers, inline):
    np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_corrupt_jpeg_names_its_record(workers):
  source = records(corrupt=5)
  it = data.TrainIterator(source, INFO, global_batch_size=12, seed=0, workers=workers)
  with pytest.raises(data.DataError, match=r"shard \(epoch 0, step 0\), record 5: cannot decode the image") as raised:
    next(it)
  it.close()
  assert "\n" not in str(raised.value)
  subset = data.SubsetSource(source, np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10]))   # record 5 is subset row 4
  it = data.TrainIterator(subset, INFO, global_batch_size=10, seed=0, workers=workers)
  with pytest.raises(data.DataError, match=r"shard \(epoch 0, step 0\), record 5: cannot decode the image"):
    next(it)
  it.close()


class _Draws:
  """A generator stand-in: ``uniform`` and ``integers`` return the given values in turn; no flip."""

  def __init__(self, *values):
    self.values = iter(values)

  def uniform(self, low, high):
    return next(self.values)

  def integers(self, low, high):
    return next(self.values)

  def random(self):
    return 0.9


def test_draft_decoding_keeps_the_crop():
  # A 1600x1200 JPEG and a 1200x1000 crop: decoded at 1/4 scale (the crop keeps 300x250 >= 224
  # pixels), the output differs from the full-scale decode only by resampling, not in what it shows.
  encoded = jpeg(1, 1200, 1600)
  top, left, ch, cw = 150, 300, 1000, 1200
  pil = Image.open(io.BytesIO(encoded))
  pil.draft("RGB", (-(-1600 * 224 // cw), -(-1200 * 224 // ch)))
  assert pil.size == (400, 300)
  full = Image.open(io.BytesIO(encoded)).convert("RGB")
  reference = np.asarray(full.resize((224, 224), Image.BILINEAR, box=(left, top, left + cw, top + ch)), np.float32)
  rng = _Draws(ch * cw / (1200 * 1600), np.log(cw / ch), top, left)
  assert host.crop_box(1200, 1600, _Draws(ch * cw / (1200 * 1600), np.log(cw / ch), top, left)) == (top, left, ch, cw)
  crop = host.random_resized_crop(encoded, rng, where="big")
  assert crop.shape == (224, 224, 3) and np.abs(crop.astype(np.float32) - reference).mean() < 3


WORKER_DIES = """
import os, signal, sys
import numpy as np
from ewgs_jax import data
from tests.test_data_workers import INFO, records

class Deadly(data.RecordSource):
  def get(self, indices):
    if 7 in list(indices) and os.getpid() != self.parent:
      os.kill(os.getpid(), signal.SIGKILL)
    return super().get(indices)

source = records()
deadly = Deadly(source.records, name="shard")
deadly.parent = os.getpid()
it = data.TrainIterator(deadly, INFO, global_batch_size=4, seed=0, workers=2)
try:
  for _ in range(3):
    next(it)
except data.DataError as e:
  print(str(e))
  sys.exit(1)
"""


def test_a_worker_that_dies_is_one_line_naming_it_and_never_a_hang():
  order = np.random.default_rng([0, 0]).permutation(12)
  step = int(np.flatnonzero(order == 7)[0]) // 4
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + sys.path), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKER_DIES)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
  assert out.returncode == 1, out.stderr[-3000:]
  line = out.stdout.strip().splitlines()[-1]
  assert line.startswith(f"input worker process {step % 2} of 2 died, exit code -9 (SIGKILL"), line
  assert f"while loading batch (epoch 0, step {step})" in line


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_wrong_shape_from_a_source_names_the_record(workers):
  source = data.RecordSource([{"image": np.zeros((240, 260, 3), np.uint8), "label": 0}] * 3
                             + [{"image": np.zeros((40, 50, 3, 2), np.uint8), "label": 0}], name="odd")
  it = data.TrainIterator(source, INFO, global_batch_size=4, seed=0, workers=workers)
  with pytest.raises(data.DataError, match=r"odd \(epoch 0, step 0\), record 3: cannot decode the image"):
    next(it)
  it.close()


def _positions(position):
  return {"x": np.full((2,), position, np.int64)}


def test_worker_processes_leave_ctrl_c_and_sigterm_to_the_training_process():
  import multiprocessing
  import signal as signals
  from ewgs_jax.data import workers as loaders
  loader = loaders.ProcessLoader(_positions, 0, workers=2)
  try:
    assert int(next(loader)["x"][0]) == 0
    children = multiprocessing.active_children()
    assert children
    for child in children:          # a terminal's Ctrl-C reaches the whole process group; SLURM sends SIGTERM
      os.kill(child.pid, signals.SIGINT)
      os.kill(child.pid, signals.SIGTERM)
    assert [int(next(loader)["x"][0]) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert all(child.is_alive() for child in children)
  finally:
    loader.close()


def test_a_stop_signal_while_the_worker_processes_start_does_not_kill_them():
  """The signals sent from the moment each worker process exists, before it has run any of its own
  code: a Ctrl-C pressed while the workers start must not leave the training process a dead worker."""
  import multiprocessing
  import signal as signals
  import threading
  import time
  from ewgs_jax.data import workers as loaders
  loader = loaders.ProcessLoader(_positions, 0, workers=2)
  first = []
  loading = threading.Thread(target=lambda: first.append(int(next(loader)["x"][0])), daemon=True)
  signalled: dict = {}
  try:
    loading.start()
    deadline = time.monotonic() + 60
    while loading.is_alive() or len(signalled) < 2:
      assert time.monotonic() < deadline, "the workers did not start in 60 s"
      for child in multiprocessing.active_children():
        if signalled.setdefault(child.pid, 0) < 3:     # at once, then twice more while it starts up
          os.kill(child.pid, signals.SIGINT)
          os.kill(child.pid, signals.SIGTERM)
          signalled[child.pid] += 1
      time.sleep(0.001)
    loading.join()
    assert first == [0]
    assert [int(next(loader)["x"][0]) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert len(signalled) == 2 and all(count >= 1 for count in signalled.values())
  finally:
    loading.join(60)
    loader.close()
