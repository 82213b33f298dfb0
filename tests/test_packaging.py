"""What a user of the installed package relies on: declared floors, extras named in ImportErrors, the
console script with the shipped configs (from outside a checkout), and the wheel's contents."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

from ewgs_jax import data, extras, train
from tests.training_configs import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def load_floors_script():
  spec = importlib.util.spec_from_file_location("floors", ROOT / ".ci" / "floors.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_dependency_has_a_floor_the_oldest_ci_leg_pins():
  pins = load_floors_script().floors(ROOT / "pyproject.toml")
  for name in ("jax", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "tensorflow-datasets", "pillow",
               "grain", "scikit-learn", "matplotlib", "flatbuffers", "pytest"):
    assert name in pins, name
  # floors known not to work (issue 16): keep them out
  assert pins["numpy"] >= "2" and pins["orbax-checkpoint"] == "0.11.17" and pins["matplotlib"] == "3.8.4"
  assert pins["scikit-learn"] == "1.4.2" and pins["jax"] == "0.10.2"


def test_every_third_party_import_is_declared():
  """Top-level imports of the package, against the declared requirements (a module -> distribution map)."""
  import ast
  declared = " ".join(PYPROJECT["dependencies"] + sum(PYPROJECT["optional-dependencies"].values(), [])).lower()
  distribution = {"jax": "jax", "flax": "flax", "optax": "optax", "chex": "chex", "orbax": "orbax-checkpoint",
                  "ml_collections": "ml-collections", "absl": "absl-py", "numpy": "numpy", "scipy": "scipy",
                  "tensorflow_datasets": "tensorflow-datasets", "PIL": "pillow", "grain": "grain",
                  "sklearn": "scikit-learn", "matplotlib": "matplotlib"}
  stdlib = set(sys.stdlib_module_names) | {"ewgs_jax", "tensorflow"}   # tensorflow: optional, said in the error
  found = set()
  for path in (ROOT / "ewgs_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module.split(".")[0])
  found |= {m.split(".")[0] for m in extras.OPTIONAL}   # imported by name through extras.require
  undeclared = sorted(m for m in found - stdlib if distribution.get(m, m) not in declared)
  assert not undeclared
  for unused in ("importlib_resources",):
    assert unused not in declared


@pytest.mark.parametrize("module, call, extra", [
    ("sklearn", lambda: data.digits_source("train"), "demo"),
    ("matplotlib", extras.pyplot, "plots"),
    ("tensorflow_datasets", lambda: data.get_dataset_info("cifar10"), "data"),
    ("PIL", lambda: data.host.center_crop(__import__("numpy").zeros((300, 300, 3), "uint8")), "data"),
    ("grain", lambda: data.workers._grain(), "data"),
])
def test_a_missing_optional_dependency_names_its_extra(monkeypatch, module, call, extra):
  data.datasets._digits.cache_clear()
  for name in list(sys.modules):
    if name == module or name.startswith(module + "."):
      monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, module, None)   # as if not installed
  with pytest.raises(ImportError, match=rf"pip install 'ewgs_jax\[{extra}\]'"):
    call()
  data.datasets._digits.cache_clear()


def test_an_error_inside_an_installed_optional_package_is_not_disguised(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)   # sklearn is there, its submodule breaks
  with pytest.raises(ModuleNotFoundError) as raised:
    extras.require("sklearn.datasets", "x")
  assert not isinstance(raised.value, extras.MissingExtraError)


def test_shipped_config_names_resolve_to_the_package_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)                      # no configs/ directory here
  path, variant = train.shipped_config_path("cifar10_resnet20:w2a2_ewgs").rsplit(":", 1)
  assert variant == "w2a2_ewgs" and os.path.samefile(path, ROOT / "ewgs_jax" / "configs" / "cifar10_resnet20.py")
  assert train.shipped_config_path("quickstart.py").endswith(os.path.join("ewgs_jax", "configs", "quickstart.py"))
  (tmp_path / "quickstart.py").write_text("")      # a file the user has wins over the shipped name
  assert train.shipped_config_path("quickstart.py:fp") == "quickstart.py:fp"
  assert train.shipped_config_path("configs/other.py:x") == "configs/other.py:x"


def cli(*args, cwd, prelude=""):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  code = f"{prelude}\nimport sys\nsys.argv = ['ewgs-jax-train', *{list(args)!r}]\nfrom ewgs_jax.train import run\nrun()"
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_module_entry_point_runs_every_shipped_config_by_name_outside_a_checkout(tmp_path):
  for name in ("cifar10_resnet20", "imagenet_resnet18"):   # the paper settings
    out = subprocess.run([sys.executable, "-m", "ewgs_jax.train", "--config", f"{name}:w2a2_ewgs",
                          "--workdir", str(tmp_path / name), "--config.quant.weight_bits=0"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=300)
    # the config loaded from the package and was validated: the bad override is the one error
    assert out.returncode == 1 and "weight_bits" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
  help_text = subprocess.run([sys.executable, "-m", "ewgs_jax.train", "--help"], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120).stdout
  assert "ewgs-jax-train --config CONFIG[:VARIANT]" in help_text and "--config_keys" in help_text


def test_a_missing_extra_stops_training_with_one_line_naming_it(tmp_path):
  out = cli("--config", "quickstart:fp", "--workdir", str(tmp_path / "w"), cwd=tmp_path,
            prelude="import sys; sys.modules['sklearn'] = None")
  assert out.returncode == 1, out.stderr[-2000:]
  assert out.stderr.strip().splitlines() == [
      "error: the bundled digits dataset (the offline quickstart) needs scikit-learn, which is not installed; "
      "install it with `pip install 'ewgs_jax[demo]'` (or `pip install scikit-learn`)"]


# README "Install": the package is on no index; these are the commands it gives to build and install
# the wheel (the slow test below runs them).
README_WHEEL = "pip wheel --no-deps -w dist ."
README_INSTALL = "pip install --find-links dist 'ewgs_jax[demo,plots]'"


def test_readme_install_says_how_to_install_from_a_checkout_or_a_wheel():
  section = (ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
  commands = section.split("```bash\n", 1)[1].split("```", 1)[0]
  assert "pip install -e '.[demo,plots]'" in commands
  assert README_WHEEL in commands and README_INSTALL in commands
  assert "pip install 'ewgs_jax" not in commands   # it is on no index: that command fails for everyone


def test_one_version_source():
  import ewgs_jax
  assert "version" not in PYPROJECT and PYPROJECT["dynamic"] == ["version"]
  build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
  assert build["version"] == {"attr": "ewgs_jax.__version__"}
  assert f"## {ewgs_jax.__version__}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.slow
def test_the_wheel_ships_configs_console_scripts_types_and_license(tmp_path):
  dist = tmp_path / "dist"
  command = README_WHEEL.split()   # pip wheel --no-deps -w dist . (here: dist in tmp_path, . the checkout)
  subprocess.run([sys.executable, "-m", *command[:-2], str(dist), str(ROOT), "--quiet"], check=True, timeout=600)
  (wheel,) = dist.glob("ewgs_jax-*.whl")
  # README's install from it (--find-links dist), offline and without dependencies, into a directory
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--find-links",
                  str(dist), "--target", str(site), "ewgs_jax"], check=True, timeout=600)
  out = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, ewgs_jax; "
                        "print(ewgs_jax.__file__, ewgs_jax.__version__, m.version('ewgs_jax'))"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split()
  import ewgs_jax
  assert out[0].startswith(str(site)), out                                  # the installed copy, not the checkout
  assert out[1] == out[2] == ewgs_jax.__version__ and f"-{out[1]}-" in wheel.name, (out, wheel.name)
  names = zipfile.ZipFile(wheel).namelist()
  for config in ("cifar10_resnet20", "fashion_mnist_resnet20", "imagenet_resnet18", "quickstart"):
    assert f"ewgs_jax/configs/{config}.py" in names
  assert "ewgs_jax/py.typed" in names and "ewgs_jax/train.py" in names
  info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
  entry_points = zipfile.ZipFile(wheel).read(info).decode()
  assert "ewgs-jax-train = ewgs_jax.train:run" in entry_points and "ewgs-jax-compare = ewgs_jax.compare:run" in entry_points
  license_file = [n for n in names if n.endswith("LICENSE") and ".dist-info/" in n]
  assert license_file and b"Apache License" in zipfile.ZipFile(wheel).read(license_file[0])
  metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  for extra in ("data", "demo", "plots", "test", "cuda12", "tpu"):
    assert f"Provides-Extra: {extra}" in metadata
