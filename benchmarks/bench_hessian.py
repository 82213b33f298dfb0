"""Cost and spread of one EWGS delta refresh for W2A2 ResNet-20, joint vs blockwise Hutchinson
(EWGS Eq. 8-10), in units of one training step, measured in one run.

    python benchmarks/bench_hessian.py [--batch 256] [--batches 3] [--joint-samples 3]
        [--block-samples 1] [--block-batches 1] [--repeats 3] [--spread-samples 32]
        [--spread-block-samples 2] [--init-from FP_WORKDIR] [--data-dir TFDS_DIR]

1. Train step: ``steps.train_step`` jitted as training does (value_and_grad + optimizer update).
2. Refresh cost: the EWGS rule's ``DeltaRefresh`` action over ``--batches`` batches, no early stop, with
   ``--joint-samples`` HVPs per batch (joint), with the HVPs from ``jax.linearize`` (one gradient
   pass per batch, the default) and from a fresh ``jax.jvp`` per probe; and blockwise with
   ``--block-samples`` HVPs per block per batch over ``--block-batches`` batches (``blocks x
   samples`` HVPs per batch; its cost is also given per batch). Joint is repeated with different keys.
3. Spread at equal time: on one batch, single-sample Hutchinson values ``v_i^T (H v)_i / N_i``
   per block, for joint probes and for block-only probes. A blockwise sample costs one HVP for
   one block, a joint sample one HVP for all blocks, so at equal time the joint mean has
   ``blocks`` times as many samples: its standard error is ``sd_joint / sqrt(blocks * k)`` against
   ``sd_block / sqrt(k)``. Both are unbiased for the same block trace.
"""

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_interleaved, train_case  # noqa: E402

from ewgs_jax import checkpoints, data, hessian, initialization, parallel, rules, steps as steps_lib, training  # noqa: E402
from ewgs_jax.configs import load_config  # noqa: E402
from ewgs_jax.rules import ewgs as ewgs_rule  # noqa: E402


def per_sample_values(loss_fn, found, variables, batch, key, samples: int, blockwise: bool):
  """``[samples, blocks]`` single-sample Hutchinson values ``v_i^T (H v)_i / N_i``."""
  loss, zeros = hessian.probe_loss(loss_fn, variables, batch, found)
  leaves, treedef = jax.tree.flatten(zeros)
  _, hvp = jax.linearize(jax.grad(loss), zeros)
  n = len(leaves)

  def sample(key, mask):
    vs = [jax.random.rademacher(k, z.shape, jnp.float32) * m
          for k, z, m in zip(jax.random.split(key, n), leaves, mask)]
    hv = hvp(jax.tree.unflatten(treedef, vs))
    return jnp.stack([jnp.vdot(v, h) / v.size for v, h in zip(vs, jax.tree.leaves(hv))])

  keys = jax.random.split(key, samples)
  if not blockwise:
    return jax.lax.map(lambda k: sample(k, jnp.ones((n,))), keys)
  def one_block(i):
    mask = jax.nn.one_hot(i, n)
    return jax.lax.map(lambda k: sample(jax.random.fold_in(k, i), mask)[i], keys)
  return jax.lax.map(one_block, jnp.arange(n)).T


