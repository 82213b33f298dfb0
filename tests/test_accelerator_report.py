"""benchmarks/accelerator_report.py (issue 21): the guards, the budget, the writers, the outcome log,
the configs it hands train.py, and (slow) the whole report at toy sizes on the CPU."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ewgs_jax import config as config_lib
from tests.training_configs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import accelerator_report as report_lib  # noqa: E402


def sections(path):
  return {s["name"]: s for s in json.load(open(path / "accelerator_report.json"))["sections"]}


def test_a_failing_section_is_recorded_with_its_first_line_and_the_rest_still_run(tmp_path):
  report = report_lib.Report(str(tmp_path), {"device": "cpu", "jax": "x", "mode": "tiny"}, budget_s=60)

  def broken(partial):
    partial.update(results={"first part": 1, "headline": {"two/first": 3}}, markdown="the first part's text")
    raise ValueError("the first line\nand a second one")

  def missing(partial):
    raise report_lib.Unavailable("not available: no such module")

  report.run("one", lambda partial: ({"headline": {"one/figure": 1.5}}, "one's text"), reserve_s=0)
  report.run("two", broken, reserve_s=0)
  report.run("three", missing, reserve_s=0)
  report.run("four", lambda partial: ({"headline": {"four/figure": 2}}, "four's text"), reserve_s=0)
  got = sections(tmp_path)
  assert [got[n]["status"] for n in ("one", "two", "three", "four")] == ["ok", "failed", "unavailable", "ok"]
  assert got["two"]["error"] == "ValueError: the first line" and "broken" in got["two"]["traceback"]
  assert got["two"]["results"]["first part"] == 1   # the parts done before the failure are kept
  assert got["three"]["error"] == "not available: no such module"
  headline = report.headline()
  assert headline["one/figure"] == 1.5 and headline["four/figure"] == 2 and headline["two/first"] == 3
  assert headline["sections"] == {"one": "ok", "two": "failed", "three": "unavailable", "four": "ok"}
  markdown = (tmp_path / "accelerator_report.md").read_text()
  assert "| two | failed |" in markdown and "ValueError: the first line" in markdown and "four's text" in markdown
  assert "the first part's text" in markdown


def test_the_budget_stops_a_running_section_and_skips_the_next(tmp_path):
  report = report_lib.Report(str(tmp_path), {}, budget_s=1.0)
  start = time.monotonic()
  report.run("slow", lambda partial: (time.sleep(30), ({}, ""))[1], reserve_s=0)
  assert time.monotonic() - start < 10
  report.run("next", lambda partial: ({}, ""), reserve_s=5)
  got = sections(tmp_path)
  assert got["slow"]["status"] == "stopped" and "time budget" in got["slow"]["error"]
  assert got["next"]["status"] == "skipped" and "needs 5 s" in got["next"]["error"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_test_outcomes_are_logged_as_they_happen_and_counted(tmp_path, workers):
  (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
      import pytest

      def test_passes():
        pass

      def test_fails():
        assert 1 == 2, "one is not two"

      @pytest.mark.skip(reason="not here")
      def test_skipped():
        pass

      @pytest.fixture
      def broken():
        raise RuntimeError("fixture broke")

      def test_errors(broken):
        pass
  """))
  log = tmp_path / "outcomes.jsonl"
  env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), "REPORT_PYTEST_LOG": str(log)}
  subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_outcomes", "-p", "no:cacheprovider", "-n",
                  workers, "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
  summary = report_lib.summarize_outcomes(str(log))
  assert {k: summary[k] for k in ("collected", "passed", "failed", "errors", "skipped", "finished")} == {
      "collected": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1, "finished": 4}
  failures = {f["test"].split("::")[-1]: f for f in summary["failures"]}
  assert failures["test_fails"]["message"].startswith("AssertionError: one is not two")
  assert failures["test_errors"]["when"] == "setup" and "fixture broke" in failures["test_errors"]["message"]


