"""The best student made of teacher layers without training: the subset of n of the teacher's L layers
(kept in the teacher's order) that scores best on a dev split of the text, never on the test probe.
A user who drops layers by hand tries a few subsets and keeps the best; that is the bar a distilled
student has to clear, so minilm-eval builds it as a baseline, and student.init "best" starts from it.

The score that chooses: dev retrieval MRR + dev agreement with the teacher (the two zero-shot probes a
student is read on, each in [0, 1]), on a dev split that shares no sentence with the test probe
(probes.probe_text's `exclude`). Every subset is scored where there are at most
Protocol.subsets_exhaustive of them (6 → 3 layers: 20; 6 → 4: 15); else a beam search from the fixed
baselines' subsets (the first n, every k-th from each offset) moves one layer at a time."""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

import jax

from minilm_jax import corpus, hf
from minilm_jax.evaluation import probes, stats
from minilm_jax.evaluation.protocol import DEFAULT_PROTOCOL, Protocol
from minilm_jax.model import BertConfig
from minilm_jax.student import copy_teacher_layers, every_kth

Subset = Tuple[int, ...]
SCORE = "dev retrieval MRR + dev agreement with the teacher"


def neighbours(s: Subset, teacher_layers: int) -> List[Subset]:
  """The subsets with one layer of `s` moved one place up or down, the order kept: the search's moves."""
  out = []
  for i, layer in enumerate(s):
    lo, hi = s[i - 1] if i else -1, s[i + 1] if i + 1 < len(s) else teacher_layers
    out += [s[:i] + (v,) + s[i + 1:] for v in (layer - 1, layer + 1) if lo < v < hi]
  return out


def search(score: Callable[[Subset], float], teacher_layers: int, student_layers: int,
           starts: Sequence[Sequence[int]], exhaustive: int = 100, beam: int = 4, budget: int = 100
           ) -> Tuple[Subset, Dict[Subset, float], str]:
  """The increasing `student_layers`-tuple of range(teacher_layers) with the highest score, with
  {subset: score} of every subset scored and how it was searched: "every subset" where there are at most
  `exhaustive`; else "beam search": the `beam` best of `starts`, then, round after round, every
  neighbour of the `beam` best scored so far, until a round brings none of them into the beam or
  `budget` subsets have been scored. Of equal scores the first scored wins."""
  scored: Dict[Subset, float] = {}
  if math.comb(teacher_layers, student_layers) <= exhaustive:
    for s in itertools.combinations(range(teacher_layers), student_layers):
      scored[s] = score(s)
    return max(scored, key=scored.get), scored, "every subset"
  for s in dict.fromkeys(tuple(x) for x in starts):
    if len(scored) < budget:
      scored[s] = score(s)
  top = lambda: sorted(scored, key=lambda s: -scored[s])[:beam]  # stable: ties keep their order
  front = top()
  while len(scored) < budget:
    new = list(dict.fromkeys(n for s in front for n in neighbours(s, teacher_layers) if n not in scored))
    for s in new[:budget - len(scored)]:
      scored[s] = score(s)
    if not new or top() == front:
      break
    front = top()
  return max(scored, key=scored.get), scored, "beam search"


def choose(teacher: Tuple[BertConfig, dict], scfg: BertConfig, tok, pooling, dev: probes.ProbeText,
           protocol: Protocol, seed: int, log=lambda m: None) -> Tuple[dict, dict]:
  """(record, params): the best subset of teacher layers for a student of config `scfg` (its depth and
  widths; the layers sliced to them as student.copy_teacher_layers does), scored on `dev` alone. The
  record: the layers, how they were searched, the score and the dev split's size, each subset's
  scores, and the seconds it took."""
  t0 = time.time()
  tcfg, tparams = teacher
  p = protocol
  embed = lambda config, params: probes.embed(config, params, tok, dev.sentences, pooling, p.sentence_len)
  t_P = probes.pair_cosines(embed(tcfg, tparams), dev.pairs_P2)
  make = lambda s: copy_teacher_layers(scfg, tparams, list(s), jax.random.key(seed))
  parts: Dict[Subset, dict] = {}

  def score(s: Subset) -> float:
    e_ND = embed(scfg, make(s))
    r = probes.retrieval(e_ND, dev)["value"]
    a = stats.spearman(probes.pair_cosines(e_ND, dev.pairs_P2), t_P)
    parts[s] = {"retrieval": r, "agreement": a, "score": r + a}
    return r + a

  L, n = tcfg.num_hidden_layers, scfg.num_hidden_layers
  starts = [list(range(n)), *every_kth(L, n).values()]
  best, scored, how = search(score, L, n, starts, p.subsets_exhaustive, p.subset_beam, p.subset_budget)
  record = {"layers": list(best), "how": how, "subsets": math.comb(L, n), "score": SCORE,
            "dev": {"queries": len(dev.query_N), "pairs": len(dev.pairs_P2), "sentences": len(dev.sentences)},
            "scored": [{"layers": list(s), **parts[s]} for s in scored], "seconds": time.time() - t0}
  log(f"best layer subset: teacher layers {', '.join(map(str, best))} ({how}, {len(scored)} of "
      f"{record['subsets']} subsets scored on {len(dev.query_N)} dev queries and {len(dev.pairs_P2)} dev "
      f"pairs: {SCORE} {parts[best]['score']:.3f}; {record['seconds']:.0f}s)")
  return record, jax.device_get(make(best))


def choose_for_training(cfg, teacher_dir: str, teacher: Tuple[BertConfig, dict], scfg: BertConfig,
                        protocol: Protocol = DEFAULT_PROTOCOL, documents: int = 2000,
                        log=lambda m: None) -> dict:
  """student.init "best": choose's record for a run's config, on a dev sample of its training corpus
  (the first `documents` documents of data.source, which training reads too; never a held-out split), so
  the choice is made before training starts and sees no evaluation text."""
  from transformers import AutoTokenizer
  d = cfg.data
  docs = list(itertools.islice((x for piece in corpus.pieces(d.source, d.text_field, d.hub_config, d.split)
                                for x in corpus.read_piece(piece)), documents))
  try:
    dev = probes.probe_text(docs, protocol.dev_queries, 2 * protocol.dev_queries, protocol.seed)
  except ValueError:
    raise ValueError(f"student.init 'best' is chosen on the first {documents} documents of data.source "
                     f"{d.source!r}, which have fewer than 20 pairs of consecutive sentences: give the "
                     "layers instead (student.init=layers:I,J,...)") from None
  tok = AutoTokenizer.from_pretrained(teacher_dir)
  pooling = hf.sentence_pooling(teacher_dir) or ("mean", False)
  record, _ = choose(teacher, scfg, tok, pooling, dev, protocol, cfg.seed, log)
  return record


def best_of(models: Dict[str, Tuple[BertConfig, dict]], layers: Dict[str, list], best: Sequence[int]) -> str:
  """The name of a model in `models` made of the teacher layers `best` (`layers`: {name: its layers}),
  or "" when none is: the best subset is then a model of its own."""
  return next((n for n, l in layers.items() if l is not None and list(l) == list(best) and n in models), "")

