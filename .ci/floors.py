"""Prints pip constraints pinning every declared floor of pyproject.toml (``name>=v`` -> ``name==v``).

The CI's "oldest" leg installs with them (``pip install -c <this output> -e '.[test]'``), so the
floors in pyproject.toml are exactly what it tests. Requirements of the accelerator extras (jax's
CUDA / TPU wheels) and the package's references to its own extras are left out.
"""

import pathlib
import re
import sys
import tomllib

ACCELERATOR_EXTRAS = ("cuda12", "cuda13", "tpu")
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*$")


def floors(pyproject: pathlib.Path) -> dict[str, str]:
  project = tomllib.loads(pyproject.read_text())["project"]
  requirements = list(project["dependencies"])
  for extra, items in project.get("optional-dependencies", {}).items():
    if extra not in ACCELERATOR_EXTRAS:
      requirements += items
  pins = {}
  for requirement in requirements:
    match = FLOOR.match(requirement)
    if match is None:
      if not requirement.startswith(project["name"] + "["):
        sys.exit(f"floors.py: {requirement!r} has no '>=' floor; every dependency needs one")
      continue
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    if pins.get(name, match.group(3)) != match.group(3):
      sys.exit(f"floors.py: {name} has two floors ({pins[name]}, {match.group(3)})")
    pins[name] = match.group(3)
  return pins


if __name__ == "__main__":
  root = pathlib.Path(__file__).resolve().parent.parent
  for name, version in sorted(floors(root / "pyproject.toml").items()):
    print(f"{name}=={version}")