def test_bitwise_comparison_sees_one_ulp_and_the_sign_of_zero():
  a = {"w": np.array([1.0, 0.0], np.float32), "n": np.array(3, np.int32)}
  assert report_lib.compare_bitwise(a, {"w": a["w"].copy(), "n": a["n"].copy()})["different"] == 0
  ulp = {"w": np.array([np.nextafter(np.float32(1), np.float32(2)), 0.0], np.float32), "n": a["n"]}
  result = report_lib.compare_bitwise(a, ulp)
  assert result["different"] == 1 and result["first_different"] == "['w']" and 0 < result["max_abs_diff"] < 1e-6
  assert report_lib.compare_bitwise(a, {"w": np.array([1.0, -0.0], np.float32), "n": a["n"]})["different"] == 1


@pytest.mark.parametrize("plan", [report_lib.full_plan(), report_lib.tiny_plan()], ids=["full", "tiny"])
def test_the_configs_handed_to_train_py_are_valid_and_equal_the_in_process_ones(tmp_path, plan):
  runs = [(net, "ewgs", report_lib.e2e_overrides("/data.npz", steps, train // net.batch))
          for net, steps, train, _ in plan.e2e]
  runs += [(plan.resume, "pege", report_lib.resume_overrides("/data.npz", plan.resume_steps,
                                                             plan.resume_train_images // plan.resume.batch, kill))
           for kill in ("TERM", "KILL")]
  runs += [(net, rule, ()) for net in plan.networks for rule in plan.rules]
  for i, (net, rule, overrides) in enumerate(runs):
    path = report_lib.write_config_file(str(tmp_path / f"config{i}.py"), net, rule, overrides)
    spec = importlib.util.spec_from_file_location(f"config{i}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from_file = module.get_config()
    assert from_file.to_dict() == report_lib.network_config(net, rule, overrides=overrides).to_dict()
    config_lib.validate(from_file)


def test_synthetic_dataset_has_the_npz_layout(tmp_path):
  from ewgs_jax import data
  path = report_lib.write_npz_dataset(str(tmp_path / "d.npz"), (8, 8, 3), train=40, test=10)
  info = data.get_dataset_info(f"npz:{path}")
  assert info.num_classes <= 10 and info.image_shape == (8, 8, 3)
  with np.load(path) as f:
    assert f["x_train"].dtype == np.uint8 and f["x_train"].shape == (40, 8, 8, 3) and f["y_test"].shape == (10,)


@pytest.mark.slow   # 1.5-4.5 min on the loaded 2-core machine: ~15 compiles and six train.py / pytest processes
def test_tiny_report_runs_every_section_on_the_cpu(tmp_path):
  out = tmp_path / "report"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  process = subprocess.run([sys.executable, "benchmarks/accelerator_report.py", "--tiny", "--out", str(out)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=1200)
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
  headline = json.loads(process.stdout.strip().splitlines()[-1])
  got = sections(out)
  assert list(got) == list(report_lib.SECTIONS)
  assert all(s["status"] == "ok" for name, s in got.items() if name != "export"), got
  assert got["export"]["status"] in ("ok", "unavailable")
  assert headline["sections"] == {name: s["status"] for name, s in got.items()}
  assert headline["step_ratio/tiny/fp32/fp"] == 1.0 and headline["step_ratio/tiny/bf16/pege"] > 0
  assert headline["refresh_steps/default"] > 0 and 0 < headline["refresh_rse_median/cheap"]
  assert headline["e2e_fraction/tiny"] > 0
  assert headline["resume_bit_exact"] is True and got["resume"]["results"]["train_losses_equal"]
  assert headline["tests_passed"] == 1 and headline["tests_failed"] == 0
  markdown = (out / "accelerator_report.md").read_text()
  assert all(title in markdown for title in report_lib.TITLES.values())


def test_tiny_report_export_section_runs_in_the_default_suite(tmp_path):
  # the cheapest section end to end through the command line (the whole report is the slow test above)
  out = tmp_path / "report"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  process = subprocess.run([sys.executable, "benchmarks/accelerator_report.py", "--tiny", "--sections", "export",
                            "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
  got = sections(out)
  assert list(got) == ["export"] and got["export"]["status"] == "ok", got
  assert json.loads(process.stdout.strip().splitlines()[-1])["sections"] == {"export": "ok"}
