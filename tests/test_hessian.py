"""Hutchinson traces over quantizer outputs and the EWGS delta rule (EWGS Eq. 8-10)."""

import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ewgs_jax import hessian, initialization, layers, losses, names, rules
from ewgs_jax.layers import QuantConfig, QuantConv, QuantDense, QuantizerSpec
from ewgs_jax.rules import ewgs as ewgs_rule
from tests import test_ops


class TinyMLP(nn.Module):
  """Two quantized dense layers with BatchNorm between them: 4 probe blocks, 40 probe elements."""
  quant: QuantConfig

  @nn.compact
  def __call__(self, x, train=False, ctx=None):
    x = QuantDense(4, quant=self.quant, name="d1")(x, ctx)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    return QuantDense(3, quant=self.quant, name="d2")(x, ctx)


def quant(backward):
  return QuantConfig(weight=QuantizerSpec("interval", backward, 2), act=QuantizerSpec("interval", backward, 2))


@pytest.fixture(scope="module")
def setup():
  """A tiny model, its variables (delta > 0 so EWGS differs from STE) and a batch."""
  x = jax.random.normal(jax.random.key(0), (4, 2)) + 0.5
  batch = {"image": x, "label": jnp.asarray([0, 1, 2, 1])}
  out = {}
  for backward in ("ste", "ewgs", "pege"):
    model = TinyMLP(quant(backward))
    variables = jax.jit(lambda k, x, m=model: initialization.init_variables(m, k, x))(jax.random.key(1), x)
    variables["quant_state"] = jax.tree.map(lambda d: d + 2.0, variables["quant_state"])
    out[backward] = (model, variables)
  return out, batch


def classification_loss(model):
  """The training loss as the Hessian code takes it: ``loss(variables, batch)``, BatchNorm on batch statistics."""
  def loss(variables, batch):
    logits, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    return losses.mean_cross_entropy(logits, batch["label"])
  return loss


def probe_loss(model, variables, batch):
  """``(loss(probes), zero probes)`` over every quantizer of ``model``, in path order."""
  loss_fn = classification_loss(model)
  return hessian.probe_loss(loss_fn, variables, batch, hessian.find_quantizers(loss_fn, variables, batch))


def estimate(model, variables, batch, key, **kwargs):
  """``[(path, Tr(H)/N, sigma, samples)]`` per quantizer, from the jitted estimate."""
  loss_fn = classification_loss(model)
  found = hessian.find_quantizers(loss_fn, variables, batch)
  traces, sigmas, counts = jax.jit(hessian.trace_fn(loss_fn, found, **kwargs))(variables, batch, key)
  return list(zip(found.paths, np.asarray(traces), np.asarray(sigmas), np.asarray(counts)))


def refresh(variables, batches, key, **settings):
  """The EWGS rule's delta refresh (its action) on ``variables``: ``(new variables, metrics)``."""
  model = TinyMLP(quant("ewgs"))
  action = ewgs_rule.DeltaRefresh(rules.get("ewgs").resolve(settings))
  clock = rules.Clock(step=10, steps_per_epoch=10, total_steps=100)
  return action(rules.ActionInput(clock, variables, classification_loss(model), batches, key, lambda: False))


_EXACT = {}


