"""What a table says: one registry of the metrics (their labels, and whether a number is ± its SE or ±
the spread over seeds) that the table, the bar chart and the curve all read; the differences between
models paired over their items; and the formatting of a number with its error."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from minilm_jax import plots
from minilm_jax.evaluation.protocol import STS_PREFIX
from minilm_jax.evaluation.stats import paired_difference

# Scored once per model, without fine-tuning: ± their SE; so is every STS set's correlation
# (STS_PREFIX + NAME:spearman|pearson). Every other metric of a row is a fine-tuning task, ± the spread
# over seeds, labelled "TASK: fine-tune" unless LABELS names it.
ZERO_SHOT = {"heldout_relation_loss": "held-out relation loss", "retrieval_mrr": "retrieval MRR",
             "agreement": "agreement with teacher (Spearman)", "package_linear": "package: linear probe acc"}
LABELS = {**ZERO_SHOT, "package": "package: fine-tune acc", "nsp": "nsp: fine-tune acc"}


def label(metric: str) -> str:
  """The metric's column heading and axis label."""
  if metric.startswith(STS_PREFIX):
    name, statistic = metric[len(STS_PREFIX):].rsplit(":", 1)
    return f"STS {name}: {statistic.capitalize()} with human scores"
  return LABELS.get(metric, f"{metric}: fine-tune")


def is_finetune(metric: str) -> bool:
  return metric not in ZERO_SHOT and not metric.startswith(STS_PREFIX)


def sts_truncation(results: dict) -> List[str]:
  """'NAME: k of n pairs' for each STS set with pairs whose texts were cut to the STS length."""
  seen = {}
  for row in results.values():
    for m, v in row.items():
      if m.startswith(STS_PREFIX) and isinstance(v, dict) and v.get("truncated"):
        seen[m[len(STS_PREFIX):].rsplit(":", 1)[0]] = f"{v['truncated']} of {v['n']} pairs " \
            f"(cut to {v['max_len']} tokens)"
  return [f"{name}: {what}" for name, what in seen.items()]


def metrics_of(results: dict) -> List[str]:
  """The metrics of {model or step: row}, in the order the rows first have them (a row's other entries,
  its size or its tokens, are not dicts)."""
  return list(dict.fromkeys(m for row in results.values() for m, v in row.items() if isinstance(v, dict)))


def error(m: dict) -> Optional[float]:
  """A result's ±: its spread over seeds (fine-tuning) or its SE; None when it has neither."""
  return m.get("spread", m.get("se"))


def fmt(m: dict) -> str:
  """value ± error, the error to 2 significant digits and the value to the same decimals (≥ 3)."""
  err = error(m)
  if err is None or not np.isfinite(err) or err <= 0:
    d = 3
  else:
    d = int(min(6, max(3, 1 - math.floor(math.log10(err)))))
  return f"{m['value']:.{d}f} ± {err if err is not None and np.isfinite(err) else float('nan'):.{d}f}"


def fmt_difference(d: dict) -> str:
  """A paired difference: signed value ± SE, then in SEs."""
  return f"{'+' if d['value'] >= 0 else ''}{fmt(d)} ({d['z']:+.1f} SE)"


def comparisons(results: dict, reps: int, seed: int) -> Dict[str, Dict[str, dict]]:
  """{"A − B": {metric: difference}} for each student against every other model, and for the teacher
  (and the assistant) against each baseline: what a claim that one model beats another rests on."""
  names = list(results)
  students = [n for n in names if n.startswith("student")]
  baselines = [n for n in names if n.startswith("baseline")]
  pairs = [(s, o) for s in students for o in names if o != s]
  pairs += [(t, bl) for t in names if t in ("teacher", "assistant") for bl in baselines]
  teacher = results.get("teacher", {}).get("agreement")
  out = {}
  for a, b in pairs:
    row = {}
    for m in metrics_of(results):
      if m in results[a] and m in results[b]:
        d = paired_difference(m, results[a][m], results[b][m], teacher, reps, seed)
        if d is not None:
          row[m] = d
    out[f"{a} − {b}"] = row
  return out


def last_epoch_everywhere(results: dict) -> List[str]:
  """'model: task' for each fine-tuning result in which every seed's best dev score came at the last
  epoch of its grid: the protocol may have stopped before the model's best."""
  return [f"{name}: {m}" for name, row in results.items() for m, v in row.items()
          if isinstance(v, dict) and v.get("seeds") and
          all(s["epoch"] == max(g["epoch"] for g in s["dev_grid"]) for s in v["seeds"])]


