"""The custom-VJP convolution equals lax.conv_general_dilated in value, gradients and second order."""


import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewgs_jax import ops

CASES = [  # (input shape, kernel, stride, padding, groups, out channels)
    ((2, 9, 9, 4), 3, 1, "SAME", 1, 6),
    ((2, 9, 9, 4), 3, 2, "SAME", 1, 6),
    ((2, 8, 8, 4), 3, 2, [(1, 1), (1, 1)], 1, 5),
    ((2, 9, 9, 4), 1, 1, "VALID", 1, 6),
    ((2, 9, 9, 4), 1, 2, "VALID", 1, 6),
    ((2, 15, 15, 3), 7, 2, [(3, 3), (3, 3)], 1, 8),
    ((2, 9, 9, 3), 7, 1, "SAME", 1, 4),
    ((2, 9, 9, 6), 3, 1, "SAME", 2, 4),            # grouped
    ((2, 9, 9, 6), 3, 2, [(1, 1), (1, 1)], 6, 6),  # depthwise, stride 2
    ((2, 8, 8, 4), 3, 1, "VALID", 4, 8),           # depthwise with multiplier 2
]


def conv_fn(impl, stride, padding, groups):
  def f(x, w):
    return ops.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=ops.NHWC,
                                    feature_group_count=groups, impl=impl)
  return f


def inputs(shape, k, groups, cout, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), shape, dtype)
  w = (jax.random.normal(jax.random.key(1), (k, k, shape[-1] // groups, cout)) * 0.2).astype(dtype)
  return x, w


@pytest.mark.parametrize("shape,k,stride,padding,groups,cout", CASES)
def test_forward_and_gradients_equal_lax(shape, k, stride, padding, groups, cout):
  x, w = inputs(shape, k, groups, cout)
  fast, ref = conv_fn("fast", stride, padding, groups), conv_fn("xla", stride, padding, groups)

  @jax.jit
  def outputs(x, w):
    y_fast, vjp_fast = jax.vjp(fast, x, w)
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    g = jax.random.normal(jax.random.key(2), y_ref.shape)
    return (y_fast, *vjp_fast(g)), (y_ref, *vjp_ref(g))

  (y, dx, dw), (y_ref, dx_ref, dw_ref) = outputs(x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups,cout", [(1, 6), (4, 4)])  # dense and depthwise (multiply-reduce path)
def test_bfloat16(groups, cout):
  x, w = inputs((2, 9, 9, 4), 3, groups, cout, jnp.bfloat16)
  loss = lambda impl: lambda x, w: jnp.sum(conv_fn(impl, 1, "SAME", groups)(x, w).astype(jnp.float32) ** 2)
  (dx_f, dw_f), (dx_r, dw_r) = jax.jit(lambda x, w: (jax.grad(loss("fast"), (0, 1))(x, w),
                                                     jax.grad(loss("xla"), (0, 1))(x, w)))(x, w)
  assert dw_f.dtype == jnp.bfloat16 and dx_f.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(dw_f), np.float32(dw_r), rtol=5e-2, atol=5e-1)
  np.testing.assert_allclose(np.float32(dx_f), np.float32(dx_r), rtol=5e-2, atol=5e-1)


def test_hessian_vector_products_of_a_conv_net_match():
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  params = {"w1": jax.random.normal(jax.random.key(4), (3, 3, 3, 4)) * 0.3,
            "w2": jax.random.normal(jax.random.key(5), (3, 3, 4, 2)) * 0.3}
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(6), p.shape), params)

  def loss(impl):
    def f(p):
      h = jnp.tanh(conv_fn(impl, 2, "SAME", 1)(x, p["w1"]))
      return jnp.sum(jnp.sin(conv_fn(impl, 1, [(1, 1), (1, 1)], 1)(h, p["w2"])))
    return f

  hvp = lambda impl: jax.jit(lambda p: jax.jvp(jax.grad(loss(impl)), (p,), (v,))[1])(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), hvp("fast"), hvp("xla"))


def test_vmap_and_jit():
  x, w = inputs((3, 2, 6, 6, 4), 3, 1, 5)
  f = jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(conv_fn("fast", 1, "SAME", 1)(x, w) ** 2), argnums=1),
                       in_axes=(0, None)))
  batched = f(x, w)
  expected = jax.jit(jax.vmap(jax.grad(lambda x, w: jnp.sum(conv_fn("xla", 1, "SAME", 1)(x, w) ** 2), argnums=1),
                              in_axes=(0, None)))(x, w)
  np.testing.assert_allclose(batched, expected, rtol=1e-5, atol=1e-4)
  # a vmapped (per-example) call differs between examples: the batch axis was not mixed up
  assert not np.allclose(batched[0], batched[1])