def exact_block_traces(model, variables, batch):
  """Tr(H_ii)/N_i per probe block from the full Jacobian of the gradient (``jax.hessian``)."""
  loss, zeros = probe_loss(model, variables, batch)
  flat, unravel = ravel_pytree(zeros)
  if id(model) not in _EXACT:
    _EXACT[id(model)] = np.asarray(jax.jit(jax.hessian(lambda z: loss(unravel(z))))(flat))
  h = _EXACT[id(model)]
  sizes = [leaf.size for leaf in jax.tree.leaves(zeros)]
  bounds = np.cumsum([0] + sizes)
  return h, bounds, np.asarray([np.trace(h[a:b, a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("backward", ["ste", "ewgs"])
def test_all_rademacher_vectors_give_the_exact_block_trace(setup, backward):
  models, batch = setup
  model, variables = models[backward]
  loss, zeros = probe_loss(model, variables, batch)
  h, bounds, exact = exact_block_traces(model, variables, batch)
  grad_fn = jax.grad(loss)
  leaves, treedef = jax.tree.flatten(zeros)
  block = int(np.argmin(np.diff(bounds)))            # the smallest block (the 4x... weight probe)
  n = bounds[block + 1] - bounds[block]
  assert n <= 12

  @jax.jit
  def sample(v_block):
    vs = [v_block.reshape(leaf.shape) if i == block else jnp.zeros_like(leaf) for i, leaf in enumerate(leaves)]
    _, hv = jax.jvp(grad_fn, (zeros,), (jax.tree.unflatten(treedef, vs),))
    return jnp.vdot(vs[block], jax.tree.leaves(hv)[block])

  signs = jnp.asarray(list(itertools.product([-1.0, 1.0], repeat=int(n))))
  mean = float(jnp.mean(jax.vmap(sample)(signs)))
  np.testing.assert_allclose(mean / n, exact[block], rtol=1e-4, atol=1e-7)


def sample_std(h, bounds, block, joint, samples=20_000, seed=0):
  """Std of a single Hutchinson sample for ``block``, by simulation on the exact matrix."""
  v = np.random.default_rng(seed).choice([-1.0, 1.0], size=(samples, h.shape[0]))
  a, b = bounds[block], bounds[block + 1]
  if not joint:
    v[:, :a] = 0
    v[:, b:] = 0
  values = np.einsum("si,si->s", v[:, a:b], v @ h.T[:, a:b])
  return values.std() / (b - a)


@pytest.mark.parametrize("mode", ["joint", "blockwise"])
@pytest.mark.parametrize("backward", ["ste", "ewgs"])
def test_estimates_converge_to_exact_block_traces(setup, mode, backward):
  models, batch = setup
  model, variables = models[backward]
  h, bounds, exact = exact_block_traces(model, variables, batch)
  samples = 400
  result = estimate(model, variables, batch, jax.random.key(3), mode=mode, max_samples=samples, tolerance=0.0)
  assert len(result) == len(exact) == 4
  for i, (_, trace, _, count) in enumerate(result):
    assert count == samples
    tolerance = 5 * sample_std(h, bounds, i, mode == "joint") / np.sqrt(samples) + 1e-6
    assert abs(trace - exact[i]) < tolerance, (i, trace, exact[i], tolerance)


@pytest.mark.parametrize("backward", ["ste", "ewgs", "pege"])
def test_forward_over_reverse_equals_reverse_over_reverse_per_sample(setup, backward):
  """v^T H v per sample, for joint probes (whole vector) and for block-only probes (each block).

  With EWGS the surrogate "Hessian" J is not symmetric: J v and J^T v differ, and so do the
  block parts v_i^T (J v)_i of a joint probe, but v^T J v and block-only samples agree.
  """
  models, batch = setup
  model, variables = models[backward]
  loss, zeros = probe_loss(model, variables, batch)
  grad_fn = jax.grad(loss)

  @jax.jit
  def both(v):
    fwd = jax.jvp(grad_fn, (zeros,), (v,))[1]
    rev = jax.grad(lambda z: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad_fn(z)), jax.tree.leaves(v))))(zeros)
    dot = lambda t: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(t)))
    return dot(fwd), dot(rev)

  leaves, treedef = jax.tree.flatten(zeros)
  for i in range(2):
    vs = [jax.random.rademacher(jax.random.key(10 * i + j), z.shape, jnp.float32) for j, z in enumerate(leaves)]
    fwd, rev = both(jax.tree.unflatten(treedef, vs))
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-6)
    assert abs(float(fwd)) > 1e-6
    for block in range(len(vs)):
      only = [v if j == block else jnp.zeros_like(v) for j, v in enumerate(vs)]
      fwd, rev = both(jax.tree.unflatten(treedef, only))
      np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-6)