def made_of(name: str, row: dict) -> str:
  """The table's model cell: the name, and the teacher layers (0-based) a baseline is made of or a
  student started from, where the row has them."""
  layers = row.get("teacher_layers")
  if layers is None:
    return name
  said = ", ".join(map(str, layers))
  return f"{name} (from teacher layers {said})" if name.startswith("student") else f"{name} (teacher layers {said})"


def best_subset_note(best: dict, same_as: str) -> str:
  """What results.md says under the table of the best layer subset: its layers, how and on what it was
  chosen, and the baseline it is, if any."""
  scored = {tuple(x["layers"]): x for x in best["scored"]}
  top = scored[tuple(best["layers"])]
  dev = best["dev"]
  return (f"The best layer subset, teacher layers {', '.join(map(str, best['layers']))}"
          f"{f' (the same model as {same_as})' if same_as else ''}, was chosen by {best['score']} "
          f"({top['retrieval']:.3f} + {top['agreement']:.3f}) among {len(scored)} of the "
          f"{best['subsets']} subsets ({best['how']}), on a dev split of {dev['queries']} retrieval "
          f"queries and {dev['pairs']} agreement pairs that shares no sentence with the test probe; "
          f"{best['seconds']:.0f} s.")


def write_table(results: dict, metrics: Sequence[str], seeds: int, md: str,
                differences: Optional[Dict[str, Dict[str, dict]]] = None, note: str = "") -> None:
  """results.md: one row per model (its size, then each metric ± its error), `note` (the best layer
  subset's), a note where fine-tuning stopped at its last epoch or STS texts were cut, and the paired
  differences."""
  head = [label(m) + (f" (± sd, {seeds} seeds)" if is_finetune(m) else " (± SE)") for m in metrics]
  lines = ["| model | size | " + " | ".join(head) + " |", "| --- " * (len(metrics) + 2) + "|"]
  for name, row in results.items():
    cells = [fmt(row[m]) if m in row else "" for m in metrics]
    size = f"{row['layers']}×{row['hidden']}, {row['params_M']:.1f}M params"
    lines.append(f"| {made_of(name, row)} | {size} | " + " | ".join(cells) + " |")
  if note:
    lines += ["", note]
  cut = sts_truncation(results)
  if cut:
    lines += ["", "STS pairs with a text longer than the model embeds whole, embedded from its first tokens: "
              + "; ".join(cut) + "."]
  edge = last_epoch_everywhere(results)
  if edge:
    lines += ["", "Every seed chose the last epoch of its fine-tuning grid (dev was still rising, so the score "
              "may be short of what the model can reach; a larger --epochs tells): " + "; ".join(edge) + "."]
  if differences:
    cols = [m for m in metrics if any(m in row for row in differences.values())]
    lines += ["", "Differences, paired over the same items (± their SE; in SE). Fine-tuning: the SE counts "
              "the test items as a sample and the seeds' spread (see evaluate.paired_difference).", "",
              "| difference | " + " | ".join(label(m) for m in cols) + " |",
              "| --- " * (len(cols) + 1) + "|"]
    for name, row in differences.items():
      lines.append(f"| {name} | " + " | ".join(fmt_difference(row[m]) if m in row else "" for m in cols)
                   + " |")
  with open(md, "w") as f:
    f.write("\n".join(lines) + "\n")


def _bar(m: dict) -> Tuple[float, float]:
  """(value, error) of a result for a plot: no error bar where it has no finite error."""
  e = error(m)
  return m["value"], e if e is not None and np.isfinite(e) else 0.0


def plot_results(results: dict, metrics: Sequence[str], png: str) -> None:
  """results.png: a panel per metric, a bar per model with its error."""
  bars = {name: {m: _bar(v) for m, v in row.items() if isinstance(v, dict)}
          for name, row in results.items()}
  labels = {m: label(m) + (" (± sd)" if is_finetune(m) else " (± SE)") for m in metrics}
  plots.bar_chart(bars, labels, png)


def plot_curve(curve: dict, flat: dict, student: str, png: str) -> None:
  """curve.png: `student`'s metrics at each step of `curve` ({step: row}), ± their error, beside the
  other models of the table `flat` ({model: row}) as flat lines; the relation loss on a log axis."""
  points = {step: {m: _bar(v) for m, v in row.items() if isinstance(v, dict)}
            for step, row in curve.items()}
  lines = {name: {m: v["value"] for m, v in row.items() if isinstance(v, dict)}
           for name, row in flat.items() if name != student}
  plots.curve_plot(points, lines, student, {m: label(m) for m in metrics_of(curve)}, png,
                   log_scale=("heldout_relation_loss",))
