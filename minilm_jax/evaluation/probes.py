"""What a model is scored on without fine-tuning: its sentence embeddings, retrieval of each sentence's
successor, agreement with the teacher's cosines, the correlation of its cosines with human similarity
scores (STS), a linear probe on frozen embeddings, and the MiniLM relation loss against the teacher on
held-out text."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Collection, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilm_jax import corpus, losses, objective
from minilm_jax.evaluation import stats
from minilm_jax.families import encoder_for
from minilm_jax.model import BertConfig
from minilm_jax.student import teacher_layer_index


# --- Sentence embeddings ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _embed_fn(config: BertConfig, pooling: Tuple[str, bool]):
  def f(params, ids_BT, mask_BT):
    h_BTD = encoder_for(config).apply({"params": params}, ids_BT, mask_BT).last_hidden_state
    return losses.sentence_embedding(h_BTD, mask_BT, *pooling)
  return jax.jit(f)


def embed(config: BertConfig, params, tok, texts: Sequence[str], pooling: Tuple[str, bool],
          max_len: int = 128, batch: int = 64) -> np.ndarray:
  """e_ND [len(texts), hidden]: the model's sentence embeddings. Texts are sorted by length and padded to
  a power of two (≥ 16), so short sentences do not pay for 128 tokens and few shapes get compiled."""
  max_len = min(max_len, config.max_len)  # beyond its positions a model reads garbage
  enc = tok(list(texts), truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
  order = np.argsort([len(t) for t in enc], kind="stable")
  f = _embed_fn(config, tuple(pooling))
  out_ND = np.zeros((len(texts), config.hidden_size), np.float32)
  for i in range(0, len(order), batch):
    idx = order[i:i + batch]
    width = max(16, 1 << (max(len(enc[j]) for j in idx) - 1).bit_length())
    ids_BT = np.full((batch, width), tok.pad_token_id, np.int32)
    mask_BT = np.zeros((batch, width), np.int32)
    for r, j in enumerate(idx):
      ids_BT[r, :len(enc[j])], mask_BT[r, :len(enc[j])] = enc[j], 1
    out_ND[idx] = np.asarray(f(params, ids_BT, mask_BT))[:len(idx)]
  return out_ND


# --- Zero-shot probes ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeText:
  """Sentences to embed once per model, and the probes as indices into them."""
  sentences: List[str]
  query_N: np.ndarray      # sentence index of each retrieval query
  cand_M: np.ndarray       # sentence index of each candidate (the queries' successors, unique)
  target_N: np.ndarray     # the candidate that follows query n
  pairs_P2: np.ndarray     # agreement pairs (sentence indices)


def probe_text(docs: Sequence[str], queries: int, pairs: int, seed: int,
               exclude: Collection[str] = frozenset(), what: str = "the probes") -> ProbeText:
  """Up to `queries` pairs of consecutive sentences of `docs` (seeded) as retrieval queries and their
  successors, and `pairs` agreement pairs (half of them adjacent, the rest random, none a sentence with
  itself). A pair with a sentence in `exclude` (another probe's: a dev split's, kept apart from the
  test's) is never taken. Fewer than 20 consecutive pairs to take from is a ValueError."""
  rng = np.random.default_rng(seed)
  succ = [(a, b) for d in docs for a, b in zip(corpus.sentences(d), corpus.sentences(d)[1:])
          if a not in exclude and b not in exclude]
  if len(succ) < 20:
    other = " outside the test probe's" if exclude else ""
    raise ValueError(f"the held-out text has {len(succ)} pairs of consecutive sentences{other}; {what} "
                     "need at least 20")
  chosen = [succ[i] for i in rng.choice(len(succ), min(queries, len(succ)), replace=False)]
  index = {s: i for i, s in enumerate(dict.fromkeys(s for p in chosen for s in p))}
  query_N = np.array([index[a] for a, _ in chosen])
  cand_M = np.array(sorted({index[b] for _, b in chosen}))
  target_N = np.searchsorted(cand_M, [index[b] for _, b in chosen])
  adjacent = [(index[a], index[b]) for a, b in chosen[:pairs // 2]]
  n = len(index)
  rand = rng.integers(0, n, (pairs - len(adjacent), 2))
  rand = rand[rand[:, 0] != rand[:, 1]]
  return ProbeText(list(index), query_N, cand_M, target_N, np.array(adjacent + rand.tolist()))


def retrieval(e_ND: np.ndarray, p: ProbeText) -> dict:
  """MRR of each query's successor among all candidates, SE over queries."""
  exclude_NM = p.cand_M[None, :] == p.query_N[:, None]  # a query that is also another's successor
  return stats.mean_se(stats.reciprocal_ranks(e_ND[p.query_N], e_ND[p.cand_M], p.target_N, exclude_NM))


def pair_cosines(e_ND: np.ndarray, pairs_P2: np.ndarray) -> np.ndarray:
  """c_P: the cosine of the two embeddings of each pair."""
  u_ND = e_ND / np.maximum(np.linalg.norm(e_ND, axis=-1, keepdims=True), 1e-12)
  return (u_ND[pairs_P2[:, 0]] * u_ND[pairs_P2[:, 1]]).sum(-1)


def agreement(e_ND: np.ndarray, t_ND: np.ndarray, p: ProbeText, reps: int, seed: int) -> dict:
  """Spearman correlation of the model's and the teacher's cosines over the pairs; bootstrap SE."""
  m_P, t_P = pair_cosines(e_ND, p.pairs_P2), pair_cosines(t_ND, p.pairs_P2)
  return {"value": stats.spearman(m_P, t_P), "se": stats.bootstrap_se(stats.spearman, m_P, t_P, reps, seed),
          "n": len(m_P), "items": m_P.tolist()}  # the model's cosines: the teacher's are the teacher row's


# --- STS: cosines against human scores ---------------------------------------------------------------------

def truncated_pairs(tok, a: Sequence[str], b: Sequence[str], max_len: int) -> int:
  """How many pairs have a text longer than `max_len` tokens ([CLS] and [SEP] included): embed cuts
  those texts to their first max_len tokens."""
  n = lambda texts: np.array([len(t) for t in tok(list(texts), add_special_tokens=True,
                                                   verbose=False)["input_ids"]])
  return int(((n(a) > max_len) | (n(b) > max_len)).sum())


def sts(e_a_ND: np.ndarray, e_b_ND: np.ndarray, score_N: np.ndarray, reps: int, seed: int) -> Dict[str, dict]:
  """{"spearman", "pearson"}: the correlation of each pair's cosine with its human score, each with its
  SE by bootstrap over the pairs; the cosines as "items" and the scores as "gold", for paired
  differences (stats.paired_difference)."""
  c_N = pair_cosines(np.concatenate([e_a_ND, e_b_ND]),
                     np.stack([np.arange(len(e_a_ND)), len(e_a_ND) + np.arange(len(e_b_ND))], 1))
  s_N = np.asarray(score_N, np.float64)
  return {name: {"value": f(c_N, s_N), "se": stats.bootstrap_se(f, c_N, s_N, reps, seed), "n": len(c_N),
                 "statistic": name, "items": c_N.tolist(), "gold": s_N.tolist()}
          for name, f in stats.CORRELATIONS.items()}


# --- Linear probe ----------------------------------------------------------------------------------------

def linear_probe(train_e: Tuple[np.ndarray, np.ndarray], dev_e: Tuple[np.ndarray, np.ndarray],
                 test_e: Tuple[np.ndarray, np.ndarray], l2s: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
                 steps: int = 300, lr: float = 0.05) -> dict:
  """Multinomial logistic regression on frozen embeddings ((e_ND, y_N) per split), fitted on train by
  full-batch Adam for each L2 strength at once; the strength with the best dev accuracy is scored on
  test (SE sqrt(p(1-p)/n)). Features are standardised with train statistics: models differ in scale."""
  (x_tr, y_tr), (x_dev, y_dev), (x_te, y_te) = train_e, dev_e, test_e
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
  z = lambda x: jnp.asarray((x - mu) / sd, jnp.float32)
  c = int(max(y_tr.max(), y_dev.max(), y_te.max())) + 1
  tx = optax.adam(lr)

  def fit(l2):
    def loss(w):
      logits = z(x_tr) @ w["W"] + w["b"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y_tr)).mean()
      return ce + l2 * (w["W"] ** 2).sum()
    def body(_, carry):
      w, opt = carry
      u, opt = tx.update(jax.grad(loss)(w), opt)
      return optax.apply_updates(w, u), opt
    w = {"W": jnp.zeros((x_tr.shape[1], c)), "b": jnp.zeros((c,))}
    return jax.lax.fori_loop(0, steps, body, (w, tx.init(w)))[0]

  w = jax.jit(jax.vmap(fit))(jnp.asarray(l2s, jnp.float32))
  right = lambda x, y: np.asarray((z(x) @ w["W"] + w["b"][:, None]).argmax(-1) == y)  # [L2s, N]
  dev_acc = right(x_dev, y_dev).mean(-1)
  best = int(np.argmax(dev_acc))  # the first of equals: the weakest penalty
  right_N = right(x_te, y_te)[best].astype(np.float64)
  p = float(right_N.mean())
  return {"value": p, "se": math.sqrt(p * (1 - p) / len(y_te)), "n": len(y_te), "l2": float(l2s[best]),
          "dev": [float(a) for a in dev_acc], "items": right_N.tolist()}


# --- Held-out relation loss -------------------------------------------------------------------------------

def heldout_relation_loss(cfg, teacher: Tuple[BertConfig, dict], student: Tuple[BertConfig, dict],
                          rows: Dict[str, np.ndarray], batches: int = 8, batch: int = 16) -> dict:
  """The MiniLM relation loss (relations only, whatever terms the run trained with) of `student` against
  `teacher` on `rows`: mean and SE over `batches` batches."""
  tcfg, tparams = teacher
  scfg, sparams = student
  tl = teacher_layer_index(cfg.loss.teacher_layer, tcfg.num_hidden_layers)
  loss = jax.jit(objective.distill_loss_fn(cfg, encoder_for(tcfg), encoder_for(scfg), tl,
                                           terms=("relations",)))
  n = min(batches, max(1, len(rows["input_ids"]) // batch))
  vals = [float(loss(sparams, tparams, {k: v[i * batch:(i + 1) * batch] for k, v in rows.items()}))
          for i in range(n)]
  return {"value": float(np.mean(vals)), "se": float(np.std(vals, ddof=1) / np.sqrt(n)) if n > 1 else
          float("nan"), "n": n, "items": vals}