def test_early_stop_uses_absolute_value():
  # A negative, noiseless trace: the reference code's test (no abs) would stop after 2 samples
  # whatever the tolerance; ours stops once the mean is stable, which for a constant is also 2.
  means, counts = jax.jit(lambda k: hessian._running_mean_loop(
      lambda key: jnp.asarray([-1.0, 1.0]) + 0.5 * jax.random.normal(key, (2,)), k, 2, 200, 1e-3))(jax.random.key(0))
  assert np.all(np.asarray(counts) > 2)       # noisy: keeps sampling for either sign
  assert np.all(np.asarray(counts) <= 200)
  np.testing.assert_allclose(means, [-1.0, 1.0], atol=0.3)


def test_delta_rule_formula_and_guards():
  np.testing.assert_allclose(hessian.delta_from_trace(0.6, 0.1), 0.6 / 0.3)
  assert np.isnan(hessian.delta_from_trace(0.6, 0.0))          # zero-gradient batch
  assert np.isnan(hessian.delta_from_trace(np.inf, 0.1))
  assert hessian.combine_batches([0.2, 0.4, np.nan], previous=9.0) == pytest.approx(0.3)
  assert hessian.combine_batches([-0.2, -0.4], previous=9.0) == 0.0   # max(0, .)
  assert hessian.combine_batches([np.nan, np.nan], previous=0.25) == 0.25
  grad = np.asarray([0.1, -0.3, 0.5, 0.0, 0.2])
  np.testing.assert_allclose(hessian.delta_from_gradient(0.6, grad), 0.6 / (3 * np.std(grad, ddof=1)), rtol=1e-6)
  assert np.isnan(hessian.delta_from_gradient(0.6, np.zeros(5)))   # all-zero gradient: undefined


def test_refresh_only_writes_delta(setup):
  models, batch = setup
  model, variables = models["ewgs"]
  variables = jax.tree.map(jnp.asarray, variables)
  before = jax.tree.map(np.asarray, variables)
  new, metrics = refresh(variables, [batch, batch], jax.random.key(4), mode="hessian", max_samples=20)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)  # inputs untouched
  assert jax.tree.structure(new) == jax.tree.structure(variables)
  for collection in ("params", "batch_stats"):    # only deltas change
    jax.tree.map(np.testing.assert_array_equal, new[collection], variables[collection])
  values = np.asarray(jax.tree.leaves(new["quant_state"]))
  assert np.all(values >= 0) and np.all(np.isfinite(values)) and np.any(values != 2.0)
  # each probe's delta is written into its own layer's leaf: w_q -> delta_w, a_q -> delta_a
  found = hessian.find_quantizers(classification_loss(model), variables, batch)
  assert found.paths == ["d1/a_q", "d1/w_q", "d2/a_q", "d2/w_q"]
  assert [found.leaf_names[q.leaf] for q in found.ordered] == [
      "quant_state/d1/delta_a", "quant_state/d1/delta_w", "quant_state/d2/delta_a", "quant_state/d2/delta_w"]
  np.testing.assert_allclose(metrics["delta_w"], np.mean([new["quant_state"][d]["delta_w"] for d in ("d1", "d2")]))
  fixed, _ = refresh(variables, [batch], None, mode="fixed", fixed_value=0.001)
  np.testing.assert_allclose(jax.tree.leaves(fixed["quant_state"]), 0.001)


def test_refresh_writes_deltas_wherever_the_state_keeps_them(setup):
  """The state is any pytree: here the variables nested in a user's own train state (a tuple with a step)."""
  models, batch = setup
  model, variables = models["ewgs"]
  loss_fn = classification_loss(model)
  action = ewgs_rule.DeltaRefresh(rules.get("ewgs").resolve({"max_samples": 5}))
  state = (jnp.int32(10), {"model": variables})
  clock = rules.Clock(10, 10, 100)
  new, _ = action(rules.ActionInput(clock, state, lambda s, b: loss_fn(s[1]["model"], b), [batch], jax.random.key(0),
                                    lambda: False))
  assert int(new[0]) == 10
  assert not np.allclose(jax.tree.leaves(new[1]["model"]["quant_state"]), 2.0)
  jax.tree.map(np.testing.assert_array_equal, new[1]["model"]["params"], variables["params"])


