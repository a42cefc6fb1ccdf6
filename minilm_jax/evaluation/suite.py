"""What every model of a table is scored on, prepared once (the held-out text's probes, the teacher's
embeddings, the relation-loss rows, the STS sets, the tasks), and one model's row of scores on it."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import corpus, data, hf
from minilm_jax.evaluation import probes
from minilm_jax.evaluation.finetune import finetune
from minilm_jax.evaluation.protocol import Pairs, Protocol, Task, sts_metric
from minilm_jax.evaluation.tasks import load_sts, load_task, package_task
from minilm_jax.families import encoder_for
from minilm_jax.model import BertConfig


@dataclasses.dataclass
class Suite:
  """What every model is scored on, prepared once."""
  cfg: object
  tok: object
  pooling: Tuple[str, bool]
  teacher: Tuple[BertConfig, dict]
  probe: probes.ProbeText
  rows: Dict[str, np.ndarray]
  package: Task
  tasks: Dict[str, Task]      # fine-tuning tasks (empty: no fine-tuning)
  protocol: Protocol
  teacher_e: Optional[np.ndarray] = None
  sts: Dict[str, Pairs] = dataclasses.field(default_factory=dict)   # by name
  sts_len: int = 0                     # max tokens of an STS text; longer ones are cut
  sts_truncated: Dict[str, int] = dataclasses.field(default_factory=dict)   # pairs cut, by name
  dev: Optional[probes.ProbeText] = None   # the best-subset chooser's dev split (no test sentence)
  dev_note: str = ""                       # why there is none


def sts_max_len(teacher_dir: str, tcfg: BertConfig) -> int:
  """The longest text an STS probe embeds whole: the teacher's sentence-transformers max_seq_length
  (how its users embed, 256 for all-MiniLM-L6-v2), else its position table's length."""
  try:
    with open(os.path.join(teacher_dir, "sentence_bert_config.json")) as f:
      limit = int(json.load(f).get("max_seq_length") or tcfg.max_len)
  except (OSError, ValueError):
    limit = tcfg.max_len
  return min(limit, tcfg.max_len)


def load_sts_sets(specs: Sequence[str]) -> Dict[str, Pairs]:
  """The STS sets of `specs` by name; two files of one name are named by their specs instead."""
  sets = [load_sts(spec) for spec in specs]
  names = [x.name for x in sets]
  if len(set(names)) < len(names):
    names = [spec.rpartition(":")[0] if x.name != spec else spec for x, spec in zip(sets, specs)]
  return {n: dataclasses.replace(x, name=n) for n, x in zip(names, sets)}


def make_suite(cfg, tok, teacher, teacher_dir, protocol: Protocol, text=None, tasks=("nsp", "package"),
               package_roots: Sequence[str] = (), text_field: str = "text",
               sts_sets: Optional[Dict[str, Pairs]] = None, log=lambda m: None) -> Suite:
  """The suite for a run's config `cfg` and tokenizer, its teacher (config, params) and folder: the
  probes and relation-loss rows from the held-out text (`text`, default the stdlib corpus's held-out
  split), the STS sets `sts_sets` (load_sts_sets), the package task, the fine-tuning `tasks`, and the
  teacher's embeddings of the probes."""
  docs = corpus.heldout_docs(text, text_field)
  p = protocol
  sts_sets = sts_sets or {}
  # What the text can refuse first: parsing the package task's site-packages takes minutes.
  probe = probes.probe_text(docs, p.queries, p.pairs, p.seed)
  loaded = {t: load_task(t, p.seed, docs, p, package_roots) for t in tasks if t != "package"}
  pkg = package_task(package_roots, p.package_classes, p.package_per_class, p.seed)
  loaded = {t: pkg if t == "package" else loaded[t] for t in tasks}
  s = Suite(cfg, tok, hf.sentence_pooling(teacher_dir) or ("mean", False), teacher, probe,
            data.tokenize_and_pack(docs[:2000], tok, cfg.data.max_len), pkg, loaded, p, sts=sts_sets,
            sts_len=sts_max_len(teacher_dir, teacher[0]))
  try:  # the text's sentences that the test probe does not use
    s.dev = probes.probe_text(docs, p.dev_queries, 2 * p.dev_queries, p.seed + 1, set(probe.sentences),
                              "the best-subset chooser's dev split")
  except ValueError as e:
    s.dev_note = str(e)
  for name, x in sts_sets.items():
    s.sts_truncated[name] = probes.truncated_pairs(tok, x.a, x.b, s.sts_len)
    log(f"STS {name}: {len(x.a)} pairs, {s.sts_truncated[name]} with a text longer than {s.sts_len} "
        "tokens, cut to its first tokens")
  s.teacher_e = probes.embed(*teacher, tok, s.probe.sentences, s.pooling, p.sentence_len)
  return s


