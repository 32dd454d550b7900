"""The import graph of the project's packages, read from the source (every import, top-level or lazy)."""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_files(package: str) -> Dict[str, pathlib.Path]:
  """{dotted module name: file} of every module under `package`."""
  out = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def imports_of(name: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
  """Project modules `name` imports anywhere in its file, with the packages their import runs."""
  is_package = path.name == "__init__.py"
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for target in targets:
      parts = target.split(".")
      for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
        if ".".join(parts[:i]) in known:
          found.add(".".join(parts[:i]))
  # A module's own packages are initialised before it runs: importing them is no circle.
  own = name.split(".")
  return found - {".".join(own[:i]) for i in range(1, len(own) + 1)}


def graph(*packages: str) -> Dict[str, Set[str]]:
  files = {}
  for p in packages:
    files.update(module_files(p))
  return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
  """One cycle per strongly connected component with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(g.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out