def test_refresh_gives_up_when_stopped_between_batches(setup):
  models, batch = setup
  model, variables = models["ewgs"]
  action = ewgs_rule.DeltaRefresh(rules.get("ewgs").resolve({"max_samples": 3}))
  calls = []
  stop = lambda: calls.append(1) or len(calls) > 1   # stop before the second batch
  new, metrics = action(rules.ActionInput(rules.Clock(10, 10, 100), variables, classification_loss(model),
                                          [batch, batch, batch], jax.random.key(0), stop))
  assert new is None and metrics == {} and len(calls) == 2


def test_zero_gradient_batch_keeps_delta_finite(setup):
  models, batch = setup
  model, variables = models["ewgs"]
  # Zeroing the last layer's weights and bound spread makes every probe's gradient vanish.
  params = jax.tree.map(jnp.zeros_like, variables["params"])
  zeroed = {**variables, "params": params}
  new, _ = refresh(zeroed, [batch], jax.random.key(5), max_samples=4)
  values = jax.tree.leaves(new["quant_state"])
  assert all(np.isfinite(v) for v in values)
  np.testing.assert_allclose(values, 2.0)   # kept the previous delta


@pytest.mark.parametrize("mode,every,expected", [
    ("hessian", 10, [100, 200]),
    ("hessian", 1, [10 * k for k in range(1, 25)]),
    ("fixed", 10, [0]),
    ("off", 10, []),
])
def test_refresh_schedule(mode, every, expected):
  steps_per_epoch = 10
  assert [s for s in range(250) if ewgs_rule.refresh_due(mode, s, steps_per_epoch, every)] == expected


def test_bad_modes_raise(setup):
  with pytest.raises(ValueError, match="valid choices"):
    rules.get("ewgs").resolve({"mode": "auto"})
  models, batch = setup
  model, variables = models["ewgs"]
  found = hessian.find_quantizers(classification_loss(model), variables, batch)
  with pytest.raises(ValueError, match="valid choices"):
    hessian.trace_fn(classification_loss(model), found, mode="diag")
  with pytest.raises(ValueError, match="calls no quantizer with rule 'pege'"):
    hessian.find_quantizers(classification_loss(model), variables, batch, rule="pege")
  with pytest.raises(ValueError, match=r"d1/a_q \(rule 'ewgs'\) reads its factor from nothing in the state given"):
    hessian.find_quantizers(lambda v, b: classification_loss(model)(variables, b), {"unrelated": 1.0}, batch,
                            rule="ewgs")


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from ewgs_jax import hessian, initialization, layers, parallel
    from tests.test_hessian import TinyMLP, classification_loss, quant

    model = TinyMLP(quant("ewgs"))
    x = jax.random.normal(jax.random.key(0), (8, 2)) + 0.5
    variables = jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(1), x)
    batch = {"image": np.asarray(x), "label": np.asarray([0, 1, 2, 1, 0, 2, 1, 0])}
    mesh = parallel.make_mesh()
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    loss_fn = classification_loss(model)
    fn = hessian.trace_fn(loss_fn, hessian.find_quantizers(loss_fn, variables, batch), mode="blockwise",
                          max_samples=6, tolerance=0.0)
    key = jax.random.key(3)
    single = jax.jit(fn)(jax.device_put(variables, jax.devices()[0]), jax.device_put(batch, jax.devices()[0]), key)
    sharded = jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=rep)(
        variables, parallel.shard_batch(batch, mesh), key)
    print("RESULT " + json.dumps({"devices": jax.device_count(),
                                  "single": [np.asarray(a).tolist() for a in single],
                                  "sharded": [np.asarray(a).tolist() for a in sharded]}))
