"""ResNet-20 training-step cost: full precision vs W2A2 STE / EWGS / PEGE, XLA vs fast conv.

    python benchmarks/bench_resnet20.py [--batch 256] [--repeats 5] [--conv auto,xla,fast]
    python benchmarks/bench_resnet20.py --cases fp,ste,pege,pege:rbg,pege:unsafe_rbg   # PEGE mask PRNGs

Each case is the real jitted ``train_step`` of :mod:`ewgs_jax.steps` (forward, backward,
optimizer update, BatchNorm) on random 32x32x3 data, timed with interleaved repeats. Prints
medians, images/s, and every case's ratio to full precision with the same convolution.
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved, train_case  # noqa: E402

from ewgs_jax import ops, parallel  # noqa: E402
from ewgs_jax.configs import load_config  # noqa: E402


def make_case(rule: str | None, batch: dict, mesh, steps: int = 1000, conv_impl: str = "auto",
              rng_impl: str = "threefry2x32"):
  config = load_config("cifar10_resnet20", "fp" if rule is None else f"w2a2_{rule}")
  config.conv_impl = conv_impl
  return train_case(config, batch, mesh, steps, rng_impl)[0]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--conv", default="auto")
  parser.add_argument("--cases", default="fp,ste,ewgs,pege")
  args = parser.parse_args()
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({"image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
                                "label": rng.integers(0, 10, args.batch).astype(np.int32)}, mesh)
  fns = {}
  for impl in args.conv.split(","):
    for case in args.cases.split(","):
      rule, _, rng_impl = case.partition(":")
      fns[f"{case} / conv {ops.selected_impl(impl)}"] = make_case(None if rule == "fp" else rule, batch, mesh,
                                                                   conv_impl=impl, rng_impl=rng_impl or "threefry2x32")
  medians = time_interleaved(fns, repeats=args.repeats)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, batch {args.batch}")
  print(f"{'case':<24} {'median s':>10} {'images/s':>10} {'vs fp (same conv)':>18}")
  for name, seconds in medians.items():
    fp = medians[f"fp / {name.split(' / ')[1]}"] if f"fp / {name.split(' / ')[1]}" in medians else float("nan")
    print(f"{name:<24} {seconds:>10.3f} {args.batch / seconds:>10.0f} {seconds / fp:>18.3f}")


if __name__ == "__main__":
  main()
