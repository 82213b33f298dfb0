"""Timing helpers shared by the benchmarks: interleaved repeats, medians, ratios."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

from ewgs_jax import hostmem

# As train.py does on CPU: before JAX starts, keep freed buffers mapped (see ewgs_jax.hostmem).
# EWGS_BENCH_HOST_ALLOCATOR=system measures glibc's defaults instead.
hostmem.tune(os.environ.get("EWGS_BENCH_HOST_ALLOCATOR", "auto"))

import jax  # noqa: E402


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
  """Median seconds per call of each thunk, calls interleaved so that drift hits all alike."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in samples.items()}


def print_table(medians: dict[str, float], baseline: str, unit: str = "ms") -> None:
  scale = 1e3 if unit == "ms" else 1.0
  print(f"{'case':<32} {'median ' + unit:>12} {'ratio':>8}")
  for name, value in medians.items():
    print(f"{name:<32} {value * scale:>12.2f} {value / medians[baseline]:>8.3f}")


def train_case(config, batch: dict, mesh, steps: int = 1000, rng_impl: str = "threefry2x32", prepare=None,
               num_classes: int = 10):
  """The training program's own jitted train step for ``config`` (ResNet on ``batch``), as a thunk.

  ``prepare`` is the device-side batch transform (``data.device_transform``) for uint8 batches, as
  the training program runs it first in the step; ``None`` for float batches.

  Returns:
    ``(run, parts)``: ``run()`` does one step and returns its loss; ``parts`` holds the model, the
    initial variables, the QAT object (``None`` for full precision) and ``lower()``, the step lowered
    for the current state (``lower().compile()`` compiles ahead of time, e.g. in a thread, without
    running a step; ``run()`` then reuses that executable).
  """
  import jax.numpy as jnp
  from ewgs_jax import initialization, parallel, steps as steps_lib, training
  from ewgs_jax.qat import QAT
  model = training.build_model(config, num_classes)
  tx = steps_lib.make_optimizer(config, steps, steps)
  prepare = prepare or steps_lib.identity
  images = jax.jit(prepare, static_argnames="train")(batch, train=True)["image"]
  variables = jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(0), images)
  qat = None
  if config.quant.enabled:
    rules = initialization.layer_report(model, images, train=True).rules()
    qat = QAT(model.quant, total_steps=steps, rules=rules)
  train_step, _ = steps_lib.compile_steps(model, tx, qat, mesh, prepare)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)       # the train step donates its state
  state = steps_lib.TrainState(step=jnp.zeros((), jnp.int32), params=copy(variables["params"]),
                               batch_stats=copy(variables["batch_stats"]),
                               quant_state=copy(variables.get("quant_state", {})),
                               opt_state=tx.init(variables["params"]))
  # Replicated on the mesh as the step returns it: a state without the mesh in its type would make the
  # second call trace and compile the step again (inside the first timed repeat).
  holder = {"state": jax.device_put(state, parallel.replicated(mesh))}
  key = jax.random.key(1, impl=rng_impl)   # the replacement masks' PRNG (config pege.rng_impl)

  def run():
    holder["state"], metrics = train_step(holder["state"], batch, key)
    return metrics["loss"]

  return run, {"model": model, "variables": variables, "qat": qat,
               "lower": lambda: train_step.lower(holder["state"], batch, key)}