""")


def test_sharded_estimate_matches_single_device():
  """The jitted estimate (blockwise: lax.map over per-block while_loops) on 4 fake CPU devices with
  the batch sharded on ``data`` gives the same traces, sigmas, counts and so deltas as on one
  device: BatchNorm sees the global batch and the probes are global arrays."""
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])
  assert out["devices"] == 4
  for single, sharded in zip(out["single"], out["sharded"]):
    np.testing.assert_allclose(sharded, single, rtol=2e-4, atol=1e-7)
  deltas = [np.asarray(hessian.delta_from_trace(*r[:2])) for r in (out["single"], out["sharded"])]
  np.testing.assert_allclose(deltas[1], deltas[0], rtol=5e-4)
  assert np.all(np.isfinite(deltas[0])) and np.all(np.asarray(out["single"][2]) == 6)


@pytest.mark.parametrize("mode", ["joint", "blockwise"])
def test_linearize_equals_fresh_jvp(setup, mode):
  """``hvp="linearize"`` (one gradient pass per batch, the stored linear map applied to every probe)
  gives the same traces, sigmas and sample counts as a fresh ``jax.jvp(jax.grad)`` per probe."""
  models, batch = setup
  model, variables = models["ewgs"]
  loss_fn = classification_loss(model)
  found = hessian.find_quantizers(loss_fn, variables, batch)
  args = (variables, batch, jax.random.key(5))
  out = {hvp: jax.jit(hessian.trace_fn(loss_fn, found, mode=mode, max_samples=7, tolerance=1e-2, hvp=hvp))(*args)
         for hvp in hessian.HVP_METHODS}
  for a, b in zip(out["linearize"], out["jvp"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(out["linearize"][0]) != 0)
  with pytest.raises(ValueError, match="linearize"):
    hessian.trace_fn(loss_fn, found, hvp="hvp")


class TinyConvNet(nn.Module):
  """A strided and a stride-1 quantized convolution with BatchNorm, then a quantized classifier."""
  quant: QuantConfig
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train=False, ctx=None):
    x = QuantConv(4, strides=(2, 2), quant=self.quant, conv_impl=self.conv_impl, name="c1")(x, ctx)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
    x = nn.relu(QuantConv(4, quant=self.quant, conv_impl=self.conv_impl, name="c2")(x, ctx))
    return QuantDense(3, quant=self.quant, name="fc")(x.mean((1, 2)), ctx)


def test_estimate_of_a_conv_net_keeps_convolutions_fast_inside_its_sample_loop():
  """With the custom convolution (``conv_impl="fast"``, what ``"auto"`` picks on CPU) every convolution
  of the compiled estimate (gradient pass and the HVPs in the while loop) is in the canonical forward
  form XLA:CPU runs with its fast kernels (checked on CPU), and on every backend the traces, sigmas
  and counts equal those of an estimate on XLA's own convolution gradients."""
  model = TinyConvNet(quant("ewgs"))
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))
  variables = jax.jit(lambda k, x: initialization.init_variables(model, k, x))(jax.random.key(1), x)
  batch = {"image": x, "label": jnp.asarray([0, 1, 2, 1])}
  args = (variables, batch, jax.random.key(2))
  out = {}
  for impl in ("fast", "xla"):
    loss_fn = classification_loss(model.clone(conv_impl=impl))
    found = hessian.find_quantizers(loss_fn, variables, batch)
    estimate = jax.jit(hessian.trace_fn(loss_fn, found, mode="joint", max_samples=5, tolerance=0.0))
    if impl == "fast" and jax.default_backend() == "cpu":
      labels = test_ops.convolutions(estimate.lower(*args).compile().as_text())
      assert len(labels) >= 8 and set(labels) == {"b01f_01io->b01f"}, labels
    out[impl] = estimate(*args)
  for a, b in zip(out["fast"], out["xla"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(out["fast"][0]) != 0) and np.all(np.asarray(out["fast"][2]) == 5)
