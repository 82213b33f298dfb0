"""python -m ewgs_jax.compare end to end on the tiny preset (real subprocesses through train.py), and its parts."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ewgs_jax import compare, rules
from ewgs_jax.compare import cli, execute, plan, report
from tests.training_configs import ROOT

HAS_PTQ = importlib.util.find_spec("ewgs_jax.ptq") is not None


def compare_command(workdir, *extra):
  return [sys.executable, "-m", "ewgs_jax.compare", "--preset", "tiny", "--workdir", str(workdir), *extra]


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
  for args in (["--rules", "sgd"], ["--rules", "pege:mu"], ["--seeds", "0"], ["--seed-offset", "-1"]):
    out = subprocess.run([sys.executable, "-m", "ewgs_jax.compare", "--workdir", "/nonexistent/x", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("python -m ewgs_jax.compare: error:")


@pytest.mark.parametrize("args", [["--set", "seed=3"], ["--rules", "ste", "pege:seed=1"]])
def test_a_seed_override_is_refused_pointing_to_seed_offset(args, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.parse_args(["--workdir", "x", *args])
  assert exit_.value.code == 2
  assert "use --seed-offset K" in capsys.readouterr().err.strip().splitlines()[-1]


def test_seed_offset_gives_seeds_k_to_k_plus_n_minus_1(tmp_path):
  args = cli.parse_args(["--workdir", str(tmp_path), "--preset", "tiny", "--seeds", "2", "--seed-offset", "5",
                         "--rules", "ste", "--fp-seed", "1"])
  fp, runs = plan.plan(args)
  assert fp.overrides["seed"] == 1
  assert [(seed, run.overrides["seed"], os.path.basename(run.workdir)) for _, seed, run in runs] == \
      [(5, 5, "seed5"), (6, 6, "seed6")]


def test_every_config_is_checked_before_any_run_trains(tmp_path):
  """A bad key in the last rule's overrides: exit 2, one line naming the rule and the key, nothing trained."""
  out = subprocess.run(compare_command(tmp_path / "cmp", "--rules", "ste", "ewgs", "pege:pege.mu_kwarg.k=1"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("python -m ewgs_jax.compare: error: rule 'pege:pege.mu_kwarg.k=1': unknown config key "
                         "pege.mu_kwarg.k (did you mean pege.mu_kwargs.k?)")
  assert not (tmp_path / "cmp").exists() and "training in" not in out.stdout
  # a bad value (validated as train.py validates it) is refused the same way, in process
  args = cli.parse_args(["--workdir", str(tmp_path), "--preset", "tiny", "--seeds", "2",
                         "--rules", "ste", "ewgs:ewgs.batch_size=0"])
  fp, runs = plan.plan(args)
  with pytest.raises(ValueError, match=r"^rule 'ewgs:ewgs.batch_size=0': config.ewgs.batch_size=0 is invalid"):
    plan.check(fp, runs)
  configs = plan.check(fp, runs[:2])
  assert configs["ste seed 1"].seed == 1 and configs["ste seed 1"].quant.rule == "ste"
  assert configs["fp"].quant.enabled is False and configs["fp"].model_kwargs.stage_widths == (8,)


def test_paired_statistics():
  t = compare.paired_test([0.9, 0.8, 0.7], [0.85, 0.75, 0.6])
  assert t["diff"] == pytest.approx(0.2 / 3)
  # differences 0.05, 0.05, 0.1: sd 0.02887, se 0.01667, t_{0.975, 2} = 4.303
  assert t["high"] - t["diff"] == pytest.approx(4.3027 * 0.0288675 / 3 ** 0.5, rel=1e-3)
  assert t["p"] == pytest.approx(0.0572, abs=1e-3)          # t = 4.0 on 2 degrees of freedom
  assert compare.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)


def _finished(tmp_path, rows):
  """(rule, seed, run, summary) rows as a comparison hands them to the report (no metrics: no traces)."""
  out = []
  for label, seed, accuracy, quant in rows:
    spec = plan.parse_rule(label)
    run = plan.Run(label, str(tmp_path / label / f"seed{seed}"), "c.py:v", {})
    summary = {"final_test_accuracy": accuracy, "best_test_accuracy": accuracy, "wall_time_s": 1.0,
               "epochs": 0.0 if spec.baseline else 2.0, "train_steps": 0 if spec.baseline else 6,
               "config": {"dataset": "digits", "model": "resnet8", "quant": quant},
               "environment": {"python": "3.11.7", "ewgs_jax": "0.2.0", "jax": "0.10.2"}}
    out.append((spec, seed, run, summary))
  return out


def test_results_title_follows_the_resolved_config_and_a_baseline_row_is_shown_once(tmp_path):
  args = cli.parse_args(["--workdir", str(tmp_path), "--preset", "tiny", "--seeds", "2", "--bits", "1"])
  weights_only = {"enabled": True, "weight_method": "interval", "weight_bits": 1, "act_method": "none", "act_bits": 1}
  rows = [("ewgs", 0, 0.80, weights_only), ("ewgs", 1, 0.90, weights_only),
          ("pege", 0, 0.70, weights_only), ("pege", 1, 0.90, weights_only), ("ptq", None, 0.60, weights_only)]
  text = report.write_results(args, {"final_test_accuracy": 0.9, "epochs": 1.0}, _finished(tmp_path, rows))
  assert text.startswith("# Comparison: W1A32 (activations at full precision), 2 rules x 2 seeds, and ptq\n")
  assert "W1A1" not in text and (tmp_path / "results.md").read_text() == text
  assert "vs ewgs: mean diff [95 % CI]" in text                        # the first rule is the reference
  assert "| `ptq` |  |  | 60.00 (once) | -25.00 [" in text            # paired with each seed's reference run
  assert "| `ptq` | - | `ptq/seed" in text and "| `pege` | 1 | `pege/seed1` | 90.00 | 1 |" in text
  assert "no rule here logged a trace" in text
  assert "- versions: python 3.11.7, ewgs_jax 0.2.0, jax 0.10.2\n" in text   # once: every run used the same
  assert report.precision({"quant": {"enabled": True, "weight_method": "none", "weight_bits": 2,
                                     "act_method": "interval", "act_bits": 4}}) == "W32A4"
  assert report.describe_precision("W32A4") == "W32A4 (weights at full precision)"
  assert report.precision({"quant": {**weights_only, "enabled": False}}) == "full precision"


def test_a_missing_baseline_module_is_refused_with_one_line(capsys):
  compare.register_baseline(compare.Baseline("absent", "ewgs_jax.no_such_module", "a baseline not installed"))
  try:
    with pytest.raises(SystemExit) as exit_:
      cli.parse_args(["--workdir", "x", "--rules", "ste", "absent"])
  finally:
    del compare.BASELINES["absent"]
  assert exit_.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "python -m ewgs_jax.compare: error: --rules absent needs the module ewgs_jax.no_such_module, which this "
      "installation of ewgs_jax does not have (absent: a baseline not installed)")
  with pytest.raises(ValueError, match="a registered rule has that name"):
    compare.register_baseline(compare.Baseline(next(iter(rules.RULES)), "m", "clash"))


