"""``python -m ewgs_jax.export WORKDIR OUTPUT`` on a tiny trained run: the file, the check, the JSON line, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ewgs_jax import checkpoints, names, reporting, training
from ewgs_jax.export import __main__ as export_cli, runtime
from tests.training_configs import ROOT, small_config


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export_cli") / "w2a2")
  training.train_and_evaluate(small_config(variant="w2a2_ste"), workdir)
  return workdir


def run_cli(capsys, *args):
  try:
    code = export_cli.main(list(args))
  except SystemExit as e:
    code = e.code
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_exports_checks_and_prints_one_json_line_last(qat_run, tmp_path, capsys):
  output = tmp_path / "model.npz"
  code, out, err = run_cli(capsys, qat_run, str(output), "--platforms", "cpu")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  for key in ("agreement", "max_rel_logit_error", "test_accuracy", "bytes", "fp_bytes"):
    assert key in result
  assert result["agreement"] == 1.0 and result["max_rel_logit_error"] < 1e-5 and result["eval_examples"] == 360
  # the fake-quantized side is the model training evaluated: same accuracy as its summary
  summary = reporting.read_summary(qat_run)
  assert result["fake_quant_test_accuracy"] == pytest.approx(summary["final_test_accuracy"])
  assert result["test_accuracy"] == pytest.approx(result["fake_quant_test_accuracy"])
  assert result["bytes"] == os.path.getsize(output)
  params = jax.tree_util.tree_flatten_with_path(checkpoints.load_variables(qat_run)["params"])[0]
  fp_params = sum(np.size(v) for path, v in params if not names.is_quantizer_param(path))
  assert result["fp_bytes"] == 4 * fp_params   # the network's parameters as float32, quantizers' excluded
  model = runtime.load(str(output))
  assert model.metadata["source"]["workdir"] == os.path.abspath(qat_run)
  assert result["integer_layers"] == len(model.metadata["layers"]) == 2


def copy_of(run, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(run, target)
  return str(target)


def edit_config(workdir, **changes):
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with open(path, "w") as f:
    json.dump(config, f)


def corrupt_checkpoints(workdir):
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such directory"),
    ("not_a_run", "not a training workdir"),
    ("unfinished", "has not finished"),
    ("preempted", "was stopped early"),
    ("full_precision", "full-precision run has no quantized layers"),
    ("corrupt", "unreadable"),
    ("old_config", "written by ewgs_jax 0.1"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(qat_run, tmp_path, capsys, damage, message):
  workdir = str(tmp_path / "nowhere")
  if damage == "not_a_run":
    os.makedirs(workdir)
  elif damage != "missing":
    workdir = copy_of(qat_run, tmp_path, damage)
  if damage == "unfinished":
    os.remove(os.path.join(workdir, "summary.json"))
  elif damage == "preempted":
    summary = reporting.read_summary(workdir)
    reporting.write_summary(workdir, {**summary, "preempted": True})
  elif damage == "full_precision":
    edit_config(workdir, **{"quant.enabled": False})
  elif damage == "corrupt":
    corrupt_checkpoints(workdir)
  elif damage == "old_config":
    edit_config(workdir, **{"quant.backward": "ewgs", "delta.mode": "hessian"})
  output = tmp_path / "out.npz"
  code, out, err = run_cli(capsys, workdir, str(output), "--platforms", "cpu")
  assert code == export_cli.EXIT_ERROR and out == ""
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
  assert not output.exists()


def test_module_entry_point_exits_nonzero_with_one_line(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "ewgs_jax.export", str(tmp_path / "missing"), str(tmp_path / "o.npz")],
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == export_cli.EXIT_ERROR
  assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such directory; pass the --workdir "
                                              "of a finished training run"]
  usage = subprocess.run([sys.executable, "-m", "ewgs_jax.export"], env=env, capture_output=True, text=True,
                         timeout=300)
  assert usage.returncode == export_cli.EXIT_USAGE
  with pytest.raises(SystemExit) as bad_platform:
    export_cli.parse_args(["w", "o.npz", "--platforms", "gpu"])
  assert bad_platform.value.code == export_cli.EXIT_USAGE


def test_a_missing_flatbuffers_names_the_extra(qat_run, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "flatbuffers", None)   # as if not installed
  code, _, err = run_cli(capsys, qat_run, str(tmp_path / "out.npz"), "--platforms", "cpu")
  assert code == export_cli.EXIT_ERROR and "pip install 'ewgs_jax[export]'" in err


def test_a_failed_check_exits_3_after_the_json_line(qat_run, tmp_path, capsys):
  code, out, err = run_cli(capsys, qat_run, str(tmp_path / "m.npz"), "--platforms", "cpu", "--max-rel-error", "0")
  assert code == export_cli.EXIT_CHECK_FAILED and "max_rel_logit_error" in err
  assert json.loads(out.strip().splitlines()[-1])["agreement"] == 1.0
