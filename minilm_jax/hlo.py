"""Reading a compiled step's HLO text (`compiled.as_text()`): its collectives, custom calls and the
patterns the tests forbid. Plain text parsing, so it works for any backend's optimised HLO.

An instruction line reads `%name = SHAPE op(OPERANDS), attributes`, where SHAPE is `bf16[8,128]{1,0}` or
a tuple `(f32[4]{0}, bf16[2,3]{1,0:T(8,128)})`; operands carry their shapes inline in optimised HLO.
"""

from __future__ import annotations

import collections
import re
from typing import Dict, Iterator, List, NamedTuple, Tuple

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1,
          "f8e5m2fnuz": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")


class Instruction(NamedTuple):
  name: str
  shape: str       # the result's shape text
  op: str          # "all-gather", "all-reduce-start", "fusion", ...
  rest: str        # operands and attributes

  @property
  def arrays(self) -> List[Tuple[str, Tuple[int, ...]]]:
    """(dtype, dims) of each array in the result shape (several for a tuple)."""
    return arrays(self.shape)

  @property
  def operand_arrays(self) -> List[Tuple[str, Tuple[int, ...]]]:
    """(dtype, dims) of the operands, from their inline shapes (up to the closing parenthesis)."""
    depth, end = 1, len(self.rest)
    for i, ch in enumerate(self.rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        end = i
        break
    return arrays(self.rest[:end])

  @property
  def largest_bytes(self) -> int:
    return max((array_bytes(d, s) for d, s in self.arrays), default=0)


def arrays(shape_text: str) -> List[Tuple[str, Tuple[int, ...]]]:
  return [(d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(shape_text)
          if d in _BYTES]


def array_bytes(dtype: str, dims: Tuple[int, ...]) -> int:
  n = _BYTES[dtype]
  for d in dims:
    n *= d
  return n


def instructions(hlo_text: str) -> Iterator[Instruction]:
  """Every instruction of every computation (a loop body's once, however often it runs)."""
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      yield Instruction(*m.groups())


def collective_kind(op: str) -> str:
  """"all-gather" for all-gather and all-gather-start; "" for anything else (and for the -done half)."""
  base = op[:-len("-start")] if op.endswith("-start") else op
  return base if base in COLLECTIVES else ""


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
  """{kind: {"count": n, "largest_bytes": b, "async": a}} of the program's collectives (async ones counted
  once); "async": how many of them may overlap compute (a -start op, or XLA:TPU's asynchronous
  collective fusion, which marks the op with an async_collective_name)."""
  out: Dict[str, Dict[str, int]] = {}
  for ins in instructions(hlo_text):
    kind = collective_kind(ins.op)
    if kind:
      c = out.setdefault(kind, {"count": 0, "largest_bytes": 0, "async": 0})
      c["count"] += 1
      c["largest_bytes"] = max(c["largest_bytes"], ins.largest_bytes)
      c["async"] += ins.op.endswith("-start") or "async_collective_name=" in ins.rest
  return dict(sorted(out.items()))


def custom_call_targets(hlo_text: str) -> collections.Counter:
  """How often each custom_call_target appears."""
  return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


_SKIP = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all")


def entry_instructions(hlo_text: str) -> List[Instruction]:
  """The instructions of the ENTRY computation (the step's top level: its fusions, custom calls,
  copies and collectives; a fusion's body is not listed separately)."""
  start = hlo_text.find("\nENTRY")
  if start < 0:
    return []
  end = hlo_text.find("\n}", start)
  return list(instructions(hlo_text[start:end if end > 0 else None]))


def _operands(rest: str) -> List[str]:
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def source_of(ins: Instruction) -> str:
  """Where an instruction comes from in the program, from its op_name metadata, with layer numbers
  folded ("jvp(teacher)/BertEncoder/encoder/layer/N/output/dense/dot_general"); memory-space copies
  (XLA's prefetches into and out of on-chip memory) have none and are named by their op."""
  m = re.search(r'op_name="([^"]+)"', ins.rest)
  if ins.op in ("copy-start", "slice-start", "copy", "dynamic-slice") and not m:
    return f"({ins.op}: memory-space copies)"
  if not m:
    return f"({ins.op})"
  name = re.sub(r"^jit\([^)]*\)/", "", m.group(1))
  return re.sub(r"/(layer|layers)/\d+/", r"/\1/N/", name)


def top_traffic(hlo_text: str, n: int = 10) -> List[Tuple[str, int]]:
  """The `n` sources (source_of) that read and write the most bytes per step, summed over their
  instructions: each top-level instruction's operands and result (an upper bound on its HBM traffic:
  operands already in on-chip memory count too), prefetch copies once each way. Sorted, largest first."""
  entry = entry_instructions(hlo_text)
  shape = {i.name: i.shape for i in entry}
  size = lambda s: sum(array_bytes(d, dims) for d, dims in arrays(s))
  totals: Dict[str, int] = collections.Counter()
  for ins in entry:
    if ins.op in _SKIP or ins.op.endswith("-done") or 'custom_call_target="ConcatBitcast"' in ins.rest:
      continue  # (ConcatBitcast joins prefetched slices in on-chip memory: counted at the slice-start)
    if ins.op in ("copy-start", "slice-start"):  # (source, copy, context) or ((source), slice, context)
      totals[source_of(ins)] += 2 * array_bytes(*ins.arrays[1 if ins.op == "slice-start" else 0])
    else:
      operands = sum(size(shape.get(o, "")) for o in _operands(ins.rest))
      totals[source_of(ins)] += size(ins.shape) + operands
  return sorted(totals.items(), key=lambda kv: -kv[1])[:n]
