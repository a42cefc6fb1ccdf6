"""What every model of a table is scored on, prepared once (the held-out text's probes, the teacher's
embeddings, the relation-loss rows, the tasks), and one model's row of scores on it."""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import corpus, data, hf
from minilm_jax.evaluation import probes
from minilm_jax.evaluation.finetune import finetune
from minilm_jax.evaluation.protocol import Protocol, Task
from minilm_jax.evaluation.tasks import load_task, package_task
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


def make_suite(cfg, tok, teacher, teacher_dir, protocol: Protocol, text=None, tasks=("nsp", "package"),
               package_roots: Sequence[str] = (), text_field: str = "text") -> Suite:
  """The suite for a run's config `cfg` and tokenizer, its teacher (config, params) and folder: the
  probes and relation-loss rows from the held-out text (`text`, default the stdlib corpus's held-out
  split), the package task, the fine-tuning `tasks`, and the teacher's embeddings of the probes."""
  docs = corpus.heldout_docs(text, text_field)
  p = protocol
  # What the text can refuse first: parsing the package task's site-packages takes minutes.
  probe = probes.probe_text(docs, p.queries, p.pairs, p.seed)
  loaded = {t: load_task(t, p.seed, docs, p, package_roots) for t in tasks if t != "package"}
  pkg = package_task(package_roots, p.package_classes, p.package_per_class, p.seed)
  loaded = {t: pkg if t == "package" else loaded[t] for t in tasks}
  s = Suite(cfg, tok, hf.sentence_pooling(teacher_dir) or ("mean", False), teacher, probe,
            data.tokenize_and_pack(docs[:2000], tok, cfg.data.max_len), pkg, loaded, p)
  s.teacher_e = probes.embed(*teacher, tok, s.probe.sentences, s.pooling, p.sentence_len)
  return s


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