def test_switch_selects_what_it_says():
  x, w = inputs((1, 5, 5, 2), 3, 1, 2)

  def uses_custom_vjp(impl):
    jaxpr = jax.make_jaxpr(lambda x, w: ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=ops.NHWC,
                                                                 impl=impl))(x, w)
    return "custom_vjp_call" in str(jaxpr)

  assert uses_custom_vjp("fast") and not uses_custom_vjp("xla")
  on_cpu = jax.default_backend() == "cpu"
  # auto: the custom rule on CPU only, for dense and grouped convolutions alike
  assert ops.selected_impl("auto") == ops.selected_impl() == ("fast" if on_cpu else "xla")
  assert uses_custom_vjp("auto") == on_cpu
  xd, wd = inputs((1, 5, 5, 4), 3, 4, 4)
  depthwise = jax.make_jaxpr(lambda x, w: ops.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=ops.NHWC, feature_group_count=4))(xd, wd)
  assert ("custom_vjp_call" in str(depthwise)) == on_cpu
  assert ops.selected_impl("xla") == "xla"
  # unsupported variants (dilation, other layouts) fall back to XLA even when forced
  jaxpr = jax.make_jaxpr(lambda x, w: ops.conv_general_dilated(x, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                                                               dimension_numbers=ops.NHWC, impl="fast"))(x, w)
  assert "custom_vjp_call" not in str(jaxpr)
  with pytest.raises(ValueError, match=r"valid choices: \['auto', 'xla', 'fast'\]"):
    ops.selected_impl("cudnn")


def test_a_jitted_function_keeps_the_impl_it_was_given():
  """The implementation is an argument, not a global read at trace time: two jitted functions with
  different ``impl`` stay different however they are interleaved (the old ``conv_impl`` context
  manager's trap: a function jitted under "fast" kept "fast" after the setting changed)."""
  x, w = inputs((1, 5, 5, 2), 3, 1, 2)
  on = {impl: jax.jit(lambda w, impl=impl: jnp.sum(ops.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=ops.NHWC, impl=impl) ** 2)) for impl in ("fast", "xla")}
  for impl in ("fast", "xla", "fast"):
    on[impl](w)
    assert ("custom_vjp_call" in str(on[impl].trace(w).jaxpr)) == (impl == "fast")
    np.testing.assert_allclose(jax.grad(on[impl])(w), jax.grad(on["xla"])(w), rtol=1e-4, atol=1e-4)


def convolutions(compiled_hlo: str) -> list[str]:
  """The ``dim_labels`` of every convolution instruction of a compiled XLA program."""
  return [line.split("dim_labels=")[1].split(",")[0] for line in compiled_hlo.splitlines()
          if " convolution(" in line]


def test_auto_keeps_every_convolution_of_a_loop_body_canonical():
  """With ``auto`` on CPU, a forward-over-reverse product of a strided conv net in a ``fori_loop``
  body compiles to convolutions in the canonical forward form only (XLA:CPU does not rewrite other
  forms into its fast kernels inside loop bodies), with the values of ``lax.conv_general_dilated``."""
  x, w1 = inputs((2, 9, 9, 4), 3, 1, 6)
  w2 = jax.random.normal(jax.random.key(2), (3, 3, 6, 5)) * 0.2

  def looped(impl):
    def loss(ws, x):
      y = jnp.tanh(ops.conv_general_dilated(x, ws[0], (2, 2), "SAME", dimension_numbers=ops.NHWC, impl=impl))
      return jnp.sum(jnp.tanh(ops.conv_general_dilated(y, ws[1], (1, 1), [(1, 2), (0, 1)],
                                                       dimension_numbers=ops.NHWC, impl=impl)) ** 2)

    def run(ws, x, n):
      hvp = lambda i, acc: jax.tree.map(jnp.add, acc, jax.jvp(jax.grad(loss), (ws, x * (1.0 + i)), (ws, x))[1])
      return jax.lax.fori_loop(0, n, hvp, jax.tree.map(jnp.zeros_like, ws))
    return jax.jit(run)

  expected = looped("xla")((w1, w2), x, 2)
  # auto selects the custom rule on CPU only; elsewhere it would be XLA against itself: ask for the rule
  impl = "auto" if jax.default_backend() == "cpu" else "fast"
  assert ops.selected_impl(impl) == "fast"
  fn = looped(impl)
  if jax.default_backend() == "cpu":
    labels = convolutions(fn.lower((w1, w2), x, 2).compile().as_text())
    assert labels and set(labels) == {"b01f_01io->b01f"}, labels
  got = fn((w1, w2), x, 2)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ewgs_jax import ops
    assert jax.device_count() == 4, jax.devices()
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5)) * 0.2
    def loss(impl):
      def f(x, w):
        y = ops.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=ops.NHWC, impl=impl)
        return jnp.sum(jnp.tanh(y) ** 2)
      return f
    dx_ref, dw_ref = jax.grad(loss("xla"), (0, 1))(x, w)
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
      mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
      xs = jax.device_put(x, NamedSharding(mesh, P("data")))
      ws = jax.device_put(w, NamedSharding(mesh, P()))
      dx, dw = jax.jit(jax.grad(loss("fast"), (0, 1)))(xs, ws)
      assert dx.sharding.spec[0] == "data" and dw.sharding.is_fully_replicated, (dx.sharding, dw.sharding)
      np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    print("SHARDED_OK")
""")



def test_sharded_over_four_cpu_devices_matches_single_device_xla():
  """Batch-sharded jit over 4 fake CPU devices: gradients equal the unsharded XLA convolution's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]
