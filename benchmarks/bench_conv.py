"""Convolution weight-gradient cost per ResNet-20 layer shape: XLA vs ``ewgs_jax.ops``.

    python benchmarks/bench_conv.py [--batch 256] [--repeats 7] [--step-repeats 3]
        [--torch-python /tmp/torchenv/bin/python --ewgs-src /tmp/EWGS/src]

For each 3x3 layer shape of ResNet-20 at batch 256, times (jitted, interleaved medians) the
weight gradient (VJP with respect to the kernel only) with XLA's convolution transpose and with
the per-tap formulation of :mod:`ewgs_jax.ops`, the full VJP (input and weight gradients), and the
full VJP as the body of a ``fori_loop`` ("loop": XLA:CPU leaves gradient convolutions in loop
bodies as naive loop nests; the Hessian estimate's samples run in one).
Then the real jitted W2A2 (EWGS) ResNet-20 ``train_step`` at the same batch, each configuration
alone in a fresh subprocess as a training run would be (the allocator tuning must precede the
backend, and two executables interleaved in one process share and fragment its heap): conv xla
and fast with the host allocator tuned (:mod:`ewgs_jax.hostmem`, what ``train.py`` does on CPU),
and conv fast (the CPU default) with glibc's defaults.
If ``--torch-python`` and ``--ewgs-src`` are given, also the official PyTorch EWGS W2A2 ResNet-20
step (forward, backward, both Adam steps; run from a scratch checkout of cvlab-yonsei/EWGS in a
subprocess, so nothing of it lives in this repository), as the official code runs (glibc defaults)
and with the same allocator settings given through the environment, for a like-for-like ratio.
The five subprocesses run one after another, ``--rounds`` times in turn; medians over rounds (the
2-core VMs this was written on vary by up to ~1.8x from process to process, so use several).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_interleaved  # noqa: E402

from ewgs_jax import hostmem, ops  # noqa: E402

# (spatial, in channels, out channels, stride) of ResNet-20's 3x3 convolutions
SHAPES = [(32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2), (8, 64, 64, 1)]

# Times the official EWGS CIFAR-10 W2A2 ResNet-20 train step (the loop body of train_quant.py) on
# random data; written here so the benchmark needs only the official source, never a copy of it.
TORCH_DRIVER = """'''Times the official EWGS W2A2 ResNet-20 train step (CIFAR10/train_quant.py loop body) on CPU.

Usage: torch_step.py EWGS_SRC BATCH REPEATS  -> prints 'TORCH_STEP_MEDIAN_S <seconds>'.
Random 32x32 data; Adam(1e-3, wd 1e-4) for model params, Adam(1e-5) for quantizer params,
as in the official defaults. The first step (data-driven init of the quantizers) is excluded.
'''
import argparse, os, statistics, sys, time
src, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, os.path.join(src, "CIFAR10"))
import torch
from custom_models import resnet20_quant
from custom_modules import QConv
args = argparse.Namespace(QActFlag=True, QWeightFlag=True, act_levels=4, weight_levels=4, baseline=False,
                          bkwd_scaling_factorA=0.0, bkwd_scaling_factorW=0.0, num_classes=10)
torch.manual_seed(0)
model = resnet20_quant(args)
model.train()
quant = []
for m in model.modules():
  if isinstance(m, QConv):
    quant += [p for n, p in m.named_parameters() if n in ("lW", "uW", "lA", "uA", "output_scale")]
qid = {id(p) for p in quant}
rest = [p for p in model.parameters() if id(p) not in qid]
opt_m = torch.optim.Adam(rest, lr=1e-3, weight_decay=1e-4)
opt_q = torch.optim.Adam(quant, lr=1e-5)
crit = torch.nn.CrossEntropyLoss()
x = torch.randn(batch, 3, 32, 32)
y = torch.randint(0, 10, (batch,))
def step():
  opt_m.zero_grad(); opt_q.zero_grad()
  loss = crit(model(x), y); loss.backward()
  opt_m.step(); opt_q.step()
  return loss.item()
step(); step()
times = []
for _ in range(repeats):
  t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("TORCH_STEP_MEDIAN_S", statistics.median(times))
