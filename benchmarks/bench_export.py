"""Integer forward vs fake-quantized forward: images per second, side by side in one run.

    python benchmarks/bench_export.py [--model resnet20] [--bits 2] [--method interval] [--batch 256] [--repeats 7]

Three jitted inference forwards of the same weights on random 32x32x3 data, calls interleaved,
medians printed: the full-precision model (BatchNorm in inference mode), the fake-quantized model
(``model.apply(..., train=False)``: float convolutions of quantized values) and the exported integer
model (:func:`ewgs_jax.export.integer_model`: integer patches x packed weight levels, int32 dots,
folded BatchNorm), loaded back from its file. Ratios are against the fake-quantized forward.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved  # noqa: E402

from ewgs_jax import export, initialization, models  # noqa: E402
from ewgs_jax.layers import QuantConfig, QuantizerSpec  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--method", default="interval")
  parser.add_argument("--bits", type=int, default=2)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  spec = QuantizerSpec(args.method, "ste", args.bits)
  quant = QuantConfig(weight=spec, act=spec)
  model = models.get_model(args.model, num_classes=10, quant=quant)
  fp_model = models.get_model(args.model, num_classes=10, quant=None)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32))
  variables = jax.device_get(jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(0),
                                                                                               images))
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  fp_variables = {"params": {k: {n: p for n, p in v.items() if not n.startswith("q_")} if isinstance(v, dict) else v
                             for k, v in variables["params"].items()},
                  "batch_stats": variables["batch_stats"]}
  start = time.perf_counter()
  integer = export.integer_model(variables, model=model, image_shape=(32, 32, 3), platforms=("cpu",))
  export_s = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.npz")
    size = integer.save(path)
    integer = export.load(path)
  fake = jax.jit(lambda v, x: model.apply(v, x, train=False))
  fp = jax.jit(lambda v, x: fp_model.apply(v, x, train=False))
  fns = {"fp32": lambda: fp(fp_variables, images), "fake-quant": lambda: fake(variables, images),
         "integer": lambda: integer(images)}
  medians = time_interleaved(fns, repeats=args.repeats)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, {args.model} "
        f"W{args.bits}A{args.bits} {args.method}, batch {args.batch}, {args.repeats} interleaved repeats; "
        f"export {export_s:.1f} s, file {size} bytes (fp32 params {integer.metadata['fp_bytes']} bytes)")
  print(f"{'forward':<12} {'median s':>9} {'images/s':>9} {'/ fake-quant':>13}")
  for name, seconds in medians.items():
    print(f"{name:<12} {seconds:9.3f} {args.batch / seconds:9.0f} {medians['fake-quant'] / seconds:13.2f}x")


if __name__ == "__main__":
  main()
