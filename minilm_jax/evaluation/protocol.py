"""What an evaluation is: its settings (Protocol), a labelled task (Task) and its dev split, the scored
text pairs of an STS probe (Pairs), and the settings a results table records so that a curve or a later script can check it was made the same way."""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Every setting that changes a number; recorded in results.json (a curve must use the same)."""
  queries: int = 1000            # retrieval queries (candidates: their successors)
  pairs: int = 2000              # agreement pairs
  bootstrap: int = 200           # bootstrap resamples: agreement, and the paired differences
  sentence_len: int = 128        # max tokens when embedding a sentence or docstring
  package_classes: int = 16
  package_per_class: int = 50    # docstrings per class (balanced: the smallest chosen class may cap it)
  seeds: int = 3
  lrs: Tuple[float, ...] = (2e-4,)
  epochs: int = 2                # dev scored after each of 1..epochs
  nsp_train: int = 2000          # pairs, of which 20% become dev (fewer if the text has fewer)
  nsp_test: int = 1000
  finetune_len: int = 64
  batch: int = 32
  seed: int = 0                  # probe sampling
  # The best layer subset (subsets.py), chosen on a dev split of the text that shares no sentence with
  # the test probe: `dev_queries` retrieval queries and twice as many agreement pairs.
  dev_queries: int = 300
  subsets_exhaustive: int = 100  # score every subset of the teacher's layers where there are this many or fewer,
  subset_beam: int = 4           # else a beam search of this width
  subset_budget: int = 100       # that scores at most this many subsets


# Cost on this project's 2 CPU cores (an AMD EPYC), alone: 38 minutes for the then 3-layer quality table
# (a 6x384 teacher, one 3x384 student, three baselines; on the Intel Xeon since, 29 minutes with two 4x384
# students); each 3x384 model ~6 minutes, the teacher ~12, most of it nsp (3 seeds x 2
# epochs x 1,600 pairs, then 400 dev and 1,000 test pairs; a 3x384 model fine-tunes at ~17 ms per example
# of 64 tokens). Each further student adds ~6 minutes. The zero-shot probes take ~25 s per student, and
# parsing site-packages for the package task 1-2.5 minutes once. nsp got 2,000 pairs (it had 500) because
# with 400 training pairs it lifted even the teacher only to 0.63 (0.56 on other text), within the seeds'
# spread of the baselines; with 1,600 the teacher reaches 0.77 and the seeds' sd is 0.01-0.02. The best
# layer subset's choice adds 1-1.5 minutes for a 6-layer teacher (20 subsets on ~550 dev sentences), and
# the offset and best-subset baselines a model each (~25 s zero-shot, ~6 minutes with fine-tuning).
DEFAULT_PROTOCOL = Protocol()

# A task's part: text_a, text_b (or None), labels y_N.
Part = Tuple[List[str], Optional[List[str]], np.ndarray]


# The metric keys of an STS probe: STS_PREFIX + NAME + ":spearman" | ":pearson" (report.label reads them).
STS_PREFIX = "sts:"


def sts_metric(name: str, statistic: str) -> str:
  """The results' key of an STS set's correlation ("spearman" or "pearson")."""
  return f"{STS_PREFIX}{name}:{statistic}"


@dataclasses.dataclass
class Pairs:
  """Text pairs each with a human similarity score, for an STS probe (zero-shot: nothing is trained)."""
  name: str
  a: List[str]
  b: List[str]
  score_N: np.ndarray   # float64


@dataclasses.dataclass
class Task:
  """A labelled task: its train and test parts, the metric it is scored by, and its dev part where it
  has its own."""
  name: str
  train: Part
  test: Part
  metric: str = "accuracy"
  dev: Optional[Part] = None            # None: carved per seed
  labels: Optional[List[str]] = None    # class names, where known


def take(part: Part, idx) -> Part:
  """The rows `idx` (int array [K]) of a task's part."""
  a, b, y = part
  return [a[i] for i in idx], None if b is None else [b[i] for i in idx], y[idx]


def split_dev(task: Task, seed: int, frac: float = 0.2) -> Task:
  """`task` with a dev split: its own, or `frac` of its training part carved off with `seed`."""
  if task.dev is not None:
    return task
  order = np.random.default_rng([seed, 7]).permutation(len(task.train[2]))
  cut = max(1, int(frac * len(order)))
  return dataclasses.replace(task, train=take(task.train, order[cut:]), dev=take(task.train, order[:cut]))


def settings_of(protocol: Protocol, text, tasks, package_roots, text_field: str = "text",
                sts: Sequence[str] = ()) -> dict:
  """What a table records of how it was evaluated (results.json's "settings"), as JSON would read it."""
  return json.loads(json.dumps({"protocol": dataclasses.asdict(protocol), "tasks": list(tasks),
                                "text": text if text is None or isinstance(text, str) else "in-memory",
                                "text_field": text_field, "package_roots": list(package_roots),
                                "sts": list(sts)}))


def made_with(made: dict, want: dict) -> bool:
  """Whether a table whose results.json has settings `made` was evaluated as `want` asks (the same text,
  protocol, package roots and STS sets) on at least `want`'s tasks; both as `settings_of` gives them."""
  made = {"text_field": "text", "sts": [], **made}  # tables from before these keys read "text", no STS
  but_tasks = lambda s: {k: v for k, v in s.items() if k != "tasks"}
  return but_tasks(made) == but_tasks(want) and set(want["tasks"]) <= set(made["tasks"])
