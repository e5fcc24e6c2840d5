"""lego_jax's modules import each other without a circle, and pyflakes finds nothing (no unused
import or variable, no undefined name) in the code, tests, configs and launch scripts.

Every `import` in every module counts, at the top of a file or inside a function (a function's
import runs as surely as a top-level one, only later), read from the source with the AST, so
nothing is imported to build the graph. Importing `a.b.c` also runs the packages `a` and `a.b`:
those edges count too.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lego_jax"


def module_names(root: Path = ROOT) -> dict[str, Path]:
  """{"lego_jax.train.ldm": path} for every module and package of lego_jax."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _with_parents(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
  """The lego_jax modules (and their packages) that module `name` imports anywhere in its file."""
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: from the module's package, one level up per extra dot
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
      # `from a.b import c`: c is a module when a file says so, else a name defined in a.b
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      if target.split(".")[0] != PACKAGE:
        continue
      while target not in modules:  # `import a.b.name_in_b` style: the deepest module
        target = target.rpartition(".")[0]
      found.update(m for m in _with_parents(target) if m in modules)
  found.discard(name)
  return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
  modules = module_names(root)
  return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One circle per group of modules that import each other (a strongly connected component of
  more than one module; Tarjan's algorithm, iterative): [a, b, ..., a], a shortest path through
  the group back to its first module. `groups` lists each group's modules."""
  return [_circle_in(graph, c) for c in groups(graph)]


def groups(graph: dict[str, set[str]]) -> list[set[str]]:
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  counter = 0
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = counter
    counter += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(set(component))
  return sorted(components, key=min)


def _circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
  """A shortest circle through the component's first module (breadth-first inside it)."""
  start = min(component)
  previous = {start: None}
  queue = [start]
  for node in queue:
    for child in sorted(graph[node] & component):
      if child == start:
        path = [node]
        while previous[path[-1]] is not None:
          path.append(previous[path[-1]])
        return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
      if child not in previous:
        previous[child] = node
        queue.append(child)
  raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_graph_reads_function_level_and_relative_imports(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from lego_jax.sub import b\n")
  (pkg / "sub" / "b.py").write_text("from . import c\nimport os\n")
  (pkg / "sub" / "c.py").write_text("from lego_jax.a import f\n")
  graph = import_graph(tmp_path)
  assert graph["lego_jax.a"] == {"lego_jax", "lego_jax.sub", "lego_jax.sub.b"}
  assert graph["lego_jax.sub.b"] == {"lego_jax", "lego_jax.sub", "lego_jax.sub.c"}
  assert cycles(graph) == [["lego_jax.a", "lego_jax.sub.b", "lego_jax.sub.c", "lego_jax.a"]]


def test_no_import_circle():
  graph = import_graph()
  found = groups(graph)
  if found:
    pytest.fail(f"{len(found)} import circle(s) in lego_jax, one per group of modules that "
                "import each other:\n" + "\n".join(
                    " -> ".join(_circle_in(graph, g)) + f"   (group: {', '.join(sorted(g))})"
                    for g in found))


def pyflakes_messages(paths) -> list[str]:
  """pyflakes' findings (unused imports and variables, undefined names, ...) in `paths`."""
  from pyflakes import api, reporter

  out, err = io.StringIO(), io.StringIO()
  api.checkRecursive([str(p) for p in paths], reporter.Reporter(out, err))
  return (out.getvalue() + err.getvalue()).splitlines()


def test_pyflakes_finds_nothing(tmp_path):
  (tmp_path / "bad.py").write_text("import os\n")
  assert pyflakes_messages([tmp_path]) == [f"{tmp_path / 'bad.py'}:1:1: 'os' imported but unused"]
  found = pyflakes_messages(ROOT / d for d in ("lego_jax", "data_prep", "tests", "configs",
                                               "launch"))
  assert not found, "\n".join(found)
