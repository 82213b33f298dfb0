"""The README's functional-API example runs and computes what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README lost its example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)
  grad_w, grad_lower, grad_upper = namespace["grads"]
  assert grad_w.shape == (3, 3, 16, 16) and np.isfinite(np.asarray(grad_w)).all()
  assert float(grad_lower) != 0.0 and float(grad_upper) != 0.0
  np.testing.assert_allclose(float(namespace["p_T"]), np.log10(0.001 * 1000 + 2.0), rtol=1e-6)
  mixed = np.asarray(namespace["mixed"])
  assert np.all(np.isclose(mixed, 0.4) | np.isclose(mixed, 1 / 3))