def sts_rows(s: Suite, model: Tuple[BertConfig, dict]) -> dict:
  """{sts_metric(name, statistic): result} of one model on every STS set of the suite; each result says
  how many of its pairs were cut to the STS length ("truncated", "max_len")."""
  row = {}
  for name, x in s.sts.items():
    texts = list(dict.fromkeys(x.a + x.b))
    e_ND = probes.embed(*model, s.tok, texts, s.pooling, s.sts_len)
    at = {t: i for i, t in enumerate(texts)}
    pick = lambda side: e_ND[[at[t] for t in side]]
    for stat, r in probes.sts(pick(x.a), pick(x.b), x.score_N, s.protocol.bootstrap, s.protocol.seed).items():
      row[sts_metric(name, stat)] = {**r, "truncated": s.sts_truncated[name], "max_len": s.sts_len}
  return row


def quality(s: Suite, model: Tuple[BertConfig, dict], is_teacher: bool = False, finetune_too=True,
            log=lambda m: None) -> dict:
  """Every metric of one model: {metric: {"value", "se" | "spread", ...}}."""
  mcfg, params = model
  p = s.protocol
  row = {}
  if not is_teacher and mcfg.hidden_size % s.cfg.loss.relation_heads == 0:
    row["heldout_relation_loss"] = probes.heldout_relation_loss(s.cfg, s.teacher, model, s.rows)
  e_ND = s.teacher_e if is_teacher else probes.embed(mcfg, params, s.tok, s.probe.sentences, s.pooling,
                                                     p.sentence_len)
  row["retrieval_mrr"] = probes.retrieval(e_ND, s.probe)
  row["agreement"] = {"value": 1.0, "se": 0.0, "n": len(s.probe.pairs_P2),
                      "items": probes.pair_cosines(e_ND, s.probe.pairs_P2).tolist()} if is_teacher else \
      probes.agreement(e_ND, s.teacher_e, s.probe, p.bootstrap, p.seed)
  row.update(sts_rows(s, model))
  pk = s.package
  parts = [probes.embed(mcfg, params, s.tok, t[0], s.pooling, p.sentence_len)
           for t in (pk.train, pk.dev, pk.test)]
  row["package_linear"] = probes.linear_probe(*[(e, t[2])
                                                for e, t in zip(parts, (pk.train, pk.dev, pk.test))])
  if finetune_too:
    for name, task in s.tasks.items():
      row[name] = finetune(mcfg, params, s.tok, task, p.lrs, p.epochs, p.seeds, p.batch, p.finetune_len,
                           s.pooling[0], log)
  return row


def encode_speed(config: BertConfig, params, batch: int = 32, seq: int = 128, reps: int = 3) -> float:
  """Encoding tokens/s of a jitted forward pass on this machine (noisy on shared CPUs; in the JSON)."""
  f = jax.jit(lambda p, ids: encoder_for(config).apply({"params": p}, ids).last_hidden_state)
  ids = jnp.ones((batch, seq), jnp.int32)
  f(params, ids).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(params, ids).block_until_ready()
  return batch * seq * reps / (time.perf_counter() - t)
