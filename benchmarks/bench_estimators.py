"""Discretizer forward+backward cost against a plain ``stop_gradient`` STE (issue: goal <= 1.2x).

    python benchmarks/bench_estimators.py [--elements 4194304] [--repeats 15]

Times ``value_and_grad`` of ``sum(c * q(x))`` on a 4M-element float32 tensor, jitted, medians of
interleaved repeats; prints each discretizer's ratio to the plain STE.
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
  delta, mu = jnp.float32(0.1), jnp.float32(0.01)
  cases = {
      "plain STE (stop_gradient)": plain_ste,
      "ewgs_jax.ste": ej.ste,
      "ewgs_jax.ewgs": lambda x, b: ej.ewgs(x, b, delta),
      "ewgs_jax.pege": lambda x, b: ej.pege(x, b, mu),
  }
  fns = {}
  for name, q in cases.items():
    step = jax.jit(jax.value_and_grad(lambda x, q=q: jnp.sum(c * q(x, 2))))
    fns[name] = functools.partial(step, x)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.elements:,} elements, bits=2")
  print_table(time_interleaved(fns, repeats=args.repeats), baseline="plain STE (stop_gradient)")


if __name__ == "__main__":
  main()
