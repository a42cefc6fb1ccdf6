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


def private_uses(source: str, modules) -> list:
  """`module._name` and `from minilm_jax.module import _name` in `source`, for the package's `modules`
  (by their last dotted part, as the code refers to them after `from minilm_jax import x`)."""
  short = {m.split(".")[-1] for m in modules}
  out = []
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in short
        and node.attr.startswith("_") and not node.attr.startswith("__")):
      out.append(f"{node.value.id}.{node.attr}")
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilm_jax"):
      out += [f"{node.module}.{a.name}" for a in node.names
              if a.name.startswith("_") and not a.name.startswith("__")]
  return out


def test_no_module_uses_anothers_private_names():
  mods = _modules()
  found = {}
  for m, path in mods.items():
    own = m.split(".")[-1]
    uses = [u for u in private_uses(open(path).read(), mods) if not u.startswith(f"{own}.")
            and not u.startswith(f"minilm_jax.{m}.")]
    if uses:
      found[m] = uses
  assert found == {}


def test_the_private_check_sees_one():
  mods = {"hf": "", "evaluation.stats": ""}
  assert private_uses("from minilm_jax import hf\nhf._x(1)\nhf.y()", mods) == ["hf._x"]
  assert private_uses("from minilm_jax.evaluation.stats import _z, w", mods) == [
      "minilm_jax.evaluation.stats._z"]
  assert private_uses("stats.__name__", mods) == []
