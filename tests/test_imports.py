"""The package's import graph: no module imports one that imports it back (directly or around a loop),
counting imports inside functions too, so every module can be read, loaded and tested on its own."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minilm_jax")


def _modules():
  """{dotted name relative to minilm_jax: file path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), PKG)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
  return out


def _imports(path, names):
  """The package's modules that the file imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for t in targets:
      if t.startswith("minilm_jax."):
        t = t[len("minilm_jax."):]
        if t in names:
          found.add(t)
  return found


def import_graph():
  mods = _modules()
  return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def cycles(graph):
  """Every strongly connected group of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        out.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circle():
  assert cycles(import_graph()) == []


def test_the_check_sees_a_circle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  graph = import_graph()
  assert "modernbert" in graph["families"] and "model" in graph["modernbert"]  # what it reads is real
