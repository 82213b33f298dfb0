"""Input pipeline throughput against the train step it feeds, with no download (issue 20).

    python benchmarks/bench_input.py [--workers 1,2] [--skip-steps] [--quick]

ImageNet style: synthetic JPEGs of ImageNet's sizes (sides 330-500 px, quality 90, textured so
that they hold about as many bytes per pixel as ImageNet's) served through the interface of
``tfds.data_source`` with encoded images (records ``{"image": bytes, "label"}``), read by
``data.TrainIterator`` exactly as a prepared ImageNet would be: random resized crop to 224 + flip
per image, uint8 batches. Measured in the same run:

* ``serial``: the per-image work as the project did it before (full-size PIL decode to an array, as
  ``tfds`` decodes, then the numpy + PIL crop of ``ewgs_jax/data.py`` at 4056d39), one core, no
  loader: the baseline;
* ``serial_new``: today's per-image work (:func:`ewgs_jax.data.host.random_resized_crop`, decoding
  at reduced scale where the crop allows), one core, no loader;
* the loader with 1..N grain worker processes (the library's path), and the alternatives: the same
  batches from a plain ``concurrent.futures`` process pool, and from threads in this process.

CIFAR shapes: an in-memory 50,000x32x32x3 uint8 array, batch 256, through ``data.TrainIterator``,
and beside it the host work of the old loader (crop + flip + normalise to float32 in numpy) alone.

Then the real jitted train step (device transform included) of W2A2 EWGS ResNet-20 (CIFAR) and
ResNet-18 (ImageNet) on this machine, so that each loader rate is also a ratio to what the step
consumes (``--skip-steps`` to skip; small batches on a CPU). Prints, last, one JSON line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved, train_case  # noqa: E402  (also tunes the host allocator before jax starts)

import jax  # noqa: E402
from PIL import Image  # noqa: E402

from ewgs_jax import data, parallel  # noqa: E402
from ewgs_jax.configs import load_config  # noqa: E402
from ewgs_jax.data import host  # noqa: E402

IMAGENET = data.DatasetInfo("imagenet2012", 1000, (224, 224, 3), *data.MEAN_STD["imagenet2012"])
CIFAR = data.DatasetInfo("cifar10", 10, (32, 32, 3), *data.MEAN_STD["cifar10"])


# --- synthetic ImageNet-sized JPEGs, served as tfds.data_source serves encoded records ---------------


def synthetic_jpegs(count: int, sides: tuple[int, int] = (330, 500), seed: int = 0) -> list[bytes]:
  """JPEGs with sides in ``sides`` (px): smooth colour fields plus pixel noise, quality 90."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
    coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
    noisy = np.clip(smooth + rng.integers(-24, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    out.append(buffer.getvalue())
  return out


class SyntheticJpegs:
  """``len``, ``[i]`` and ``__getitems__`` of records ``{"image": JPEG bytes, "label"}``, as
  ``tfds.data_source(..., decoders={"image": tfds.decode.SkipDecoding()})``; ``length`` records
  cycle through the distinct JPEGs."""

  def __init__(self, jpegs: list[bytes], length: int):
    self.jpegs, self.length = jpegs, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> dict:
    return {"image": self.jpegs[i % len(self.jpegs)], "label": i % 1000}

  def __getitems__(self, keys) -> list[dict]:
    return [self[k] for k in keys]


# --- the per-image work before this change (ewgs_jax/data.py at 4056d39), for the baseline -----------


def old_imagenet_train(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  h, w = image.shape[:2]
  top, left, ch, cw = host.crop_box(h, w, rng)    # the same draws as the old loop
  crop = Image.fromarray(image[top:top + ch, left:left + cw]).resize((224, 224), Image.BILINEAR)
  out = np.asarray(crop)
  return out[:, ::-1] if rng.random() < 0.5 else out


def old_cifar_host_transform(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The old loader's per-batch host work: to float, 4-pixel pad crop + flip, normalise."""
  x = batch.astype(np.float32) / 255.0
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  dy, dx = rng.integers(0, 9, size=(2, n))
  flips = rng.random(n) < 0.5
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return (x - np.asarray(CIFAR.mean, np.float32)) / np.asarray(CIFAR.std, np.float32)


def serial_rate(jpegs: list[bytes], new: bool, pass_index: int) -> float:
  """Images per second of the per-image work alone, in this process (one core), over one pass."""
  start = time.perf_counter()
  for i, encoded in enumerate(jpegs):
    rng = host.row_rng(0, pass_index, 0, i)
    if new:
      host.random_resized_crop(encoded, rng)
    else:
      old_imagenet_train(np.asarray(Image.open(io.BytesIO(encoded))), rng)   # tfds's PIL decode, then crop
  return len(jpegs) / (time.perf_counter() - start)


def drafted_fraction(jpegs: list[bytes]) -> float:
  """How often a training crop lets the JPEG decode at 1/2 scale or less (``PIL.Image.draft``)."""
  drafted = 0
  for i, encoded in enumerate(jpegs):
    image = Image.open(io.BytesIO(encoded))
    width, height = image.size
    _, _, ch, cw = host.crop_box(height, width, host.row_rng(0, 0, 0, i))
    image.draft("RGB", (-(-width * 224 // cw), -(-height * 224 // ch)))
    drafted += image.size[0] < width
  return drafted / len(jpegs)


def _spin(n: int) -> int:
  total = 0
  for i in range(n):
    total += i * i
  return total


def machine_scaling(processes: int, units: int = 4_000_000) -> float:
  """How much faster ``processes`` processes do ``processes`` units of pure-Python work than one does
  one: the scaling the machine offers right now (2.0 for two free cores; less when shared)."""
  times = []
  for k in (1, processes):
    with concurrent.futures.ProcessPoolExecutor(k, mp_context=multiprocessing.get_context("spawn")) as pool:
      list(pool.map(_spin, [1] * k))                      # processes started
      start = time.perf_counter()
      list(pool.map(_spin, [units] * k))
      times.append(time.perf_counter() - start)
  return processes * times[0] / times[1]


# --- loaders ------------------------------------------------------------------------------------------


def consume(batches, warmup: int, count: int) -> tuple[float, dict]:
  """Images per second over ``count`` batches after ``warmup`` batches and a drain.

  The drain takes what the loader buffered while nobody consumed (grain keeps several batches per
  worker) until a batch has to be waited for; from then on the timed batches are produced while the
  consumer waits (it takes each batch at once), so the rate is the loader's steady production.
  """
  for _ in range(warmup):
    batch = next(batches)
  for _ in range(256):
    start = time.perf_counter()
    batch = next(batches)
    if time.perf_counter() - start > 0.005:
      break
  start = time.perf_counter()
  images = 0
  for _ in range(count):
    batch = next(batches)
    images += len(batch["label"])
  return images / (time.perf_counter() - start) if count else 0.0, batch


_POOL_FN = None


def _pool_init(fn) -> None:
  global _POOL_FN
  _POOL_FN = fn


def _pool_call(position: int) -> dict:
  return _POOL_FN(position)


def pool_batches(fn, workers: int, ahead: int):
  """``fn(0), fn(1), ...`` from a plain spawn-context process pool (``fn`` sent once per worker),
  ``ahead`` batches in flight."""
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_pool_init, initargs=(fn,))
  futures, position = [], 0
  try:
    while True:
      while len(futures) < ahead:
        futures.append(pool.submit(_pool_call, position))
        position += 1
      yield futures.pop(0).result()
  finally:
    pool.shutdown(cancel_futures=True)


def imagenet_rates(args, source, jpegs) -> dict:
  """Median img/s over ``args.rounds`` rounds; each round times every setting once, in turn, so that
  a change of the machine's load hits all alike. Each loader is started, warmed up, drained
  (:func:`consume`), timed and closed on its own: no other loader refills its buffers meanwhile."""
  batches = data.TrainBatches(source, IMAGENET, global_batch_size=args.imagenet_batch, seed=0, augment=True,
                              rows=slice(0, args.imagenet_batch))
  makers = {}
  for workers in args.workers:
    makers[("grain", workers)] = lambda w=workers: data.TrainIterator(
        source, IMAGENET, global_batch_size=args.imagenet_batch, seed=0, workers=w, prefetch=2)
    makers[("pool", workers)] = lambda w=workers: pool_batches(batches, w, ahead=2 * w)
    makers[("threads", workers)] = lambda w=workers: data.workers.ThreadLoader(batches, 0, threads=w, prefetch=w)
  samples: dict = {key: [] for key in [("serial", 0), ("serial_new", 0), *makers]}
  for r in range(args.rounds):
    samples[("serial", 0)].append(serial_rate(jpegs, new=False, pass_index=r))
    samples[("serial_new", 0)].append(serial_rate(jpegs, new=True, pass_index=r))
    for key, make in makers.items():
      loader = make()
      rate, batch = consume(loader, args.warmup, args.imagenet_batches)
      loader.close()
      samples[key].append(rate)
  medians = {key: float(np.median(values)) for key, values in samples.items()}
  results: dict = {"serial": medians[("serial", 0)], "serial_new": medians[("serial_new", 0)],
                   "image_bytes": batch["image"][0].nbytes,
                   "batch_bytes_per_image": sum(v.nbytes for v in batch.values()) / len(batch["label"])}
  for engine in ("grain", "pool", "threads"):
    results[engine] = {w: medians[(engine, w)] for w in args.workers}
  for workers in args.workers:
    print(f"imagenet, {workers} worker(s): grain {results['grain'][workers]:7.1f} img/s, process pool "
          f"{results['pool'][workers]:7.1f}, threads {results['threads'][workers]:7.1f}", flush=True)
  return results


def cifar_rates(args) -> dict:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8)
  source = data.ArraySource(images, rng.integers(0, 10, 50000))
  it = data.TrainIterator(source, CIFAR, global_batch_size=256, seed=0, workers=args.cifar_threads)
  rate, batch = consume(it, 3, args.cifar_batches)
  it.close()
  old = data.TrainIterator(source, CIFAR, global_batch_size=256, seed=0, workers=args.cifar_threads)
  augment = np.random.default_rng(1)
  start = time.perf_counter()
  for _ in range(args.cifar_batches // 4):
    old_float = old_cifar_host_transform(next(old)["image"], augment)
  old_rate = 256 * (args.cifar_batches // 4) / (time.perf_counter() - start)
  old.close()
  prepare = jax.jit(data.device_transform(data.device_spec(CIFAR, augment=True)), static_argnames="train")
  device_s = time_interleaved({"t": lambda: prepare(batch, train=True)["image"]}, repeats=5)["t"]
  return {"img_s": rate, "image_bytes": batch["image"][0].nbytes,
          "batch_bytes_per_image": sum(v.nbytes for v in batch.values()) / 256,
          "old_host_float_img_s": old_rate, "old_image_bytes": old_float[0].nbytes,
          "device_transform_ms": device_s * 1e3}


# --- train steps ---------------------------------------------------------------------------------------


def step_rate(config_name: str, batch_size: int, info: data.DatasetInfo, repeats: int) -> float:
  """Images per second of the real jitted train step (device transform included), batch on device."""
  config = load_config(config_name, "w2a2_ewgs")
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  h, w, c = info.image_shape
  host_batch = {"image": rng.integers(0, 256, (batch_size, h, w, c), dtype=np.uint8),
                "label": rng.integers(0, info.num_classes, batch_size).astype(np.int32),
                "position": np.stack([np.zeros(batch_size), np.zeros(batch_size), np.zeros(batch_size),
                                      np.arange(batch_size)], 1).astype(np.uint32)}
  batch = parallel.shard_batch(host_batch, mesh)
  prepare = data.device_transform(data.device_spec(info, augment=True))
  run, _ = train_case(config, batch, mesh, prepare=prepare, num_classes=info.num_classes)
  return batch_size / time_interleaved({"step": run}, repeats=repeats)["step"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  cores = os.cpu_count() or 1
  parser.add_argument("--workers", default=",".join(str(w) for w in range(1, cores + 1)),
                      help="worker counts to measure (default: 1 to the number of cores)")
  parser.add_argument("--jpegs", type=int, default=96, help="distinct synthetic JPEGs")
  parser.add_argument("--sides", default="330,500", help="the JPEGs' smallest and largest side (px)")
  parser.add_argument("--imagenet-batch", type=int, default=32)
  parser.add_argument("--imagenet-batches", type=int, default=24, help="timed batches per setting and round")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of ImageNet-style timings (medians reported)")
  parser.add_argument("--warmup", type=int, default=2, help="batches at start-up, untimed")
  parser.add_argument("--cifar-batches", type=int, default=400)
  parser.add_argument("--cifar-threads", type=int, default=1)
  parser.add_argument("--skip-steps", action="store_true", help="do not time the ResNet train steps")
  parser.add_argument("--r20-batch", type=int, default=None, help="ResNet-20 step batch (default 256, CPU 64)")
  parser.add_argument("--r18-batch", type=int, default=None, help="ResNet-18 step batch (default 256, CPU 8)")
  parser.add_argument("--step-repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts (for the tests)")
  args = parser.parse_args()
  if args.quick:
    args.jpegs, args.imagenet_batch, args.imagenet_batches, args.warmup, args.cifar_batches = 8, 4, 2, 1, 8
    args.rounds = 1
  args.workers = [int(w) for w in args.workers.split(",")]
  cpu = jax.devices()[0].platform == "cpu"
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}) x{jax.device_count()}; "
        f"{cores} CPU cores; load average {os.getloadavg()[0]:.2f}", flush=True)

  jpegs = synthetic_jpegs(args.jpegs, tuple(int(v) for v in args.sides.split(",")))
  pixels = [Image.open(io.BytesIO(j)).size for j in jpegs]
  bytes_per_pixel = np.mean([len(j) / (w * h) for j, (w, h) in zip(jpegs, pixels)])
  print(f"{len(jpegs)} synthetic JPEGs, sides {args.sides} px, {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB on "
        f"average, {bytes_per_pixel:.2f} bytes/pixel; decoded at reduced scale for {drafted_fraction(jpegs):.0%} of "
        "the training crops", flush=True)
  source = data.RecordSource(SyntheticJpegs(jpegs, 1_000_000), name="synthetic_jpegs")
  scaling_before = machine_scaling(max(args.workers))
  imagenet = imagenet_rates(args, source, jpegs)
  scaling = (scaling_before + machine_scaling(max(args.workers))) / 2
  print(f"this machine's own scaling with {max(args.workers)} processes (pure-Python work, before and after the "
        f"ImageNet timings): {scaling:.2f}x", flush=True)
  serial, serial_new = imagenet["serial"], imagenet["serial_new"]
  print(f"imagenet serial, one core: before {serial:.1f} img/s; now {serial_new:.1f} img/s "
        f"({serial_new / serial:.2f}x per core)", flush=True)
  best_workers = max(imagenet["grain"], key=imagenet["grain"].get)
  best = imagenet["grain"][best_workers]
  print(f"imagenet best: grain {best_workers} worker(s) {best:.1f} img/s = {best / serial:.2f}x the serial one-core "
        f"rate before, {best / best_workers:.1f} img/s per worker; {imagenet['image_bytes']} bytes/image to the device "
        f"({imagenet['batch_bytes_per_image']:.0f} with label and position)", flush=True)

  cifar = cifar_rates(args)
  print(f"cifar shapes (50,000x32x32x3 uint8, batch 256): {cifar['img_s']:.0f} img/s, {cifar['image_bytes']} "
        "bytes/image "
        f"({cifar['batch_bytes_per_image']:.0f} with label and position); the old host work alone (float32 crop, flip, "
        f"normalise): {cifar['old_host_float_img_s']:.0f} img/s at {cifar['old_image_bytes']} bytes/image; the device "
        f"transform of a batch: {cifar['device_transform_ms']:.2f} ms here", flush=True)

  result = {"imagenet_img_s": round(best, 1), "imagenet_serial_img_s": round(serial, 1), "sides": args.sides,
            "imagenet_serial_new_img_s": round(serial_new, 1), "imagenet_speedup": round(best / serial, 2),
            "workers": best_workers, "machine_scaling": round(scaling, 2),
            "imagenet_by_workers": {str(k): round(v, 1) for k, v in imagenet["grain"].items()},
            "imagenet_pool_by_workers": {str(k): round(v, 1) for k, v in imagenet["pool"].items()},
            "imagenet_threads_by_workers": {str(k): round(v, 1) for k, v in imagenet["threads"].items()},
            "imagenet_bytes_per_image": imagenet["image_bytes"], "cifar_img_s": round(cifar["img_s"]),
            "cifar_bytes_per_image": cifar["image_bytes"],
            "cifar_old_host_float_img_s": round(cifar["old_host_float_img_s"]),
            "cores": cores, "load_average": round(os.getloadavg()[0], 2)}
  if not args.skip_steps:
    r20 = args.r20_batch or (64 if cpu else 256)
    r18 = args.r18_batch or (8 if cpu else 256)
    r20_rate = step_rate("cifar10_resnet20", r20, CIFAR, args.step_repeats)
    r18_rate = step_rate("imagenet_resnet18", r18, IMAGENET, args.step_repeats)
    print(f"train step only (W2A2 EWGS, device transform included): ResNet-20 batch {r20} {r20_rate:.1f} img/s, "
          f"ResNet-18 batch {r18} {r18_rate:.1f} img/s; loader/step: CIFAR {cifar['img_s'] / r20_rate:.1f}x, "
          f"ImageNet {best / r18_rate:.1f}x", flush=True)
    result.update(resnet20_step_img_s=round(r20_rate, 1), resnet18_step_img_s=round(r18_rate, 1),
                  cifar_loader_to_step=round(cifar["img_s"] / r20_rate, 2),
                  imagenet_loader_to_step=round(best / r18_rate, 2))
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