"""


def grads(impl, x, w, g, stride, what):
  def conv(x_, w_):
    return ops.conv_general_dilated(x_, w_, (stride, stride), [(1, 1), (1, 1)], dimension_numbers=ops.NHWC,
                                    impl=impl)

  if what == "weight":
    fn = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
  elif what == "both":
    fn = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))
  else:   # "loop": the full VJP as the body of a one-trip fori_loop (trip count unknown to XLA)
    def looped(x, w, g, n):
      body = lambda i, acc: jax.tree.map(jnp.add, acc, jax.vjp(conv, x, w)[1](g * (1.0 + i)))
      return jax.lax.fori_loop(0, n, body, (jnp.zeros_like(x), jnp.zeros_like(w)))
    fn = jax.jit(lambda x, w, g: looped(x, w, g, jnp.int32(1)))
  jax.block_until_ready(fn(x, w, g))   # compile
  return lambda: fn(x, w, g)


def train_step_time(batch_size: int, repeats: int, impl: str) -> float:
  """Median seconds of the real jitted W2A2 EWGS ResNet-20 train step with conv ``impl``."""
  import numpy as np
  from bench_resnet20 import make_case
  from ewgs_jax import parallel
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
                                "label": rng.integers(0, 10, batch_size).astype(np.int32)}, mesh)
  run = make_case("ewgs", batch, mesh, conv_impl=impl)
  jax.block_until_ready(run())   # compile
  return time_interleaved({impl: run}, repeats=repeats)[impl]


def _clean_env(tuned_malloc: bool) -> dict[str, str]:
  """This environment without glibc malloc settings, plus ``hostmem.ENV`` if ``tuned_malloc``."""
  env = {k: v for k, v in os.environ.items() if k not in hostmem.ENV}
  return env | hostmem.ENV if tuned_malloc else env


def torch_step(torch_python: str, ewgs_src: str, batch_size: int, repeats: int, tuned_malloc: bool) -> float:
  """Median seconds of the official PyTorch EWGS W2A2 ResNet-20 step, in a subprocess."""
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(TORCH_DRIVER)
  result = subprocess.run([torch_python, f.name, ewgs_src, str(batch_size), str(repeats)], capture_output=True,
                          text=True, env=_clean_env(tuned_malloc))
  os.unlink(f.name)
  if result.returncode != 0:   # e.g. the official code also needs numpy in the torch venv
    raise RuntimeError(f"torch driver failed:\n{result.stderr[-3000:]}")
  return float(result.stdout.split("TORCH_STEP_MEDIAN_S")[1])


def jax_step(batch_size: int, repeats: int, impl: str, host_allocator: str) -> float:
  """``train_step_time`` in a fresh subprocess whose host allocator is set before JAX starts."""
  cmd = [sys.executable, os.path.abspath(__file__), "--steps-only", host_allocator, "--conv", impl,
         "--batch", str(batch_size), "--step-repeats", str(repeats)]
  env = _clean_env(False) | {"EWGS_BENCH_HOST_ALLOCATOR": host_allocator}   # read by common.py at import
  result = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if result.returncode != 0:
    raise RuntimeError(f"step subprocess failed:\n{result.stderr[-3000:]}")
  return float(result.stdout.split("STEP_MEDIAN_S")[1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--step-repeats", type=int, default=3)
  parser.add_argument("--skip-layers", action="store_true")
  parser.add_argument("--torch-python", default=None)
  parser.add_argument("--ewgs-src", default=None, help="scratch checkout of cvlab-yonsei/EWGS")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps-only", choices=("tuned", "system"), help=argparse.SUPPRESS)   # subprocess mode
  parser.add_argument("--conv", choices=("xla", "fast"), default="xla", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.steps_only:
    assert hostmem.tune(args.steps_only) == (args.steps_only == "tuned"), "set by common.py at import"
    print("STEP_MEDIAN_S", train_step_time(args.batch, args.step_repeats, args.conv))
    return
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}")
  print(f"{'layer (HxW, cin->cout, stride)':<32} {'xla dW ms':>10} {'fast dW ms':>11} {'ratio':>7} "
        f"{'xla dX+dW':>10} {'fast dX+dW':>11} {'ratio':>7} {'xla loop':>10} {'fast loop':>11} {'ratio':>7}")
  for hw, cin, cout, stride in [] if args.skip_layers else SHAPES:
    keys = jax.random.split(jax.random.key(hw * cin + cout), 3)
    x = jax.random.normal(keys[0], (args.batch, hw, hw, cin))
    w = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.1
    g = jax.random.normal(keys[2], (args.batch, hw // stride, hw // stride, cout))
    fns = {f"{impl}-{what}": grads(impl, x, w, g, stride, what)
           for what in ("weight", "both", "loop") for impl in ("xla", "fast")}
    m = time_interleaved(fns, repeats=args.repeats)
    print(f"{f'{hw}x{hw}, {cin}->{cout}, s{stride}':<32} "
          + " ".join(f"{m['xla-' + what] * 1e3:>10.1f} {m['fast-' + what] * 1e3:>11.1f} "
                     f"{m['fast-' + what] / m['xla-' + what]:>7.2f}" for what in ("weight", "both", "loop")))

  torch = bool(args.torch_python and args.ewgs_src)
  runs: dict[str, list[float]] = {}
  for _ in range(args.rounds):
    for impl, alloc in (("xla", "tuned"), ("fast", "tuned"), ("fast", "system")):
      runs.setdefault(f"ours, conv {impl}, malloc {alloc}", []).append(
          jax_step(args.batch, args.step_repeats, impl, alloc))
    for alloc in ("system", "tuned") if torch else ():
      runs.setdefault(f"official torch, malloc {alloc}", []).append(
          torch_step(args.torch_python, args.ewgs_src, args.batch, args.step_repeats, alloc == "tuned"))
  med = {name: statistics.median(v) for name, v in runs.items()}
  print(f"\nW2A2 EWGS ResNet-20 train step, batch {args.batch} (median over {args.rounds} rounds of "
        f"{args.step_repeats}-step medians)")
  ref = {alloc: med.get(f"official torch, malloc {alloc}") for alloc in ("system", "tuned")}
  print(f"{'case':<34} {'s/step':>8} {'/ torch same malloc':>20} {'/ torch as shipped':>19}")
  for name, seconds in med.items():
    alloc = name.rsplit(" ", 1)[1]
    same = f"{seconds / ref[alloc]:.2f}" if ref[alloc] else "-"
    shipped = f"{seconds / ref['system']:.2f}" if ref["system"] else "-"
    print(f"{name:<34} {seconds:>8.3f} {same:>20} {shipped:>19}")


if __name__ == "__main__":
  main()
