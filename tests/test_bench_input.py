"""A smoke run of benchmarks/bench_input.py: it runs without a download and ends with its JSON line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow   # ~40 s on 2 CPU cores: worker processes start three times per worker count
def test_bench_input_quick_run_prints_its_figures_last():
  pytest.importorskip("grain")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT] + sys.path), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "benchmarks/bench_input.py", "--quick", "--skip-steps", "--workers", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert {"imagenet_img_s", "imagenet_serial_img_s", "cifar_img_s", "workers"} <= set(result)
  assert result["imagenet_bytes_per_image"] == 224 * 224 * 3 and result["cifar_bytes_per_image"] == 32 * 32 * 3
  assert result["imagenet_img_s"] > 0 and result["cifar_img_s"] > 0 and result["workers"] == 1
