"""PNG plots of training runs."""

from __future__ import annotations

import json
from typing import Dict


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
