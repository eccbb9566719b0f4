"""The package's public API: every exported name resolves, the names for
type checkers agree with it, and importing the light modules imports no JAX
or model code (what keeps `scapre-jax inspect` and argument errors quick)."""

import ast
import pathlib
import subprocess
import sys

import scapre_jax as sj


def test_every_exported_name_resolves_to_its_definition():
  for name in sj.__all__:
    value = getattr(sj, name)
    if name in ("metrics", "precision", "sharding"):
      assert value.__name__ == f"scapre_jax.{name}"
    else:
      assert getattr(value, "__name__", name) == name or not callable(value), name
  assert "edit_projections" in dir(sj)


def test_type_checking_imports_match_the_exports():
  tree = ast.parse(pathlib.Path(sj.__file__).read_text())
  [block] = [node for node in tree.body if isinstance(node, ast.If)
             and ast.unparse(node.test) == "typing.TYPE_CHECKING"]
  imported = {alias.name for node in block.body for alias in node.names}
  assert imported == set(sj.__all__)


def test_light_modules_import_no_jax_or_model_code():
  code = ("import sys, scapre_jax, scapre_jax.cli, scapre_jax.io, scapre_jax.outputs, "
          "scapre_jax.requests, scapre_jax.console, scapre_jax.cache, scapre_jax.config, "
          "scapre_jax.inspection\n"
          "print(sorted(m for m in ('jax', 'flax', 'diffusers', 'transformers', 'torch') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"
