"""PNG plots: the loss curves of training runs, and minilm-eval's bar chart and its curve of quality
against training steps."""

from __future__ import annotations

import json
from typing import Dict, Sequence, Tuple


def read_metrics(path: str) -> list:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def loss_curves(runs: Dict[str, str], png_path: str, title: str = "MiniLM relation loss") -> str:
  """One line per run: {label: metrics.jsonl path} -> a log-scale loss-vs-step PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for label, path in runs.items():
    rows = read_metrics(path)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("distillation loss")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(runs) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(png_path)
  plt.close(fig)
  return png_path


def loss_curve(metrics_path: str, png_path: str) -> str:
  return loss_curves({"student": metrics_path}, png_path)


def bar_chart(bars: Dict[str, Dict[str, Tuple[float, float]]], labels: Dict[str, str], png_path: str) -> None:
  """One panel per metric of `labels` ({metric: axis label}, in order), one horizontal bar per model of
  `bars` ({model: {metric: (value, error)}}, top to bottom) with its error bar; a model without the
  metric leaves a gap."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names, metrics = list(bars), list(labels)
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 3, 1 + 0.45 * len(names)),
                           dpi=110, squeeze=False)
  for i, (ax, m) in enumerate(zip(axes[0], metrics)):
    vals = [bars[n].get(m, (float("nan"), 0.0)) for n in names]
    ax.barh(names, [v for v, _ in vals], xerr=[e for _, e in vals], color="tab:blue", capsize=3)
    ax.set_xlabel(labels[m], fontsize=8)
    ax.invert_yaxis()
    if i:
      ax.set_yticklabels([])
  fig.tight_layout()
  fig.savefig(png_path)
  plt.close(fig)


def curve_plot(curve: Dict[int, Dict[str, Tuple[float, float]]], lines: Dict[str, Dict[str, float]],
               name: str, labels: Dict[str, str], png_path: str, log_scale: Sequence[str] = ()) -> None:
  """One panel per metric of `labels` ({metric: axis label}, in order): `name`'s value ± error at each
  step of `curve` ({step: {metric: (value, error)}}), and each model of `lines` ({model: {metric:
  value}}) as a dashed flat line; the metrics in `log_scale` on a log axis."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics, steps = list(labels), sorted(curve)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), dpi=110, squeeze=False)
  for ax, m in zip(axes[0], metrics):
    ax.errorbar(steps, [curve[s][m][0] for s in steps], [curve[s][m][1] for s in steps],
                fmt="o-", color="black", capsize=3, label=name)
    for i, (other, row) in enumerate(lines.items()):  # a model's colour is the same in every panel
      if m in row:
        ax.axhline(row[m], color=f"C{i}", ls="--", label=other)
    ax.set_xlabel("training step")
    ax.set_ylabel(labels[m])
    if m in log_scale:
      ax.set_yscale("log")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png_path)
  plt.close(fig)
