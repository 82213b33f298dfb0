"""Quantized-layer overhead: forward+backward of ResNet-20 W2A2 (EWGS backward) vs full precision.

    python benchmarks/bench_layers.py [--batch 256] [--repeats 5]

Times ``jax.value_and_grad`` of the cross-entropy loss (BatchNorm in train mode, batch-stat update
returned) w.r.t. ``params``, jitted, on random 32x32x3 data. Only the model differs between the two
cases (no optimizer), so the ratio is the cost of the quantizers, their custom-VJP backward rules
(EWGS Eq. 4) and the alpha scale (EWGS Sec. 3.1). Calls are interleaved; medians are printed.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved  # noqa: E402

from ewgs_jax import initialization, layers, models  # noqa: E402
from ewgs_jax.layers import QuantConfig, QuantizerSpec  # noqa: E402

W2A2_EWGS = QuantConfig(weight=QuantizerSpec("interval", "ewgs", 2), act=QuantizerSpec("interval", "ewgs", 2))


def make_case(quant, images, labels):
  model = models.get_model("resnet20", num_classes=10, quant=quant)
  variables = jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(0), images)
  params = variables.pop("params")

  @jax.jit
  def step(params, rest, images, labels):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, **rest}, images, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return lambda: step(params, variables, images, labels)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, args.batch).astype(np.int32))
  fns = {"fp32": make_case(None, images, labels), "w2a2 ewgs": make_case(W2A2_EWGS, images, labels)}
  medians = time_interleaved(fns, repeats=args.repeats)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"batch {args.batch}, {args.repeats} interleaved repeats")
  for name, seconds in medians.items():
    print(f"{name:<12} median {seconds:8.3f} s  {args.batch / seconds:7.0f} images/s")
  print(f"ratio w2a2 ewgs / fp32: {medians['w2a2 ewgs'] / medians['fp32']:.3f} (goal <= 1.3)")


if __name__ == "__main__":
  main()
