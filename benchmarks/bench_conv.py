"""Convolution weight-gradient cost per ResNet-20 layer shape: XLA vs ``ewgs_jax.ops``.

    python benchmarks/bench_conv.py [--batch 256] [--repeats 7]

For each 3x3 layer shape of ResNet-20 at batch 256, times (jitted, interleaved medians) the
weight gradient (VJP with respect to the kernel only) with XLA's convolution transpose and with
the per-tap formulation of :mod:`ewgs_jax.ops`, and the full VJP (input and weight gradients).
"""

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_interleaved  # noqa: E402

from ewgs_jax import ops  # noqa: E402

# (spatial, in channels, out channels, stride) of ResNet-20's 3x3 convolutions
SHAPES = [(32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2), (8, 64, 64, 1)]


def grads(impl, x, w, g, stride, what):
  with ops.conv_impl(impl):
    def conv(x_, w_):
      return ops.conv_general_dilated(x_, w_, (stride, stride), [(1, 1), (1, 1)], dimension_numbers=ops.NHWC)

    if what == "weight":
      fn = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
    else:
      fn = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))
    jax.block_until_ready(fn(x, w, g))   # compile under the chosen implementation
  return lambda: fn(x, w, g)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}")
  print(f"{'layer (HxW, cin->cout, stride)':<32} {'xla dW ms':>10} {'fast dW ms':>11} {'ratio':>7} "
        f"{'xla dX+dW':>10} {'fast dX+dW':>11} {'ratio':>7}")
  for hw, cin, cout, stride in SHAPES:
    keys = jax.random.split(jax.random.key(hw * cin + cout), 3)
    x = jax.random.normal(keys[0], (args.batch, hw, hw, cin))
    w = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.1
    g = jax.random.normal(keys[2], (args.batch, hw // stride, hw // stride, cout))
    fns = {f"{impl}-{what}": grads(impl, x, w, g, stride, what) for what in ("weight", "both") for impl in ("xla", "fast")}
    m = time_interleaved(fns, repeats=args.repeats)
    print(f"{f'{hw}x{hw}, {cin}->{cout}, s{stride}':<32} {m['xla-weight'] * 1e3:>10.1f} {m['fast-weight'] * 1e3:>11.1f} "
          f"{m['fast-weight'] / m['xla-weight']:>7.2f} {m['xla-both'] * 1e3:>10.1f} {m['fast-both'] * 1e3:>11.1f} "
          f"{m['fast-both'] / m['xla-both']:>7.2f}")


if __name__ == "__main__":
  main()
