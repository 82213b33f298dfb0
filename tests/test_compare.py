"""python -m ewgs_jax.compare end to end on the tiny preset (real subprocesses through train.py)."""

import json
import os
import subprocess
import sys

import pytest

from ewgs_jax import compare
from tests.training_configs import ROOT


def run_compare(workdir, *extra):
  return subprocess.run([sys.executable, "-m", "ewgs_jax.compare", "--preset", "tiny", "--workdir", str(workdir),
                         "--seeds", "2", "--rules", "ste", "pege:pege.mu_ramp=0.5", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_comparison_end_to_end_with_validation_then_resumes_without_retraining(tmp_path):
  workdir = tmp_path / "cmp"
  done = run_compare(workdir, "--validation", "200")
  assert done.returncode == 0, done.stderr[-3000:]
  text = (workdir / "results.md").read_text()
  # every run is listed, both splits are tabulated, the rule is tested against STE
  for rule, seed in (("ste", 0), ("ste", 1), ("pege:pege.mu_ramp=0.5", 0), ("pege:pege.mu_ramp=0.5", 1)):
    assert f"| `{rule}` | {seed} |" in text
  assert "Final validation accuracy (%) (used to choose defaults)" in text
  assert "Final test accuracy (%) (reported; not used to choose anything)" in text
  assert text.count("| `pege:pege.mu_ramp=0.5` | ") == 4   # two split tables + two run rows
  assert "vs ste: mean diff [95 % CI]" in text
  for png in ("curves_ste.png", "curves_pege_pege.mu_ramp=0.5.png", "traces.png"):
    assert (workdir / png).stat().st_size > 1000
  run = workdir / "runs" / "w2a2_pege_pege.mu_ramp=0.5" / "seed1"
  summary = json.loads((run / "summary.json").read_text())
  assert summary["config"]["pege"]["mu_ramp"] == 0.5 and summary["config"]["seed"] == 1
  assert summary["config"]["init_from"] == os.path.abspath(workdir / "fp")
  assert summary["eval_split"] == "validation" and summary["final_test_accuracy"] is not None
  assert {"final_validation_accuracy", "best_validation_accuracy"} <= set(summary)
  splits = {json.loads(line)["split"] for line in (run / "metrics.jsonl").read_text().splitlines()}
  assert "validation" in splits and "test" not in splits
  stamp = (run / "summary.json").stat().st_mtime_ns
  again = run_compare(workdir, "--validation", "200")
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished earlier") == 5 and "training in" not in again.stdout
  assert (run / "summary.json").stat().st_mtime_ns == stamp
  changed = run_compare(workdir, "--validation", "200", "--qat-epochs", "3")   # a finished run is not silently reused
  assert changed.returncode == 1 and "holds a finished run of another config (num_epochs: 2 there, 3 now)" in changed.stderr
  # another comparison warm-starts from this one's full-precision run (trained with other settings) without retraining it
  other = tmp_path / "other"
  reuse = subprocess.run([sys.executable, "-m", "ewgs_jax.compare", "--preset", "tiny", "--workdir", str(other),
                          "--seeds", "1", "--rules", "ste", "--init-from", str(workdir / "fp")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert reuse.returncode == 0, reuse.stderr[-3000:]
  assert not (other / "fp").exists() and "training in" in reuse.stdout and "fp: training" not in reuse.stdout
  ste = json.loads((other / "runs" / "w2a2_ste" / "seed0" / "summary.json").read_text())
  assert ste["config"]["init_from"] == str(workdir / "fp") and ste["eval_split"] == "test"
  missing = subprocess.run([sys.executable, "-m", "ewgs_jax.compare", "--preset", "tiny", "--workdir", str(other),
                            "--init-from", str(tmp_path / "nothing")], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert missing.returncode == 2 and "no finished run there" in missing.stderr


def test_bad_arguments_exit_non_zero_with_one_line():
  for args in (["--rules", "sgd"], ["--rules", "pege:mu"], ["--seeds", "0"]):
    out = subprocess.run([sys.executable, "-m", "ewgs_jax.compare", "--workdir", "/nonexistent/x", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("python -m ewgs_jax.compare: error:")


def test_paired_statistics():
  t = compare.paired_test([0.9, 0.8, 0.7], [0.85, 0.75, 0.6])
  assert t["diff"] == pytest.approx(0.2 / 3)
  # differences 0.05, 0.05, 0.1: sd 0.02887, se 0.01667, t_{0.975, 2} = 4.303
  assert t["high"] - t["diff"] == pytest.approx(4.3027 * 0.0288675 / 3 ** 0.5, rel=1e-3)
  assert t["p"] == pytest.approx(0.0572, abs=1e-3)          # t = 4.0 on 2 degrees of freedom
  assert compare.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
