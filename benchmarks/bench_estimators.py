"""Discretizer forward+backward cost against a plain ``stop_gradient`` STE (issue: goal <= 1.2x).

    python benchmarks/bench_estimators.py [--elements 4194304] [--repeats 15]

Times ``value_and_grad`` of ``sum(c * q(x))`` on a 4M-element float32 tensor, jitted, medians of
interleaved repeats; prints each discretizer's ratio to the plain STE. ``c`` (the cotangent) and
``delta``/``mu`` are jit *arguments*, as in training: closed-over constants let XLA fold
``delta * sign(c)`` into a precomputed 16 MB array, which measures something no training step does.
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, time_interleaved  # noqa: E402

import ewgs_jax as ej  # noqa: E402


def plain_ste(x, bits):
  n = 2 ** bits - 1
  return x + jax.lax.stop_gradient(jnp.round(x * n) / n - x)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--elements", type=int, default=4 * 1024 * 1024)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args()
  x = jax.random.uniform(jax.random.key(0), (args.elements,))
  c = jax.random.normal(jax.random.key(1), (args.elements,))
  factor = jnp.float32(0.1)  # delta for ewgs, mu for pege
  cases = {
      "plain STE (stop_gradient)": lambda x, b, f: plain_ste(x, b),
      "ewgs_jax.ste": lambda x, b, f: ej.ste(x, b),
      "ewgs_jax.ewgs": ej.ewgs,
      "ewgs_jax.pege": ej.pege,
  }
  fns = {}
  for name, q in cases.items():
    step = jax.jit(jax.value_and_grad(lambda x, c, f, q=q: jnp.sum(c * q(x, 2, f))))
    fns[name] = functools.partial(step, x, c, factor)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.elements:,} elements, bits=2")
  print_table(time_interleaved(fns, repeats=args.repeats), baseline="plain STE (stop_gradient)")


if __name__ == "__main__":
  main()
