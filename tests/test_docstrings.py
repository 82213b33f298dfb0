"""Every public module-level function of ``ewgs_jax`` documents its arguments (issue 13).

Google style: a docstring with an ``Args:`` section (one line per parameter) and, when the function
returns something, ``Returns:``. ``ewgs_jax/configs`` (config files, each a ``get_config``) is
exempt.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ewgs_jax"


def _public_functions():
  for path in sorted(PACKAGE.rglob("*.py")):
    if "configs" in path.relative_to(PACKAGE).parts:
      continue
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
        yield path.relative_to(PACKAGE.parent), node


def _parameters(node: ast.FunctionDef) -> list[str]:
  a = node.args
  names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
  names += [f"*{a.vararg.arg}"] if a.vararg else []
  names += [f"**{a.kwarg.arg}"] if a.kwarg else []
  return names


def _returns_value(node: ast.FunctionDef) -> bool:
  def walk(n):   # the function's own returns, not those of nested functions or lambdas
    for child in ast.iter_child_nodes(n):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
        continue
      yield child
      yield from walk(child)
  return any(isinstance(n, ast.Return) and n.value is not None and
             not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in walk(node))


def test_public_functions_have_args_sections():
  offenders = [f"{path}:{node.lineno}:{node.name}" for path, node in _public_functions()
               if _parameters(node) and "Args:" not in (ast.get_docstring(node) or "")]
  assert not offenders, "public functions without an Args: docstring section:\n" + "\n".join(offenders)


def test_args_sections_name_every_parameter():
  offenders = []
  for path, node in _public_functions():
    doc = ast.get_docstring(node) or ""
    if "Args:" not in doc:
      continue
    section = doc.split("Args:", 1)[1].split("\n\n", 1)[0]
    documented = set()   # ``name: ...`` lines, or ``a, b: ...`` for parameters described together
    for line in section.splitlines():
      if ":" in line:
        documented.update(name.strip() for name in line.split(":", 1)[0].split(","))
    missing = [p for p in _parameters(node) if p not in documented]
    if missing:
      offenders.append(f"{path}:{node.lineno}:{node.name}: {', '.join(missing)}")
  assert not offenders, "Args: sections missing parameters:\n" + "\n".join(offenders)


def test_functions_that_return_a_value_have_returns_sections():
  offenders = [f"{path}:{node.lineno}:{node.name}" for path, node in _public_functions()
               if _parameters(node) and _returns_value(node) and "Returns:" not in (ast.get_docstring(node) or "")]
  assert not offenders, "public functions returning a value without a Returns: section:\n" + "\n".join(offenders)
