"""The package's import structure: no import cycles, and the evaluation side independent of training."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kure_jax"


def module_name(path: Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
  """Every kure_jax module `path` imports, at module level or inside functions (`from kure_jax import x` names
  the submodule x where there is one)."""
  modules = {module_name(p) for p in PKG.rglob("*.py")}
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("kure_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kure_jax") and not node.level:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m in modules}


def graph() -> dict[str, set[str]]:
  g = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}
  # a package's __init__ importing (or lazily loading) its own submodules is how packages work, not a cycle
  return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}


def test_no_import_cycles():
  g = graph()
  state: dict[str, int] = {}
  cycle: list[str] = []

  def visit(m, stack):
    state[m] = 1
    for d in sorted(g.get(m, ())):
      if d == m or d not in g:
        continue
      if state.get(d) == 1:
        cycle.extend(stack[stack.index(d):] + [d])
        return True
      if state.get(d) is None and visit(d, stack + [d]):
        return True
    state[m] = 2
    return False

  for m in sorted(g):
    if state.get(m) is None and visit(m, [m]):
      break
  assert not cycle, " -> ".join(cycle)


def test_the_graph_sees_function_level_imports():
  """The control: lapq reads the task's sums (once imported inside a function, from train)."""
  assert "kure_jax.tasks" in imports_of(PKG / "evaluation" / "lapq.py")
  assert "kure_jax.calibration" in imports_of(PKG / "evaluation" / "robustness.py")


def test_layers():
  """The subpackages show the architecture: the numerics core imports only itself and the shared helpers; models
  import no training or evaluation; the evaluation side imports nothing from training (directly or through
  another module)."""
  g = graph()

  def reach(m):
    seen, todo = set(), [m]
    while todo:
      for d in g.get(todo.pop(), ()):
        if d not in seen:
          seen.add(d)
          todo.append(d)
    return seen

  shared = {"kure_jax._checks", "kure_jax.errors", "kure_jax.tree_paths"}
  for m in g:
    if m.startswith("kure_jax.core."):
      assert reach(m) <= {d for d in g if d.startswith("kure_jax.core")} | shared, m
    if m.startswith("kure_jax.models"):
      assert not {d for d in reach(m) if d.startswith(("kure_jax.training", "kure_jax.evaluation"))}, m
    if m.startswith("kure_jax.evaluation"):
      assert not {d for d in reach(m) if d.startswith("kure_jax.training")}, m
  assert {m.split(".")[1] for m in g if m.count(".") >= 2} >= {"core", "models", "data", "training", "evaluation"}


@pytest.mark.parametrize("module", ["kure_jax.evaluation.evaluate", "kure_jax.evaluation.robustness",
                                    "kure_jax.evaluation.lapq", "kure_jax.evaluation.report", "kure_jax.calibration"])
def test_evaluation_does_not_load_training(module):
  code = (f"import sys, {module}\n"
          "print(sorted(m for m in sys.modules if m in ('kure_jax.training.train', 'optax', 'orbax.checkpoint')))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     cwd=str(PKG.parent))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "kure_jax.training.train" not in r.stdout, r.stdout