@pytest.mark.skipif(HAS_PTQ, reason="ewgs_jax.ptq is installed: test_ptq_row_on_the_tiny_preset covers ptq")
def test_ptq_without_its_module_is_refused():
  out = subprocess.run(compare_command("/nonexistent/x", "--rules", "ste", "ptq"), cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 2 and "--rules ptq needs the module ewgs_jax.ptq" in out.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not HAS_PTQ, reason="ewgs_jax.ptq (issue 22) is not in this tree")
def test_ptq_row_on_the_tiny_preset(tmp_path):
  out = subprocess.run(compare_command(tmp_path / "cmp", "--seeds", "1", "--rules", "ste", "ptq"), cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  text = (tmp_path / "cmp" / "results.md").read_text()
  assert text.startswith("# Comparison: W2A2, 1 rule x 1 seed, and ptq") and "| `ptq` |  | " in text
  assert "| `ptq` | - | `runs/w2a2_ptq` |" in text
  summary = json.loads((tmp_path / "cmp" / "runs" / "w2a2_ptq" / "summary.json").read_text())
  assert summary["train_steps"] == 0 and summary["baseline"]["fp_workdir"] == str(tmp_path / "cmp" / "fp")
  assert 0 <= summary["final_test_accuracy"] <= 1


def test_one_bit_weights_only_title_traces_and_a_baseline_row(tmp_path, capsys):
  """--bits 1 on the quickstart config, activations at full precision: the title says W1A32, traces.png has
  no activation-delta panel (a fixed delta: one refresh at step 0); then a (stand-in) baseline row joins the
  finished runs without retraining them."""
  workdir = tmp_path / "w1"
  common = ["--preset", "tiny", "--workdir", str(workdir), "--bits", "1", "--seeds", "1",
            "--set", "quant.act_method=none"]
  ewgs = "ewgs:ewgs.mode=fixed"
  out = subprocess.run([sys.executable, "-m", "ewgs_jax.compare", *common, "--rules", ewgs], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  text = (workdir / "results.md").read_text()
  assert text.startswith("# Comparison: W1A32 (activations at full precision), 1 rule x 1 seed\n")
  weights, activations = (t.title for t in rules.get("ewgs").traces)
  plots = text.strip().splitlines()[-1]
  assert weights in plots and activations not in plots
  assert (workdir / "traces.png").stat().st_size > 1000
  summary = json.loads((workdir / "runs" / "w1a1_ewgs_ewgs.mode=fixed" / "seed0" / "summary.json").read_text())
  assert summary["config"]["quant"]["act_method"] == "none" and summary["config"]["quant"]["weight_bits"] == 1
  # the baseline hook: a row evaluated on the FP run in a child process, not trained
  compare.register_baseline(compare.Baseline("stub", "tests.compare_stub_baseline", "a stand-in baseline"))
  try:
    assert compare.main([*common, "--rules", ewgs, "stub"]) == 0
  finally:
    del compare.BASELINES["stub"]
  stdout = capsys.readouterr().out
  assert stdout.count("finished earlier") == 2 and "training in" not in stdout and "stub: evaluating in" in stdout
  text = (workdir / "results.md").read_text()
  assert text.startswith("# Comparison: W1A32 (activations at full precision), 1 rule x 1 seed, and stub\n")
  assert "| `stub` |  | 50.00 (once) |" in text and "- `stub`: a stand-in baseline; one evaluation" in text
  stub = json.loads((workdir / "runs" / "w1a1_stub" / "summary.json").read_text())
  assert stub["baseline"] == {"name": "stub", "module": "tests.compare_stub_baseline",
                              "fp_workdir": str(workdir / "fp")}
  assert stub["config"]["seed"] == 0 and stub["config"]["quant"]["act_method"] == "none"


def _children(pid):
  """The pids whose parent is ``pid`` (Linux /proc)."""
  out = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if entry.isdigit() and int(fields[1]) == pid:
      out.append(int(entry))
  return out


def _catches(pid, signum):
  """Whether process ``pid`` has installed a handler for ``signum`` (its SigCgt mask)."""
  try:
    with open(f"/proc/{pid}/status") as f:
      mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
  except (OSError, StopIteration):
    return False
  return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the training child through /proc")
def test_sigterm_reaches_the_training_child_and_a_rerun_resumes(tmp_path):
  command = compare_command(tmp_path / "cmp", "--seeds", "1", "--rules", "ste")
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline, child = time.monotonic() + 600, None
    while child is None and proc.poll() is None and time.monotonic() < deadline:
      # the training child, once it handles SIGTERM itself (saves a checkpoint and exits 75)
      child = next((c for c in _children(proc.pid) if _catches(c, signal.SIGTERM)), None)
      time.sleep(0.05)
    assert child is not None, proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 75, stderr[-3000:]
  assert not os.path.exists(f"/proc/{child}"), "compare exited and left its training child running"
  assert "SIGTERM: stopping" in stderr and "re-run the same command to resume" in stderr
  log = (tmp_path / "cmp" / "logs" / "fp.log").read_text()
  assert "SIGTERM received" in log   # the child had the signal forwarded, saved and stopped
  assert not (tmp_path / "cmp" / "runs").exists()   # no further run started
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)   # the lock is free
  assert again.returncode == 0, again.stderr[-3000:]
  assert "fp: training in" in again.stdout and (tmp_path / "cmp" / "results.md").exists()


def test_the_supervisor_forwards_each_signal_once_and_counts_a_second_ctrl_c_as_abort(tmp_path):
  """A child that counts the SIGINTs it gets for two seconds after the first, then exits with the count."""
  child = ("import signal, sys, time\n"
           "got = []\n"
           "signal.signal(signal.SIGINT, lambda *a: got.append(1))\n"
           "print('ready', flush=True)\n"
           "while not got: time.sleep(0.01)\n"
           "end = time.time() + 2.0\n"
           "while time.time() < end: time.sleep(0.01)\n"
           "sys.exit(len(got))\n")
  for presses, code in ((1, 75), (2, 130)):
    supervisor = execute.Supervisor()   # not installed: stop() is what the handler calls
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, process_group=0)
    assert proc.stdout.readline().strip() == "ready"
    for _ in range(presses):   # both before the wait: forwarded one per poll, so the child's handler sees each
      supervisor.stop(signal.SIGINT)
    assert supervisor.wait(proc) == presses and supervisor.stopping and supervisor.exit_code() == code
    proc.stdout.close()
  run = plan.Run("late", str(tmp_path / "late"), "c.py:v", {})
  with pytest.raises(execute.RunStopped, match="not started"):   # nothing starts after a stop
    execute.execute(run, str(tmp_path / "logs"), {}, supervisor)
  assert not (tmp_path / "logs").exists()