def _rel(spread, mean):
  """``spread / |mean|`` where the mean is nonzero (deltas clipped to 0 have no relative spread)."""
  keep = np.abs(mean) > 0
  return spread[keep] / np.abs(mean[keep]) if keep.any() else np.array([np.nan])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=3)
  parser.add_argument("--joint-samples", type=int, default=3)
  parser.add_argument("--block-samples", type=int, default=1)
  parser.add_argument("--block-batches", type=int, default=1, help="batches in the timed blockwise refresh")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--spread-samples", type=int, default=32)
  parser.add_argument("--spread-block-samples", type=int, default=2)
  parser.add_argument("--init-from", default=None,
                      help="workdir of a trained full-precision CIFAR-10 ResNet-20 run: warm start from it, as the "
                           "reference starts QAT (default: random initialisation)")
  parser.add_argument("--data-dir", default=None,
                      help="tfds data_dir with CIFAR-10 prepared: real training batches (default: random images)")
  args = parser.parse_args()
  mesh = parallel.make_mesh()
  config = load_config("cifar10_resnet20", "w2a2_ewgs")
  model = training.build_model(config, 10)
  if args.data_dir:
    train = data.make_train_iterator("cifar10", global_batch_size=args.batch, seed=0, data_dir=args.data_dir)
    prepare = jax.jit(data.device_transform(data.device_spec(train.info)), static_argnames="train")   # uint8 -> float
    batches = [prepare(parallel.shard_batch(train.batch_at(0, i), mesh), train=True) for i in range(args.batches)]
  else:
    rng = np.random.default_rng(0)
    batches = [parallel.shard_batch({"image": rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32),
                                     "label": rng.integers(0, 10, args.batch).astype(np.int32)}, mesh)
               for _ in range(args.batches)]
  fp_variables = checkpoints.load_variables(args.init_from) if args.init_from else None
  init = (functools.partial(initialization.init_variables, model) if fp_variables is None
          else functools.partial(initialization.warm_start, model, fp_variables))
  variables = jax.jit(init)(jax.random.key(0), batches[0]["image"])
  step, _ = train_case(config, batches[0], mesh)
  loss_fn = steps_lib.action_loss(model)
  found = hessian.find_quantizers(loss_fn, variables, batches[0], rule="ewgs")

  step_time = time_interleaved({"step": step}, repeats=3)["step"]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; batch {args.batch}; "
        f"train step {step_time:.3f} s", flush=True)

  refresh = {}
  names = found.paths
  for mode, hvp, samples, repeats, num in (("joint", "linearize", args.joint_samples, args.repeats, args.batches),
                                           ("joint", "jvp", args.joint_samples, 1, args.batches),
                                           ("blockwise", "linearize", args.block_samples, 1, args.block_batches)):
    # the EWGS rule's own refresh action, without its early stop
    action = ewgs_rule.DeltaRefresh(rules.get("ewgs").resolve(
        {"hessian_mode": mode, "hvp": hvp, "max_samples": samples, "tolerance": 0.0, "num_batches": num}))
    inputs = lambda key: rules.ActionInput(rules.Clock(10, 10, 1000), variables, loss_fn, batches[:num], key,
                                           lambda: False)
    jax.block_until_ready(action(inputs(jax.random.key(99)))[0])   # compile
    times, deltas = [], []
    for r in range(repeats):
      start = time.perf_counter()
      new, _ = action(inputs(jax.random.key(r)))
      times.append(time.perf_counter() - start)
      deltas.append([float(jax.tree.leaves(new)[q.leaf]) for q in found.ordered])
    if hvp == "linearize":
      refresh[mode] = (np.median(times), np.asarray(deltas), names)
    per_batch = np.median(times) / num
    print(f"{mode:>9} refresh, hvp {hvp:<9} ({num} batches, {samples} samples{' per block' if mode == 'blockwise' else ''}):"
          f" {np.median(times):8.2f} s = {np.median(times) / step_time:6.1f} training steps"
          f" ({per_batch / step_time:.1f} per batch)", flush=True)

  joint_deltas, block_deltas, names = refresh["joint"][1], refresh["blockwise"][1][0], refresh["joint"][2]
  print(f"delta: joint refresh-to-refresh spread over {args.repeats} refreshes (std/mean, median over quantizers "
        f"with a nonzero mean) {np.median(_rel(joint_deltas.std(0), joint_deltas.mean(0))):.1%}")

  def values(key, samples, blockwise):
    return np.asarray(jax.jit(functools.partial(per_sample_values, loss_fn, found), static_argnums=(3, 4))(
        variables, batches[0], key, samples, blockwise))
  joint = values(jax.random.key(7), args.spread_samples, False)
  block = values(jax.random.key(8), args.spread_block_samples, True)
  n = joint.shape[1]
  sd_joint, sd_block = joint.std(0, ddof=1), block.std(0, ddof=1)
  se_joint, se_block = sd_joint / np.sqrt(len(joint)), sd_block / np.sqrt(len(block))
  z = np.abs(joint.mean(0) - block.mean(0)) / np.sqrt(se_joint**2 + se_block**2)
  print(f"per-sample Hutchinson values on one batch ({len(joint)} joint, {len(block)} blockwise samples, {n} blocks): "
        f"sd_joint/sd_block median {np.median(sd_joint / sd_block):.2f}; joint vs blockwise mean |z| median "
        f"{np.median(z):.2f}, {np.mean(z < 2):.0%} of blocks within 2 standard errors (both unbiased)")
  ratio = (sd_joint / np.sqrt(n)) / sd_block
  print(f"standard error at equal HVP count (a joint sample serves all {n} blocks) joint/blockwise: median "
        f"{np.median(ratio):.2f} (min {ratio.min():.2f}, max {ratio.max():.2f})")
  # Samples each estimator needs for a 10 % relative standard error of every block trace, priced at the
  # measured cost of one HVP (the blockwise refresh's time per HVP) in training steps.
  hvp_steps = refresh["blockwise"][0] / (n * args.block_samples * args.block_batches) / step_time
  trace = np.abs((joint.mean(0) / se_joint**2 + block.mean(0) / se_block**2) / (1 / se_joint**2 + 1 / se_block**2))
  need_joint, need_block = (sd_joint / (0.1 * trace))**2, (sd_block / (0.1 * trace))**2
  print(f"one HVP = {hvp_steps:.2f} training steps; for a 10% relative standard error on one batch, joint needs "
        f"{np.median(need_joint):.0f} samples for the median block and {need_joint.max():.0f} for all blocks "
        f"({need_joint.max() * hvp_steps:.0f} training steps); blockwise needs {np.median(need_block):.0f} per median block "
        f"and {need_block.sum():.0f} HVPs for all blocks ({need_block.sum() * hvp_steps:.0f} training steps)")
  k = args.batches * args.joint_samples
  print(f"relative standard error of the joint trace with {k} samples (the timed joint refresh): median "
        f"{np.median(sd_joint / np.sqrt(k) / trace):.1%}, max {np.max(sd_joint / np.sqrt(k) / trace):.1%}")
  print(f"{'quantizer':<34} {'delta joint':>11} {'+-':>8} {'blockwise':>10} {'trace/N':>10} {'sd joint':>9} {'sd block':>9}")
  for i, name in enumerate(names):
    print(f"{name:<34} {joint_deltas.mean(0)[i]:>11.4g} {joint_deltas.std(0)[i]:>8.2g} {block_deltas[i]:>10.4g} "
          f"{joint.mean(0)[i]:>10.3g} {sd_joint[i]:>9.2g} {sd_block[i]:>9.2g}")


if __name__ == "__main__":
  main()
