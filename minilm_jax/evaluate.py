"""Evaluation of students: an offline next-sentence probe, held-out relation loss, and fine-tuning on
sentence(-pair) classification, with undistilled baselines of the same architecture under the same budget.

  minilm-eval --workdir DIR [--task nsp] [--task glue:sst2] [--task FILE.csv:text_a,text_b,label]
              [--lr 5e-5 --lr 1e-4] [--epochs 2] [--no-baselines] [--curve]

Writes DIR/eval/results.json, results.md (a Markdown table) and results.png (a bar chart); with --curve
also curve.json and curve.png (the student of every kept checkpoint against steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilm_jax import data, hf, train
from minilm_jax.model import BertConfig, BertEncoder

# GLUE tasks: (hub config, text columns, metric). Loaded through `datasets` when the hub is reachable.
GLUE = {"sst2": (("sentence",), "accuracy"), "mnli": (("premise", "hypothesis"), "accuracy"),
        "qnli": (("question", "sentence"), "accuracy"), "qqp": (("question1", "question2"), "f1"),
        "rte": (("sentence1", "sentence2"), "accuracy"), "mrpc": (("sentence1", "sentence2"), "f1"),
        "cola": (("sentence",), "matthews")}


@dataclasses.dataclass
class Task:
  name: str
  train: Tuple[List[str], Optional[List[str]], np.ndarray]   # text_a, text_b (or None), labels
  test: Tuple[List[str], Optional[List[str]], np.ndarray]
  metric: str = "accuracy"


# --- Tasks ----------------------------------------------------------------------------------------------

def _sentences(doc: str) -> List[str]:
  return [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")) if len(s.split()) >= 4]


def nsp_pairs(docs: Sequence[str], seed: int) -> Tuple[List[str], List[str], np.ndarray]:
  """Next-sentence prediction from raw text: for each sentence with a successor, (s_i, s_i+1) is 1 and
  (s_i, a random sentence of another document) is 0, so the classes are exactly balanced."""
  rng = np.random.default_rng(seed)
  sents = [_sentences(d) for d in docs]
  owners = [(i, s) for i, ss in enumerate(sents) for s in ss]
  a, b, y = [], [], []
  for i, ss in enumerate(sents):
    for j in range(len(ss) - 1):
      while True:
        k, other = owners[rng.integers(len(owners))]
        if k != i:
          break
      a += [ss[j], ss[j]]
      b += [ss[j + 1], other]
      y += [1, 0]
  order = rng.permutation(len(y))
  return [a[i] for i in order], [b[i] for i in order], np.array(y, np.int32)[order]


def nsp_task(seed: int = 0, limit: int = 2000) -> Task:
  """The offline probe: pairs from the held-out half of the demo corpus's held-out split for training,
  from the other half for testing, so the probe is scored on text it was not tuned on."""
  docs = data.load_texts("stdlib", split="heldout")
  half = len(docs) // 2
  tr, te = nsp_pairs(docs[:half], seed), nsp_pairs(docs[half:], seed + 1)
  cut = lambda t: (t[0][:limit], t[1][:limit], t[2][:limit])
  return Task("nsp", cut(tr), cut(te))


def _columns(rows: List[dict], cols: Sequence[str], where: str):
  for c in cols:
    if rows and c not in rows[0]:
      raise ValueError(f"{where}: no column {c!r} (columns: {sorted(rows[0])})")
  return [[str(r[c]) for r in rows] for c in cols]


def file_task(spec: str, seed: int = 0) -> Task:
  """FILE.csv|.jsonl:text_a[,text_b],label. Without a separate test file, 20% is held out."""
  import csv
  path, _, cols = spec.rpartition(":")
  names = cols.split(",")
  if len(names) not in (2, 3):
    raise ValueError(f"task {spec!r}: use FILE:text_col,label_col or FILE:text_a,text_b,label_col")
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  else:
    with open(path) as f:
      rows = [json.loads(l) for l in f if l.strip()]
  texts = _columns(rows, names[:-1], path)
  labels_raw = _columns(rows, names[-1:], path)[0]
  vocab = {l: i for i, l in enumerate(sorted(set(labels_raw)))}
  y = np.array([vocab[l] for l in labels_raw], np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  split = int(0.8 * len(y))
  pick = lambda idx: (list(np.array(texts[0])[idx]),
                      list(np.array(texts[1])[idx]) if len(texts) == 2 else None, y[idx])
  return Task(os.path.basename(path), pick(order[:split]), pick(order[split:]))


def glue_task(name: str, limit: int = 20000) -> Task:
  import datasets
  cols, metric = GLUE[name]
  ds = datasets.load_dataset("glue", name)
  val = "validation_matched" if name == "mnli" else "validation"
  def part(split):
    d = ds[split].select(range(min(limit, len(ds[split]))))
    return (list(d[cols[0]]), list(d[cols[1]]) if len(cols) == 2 else None,
            np.array(d["label"], np.int32))
  return Task(f"glue:{name}", part("train"), part(val), metric)


def load_task(spec: str, seed: int = 0) -> Task:
  if spec == "nsp":
    return nsp_task(seed)
  if spec.startswith("glue:"):
    if spec[5:] not in GLUE:
      raise ValueError(f"task {spec}: GLUE tasks are {', '.join(sorted(GLUE))}")
    return glue_task(spec[5:])
  return file_task(spec, seed)


# --- Fine-tuning ----------------------------------------------------------------------------------------

class Classifier(nn.Module):
  """Encoder, mean pooling over real tokens, dropout, linear head."""
  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, ids, mask, types, deterministic):
    h = BertEncoder(self.config, name="encoder")(ids, mask, types, deterministic=deterministic).last_hidden_state
    m = mask[..., None].astype(h.dtype)
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1)
    pooled = nn.Dropout(0.1)(pooled, deterministic=deterministic)
    return nn.Dense(self.num_labels, name="head")(pooled)


def _encode(tok, a, b, max_len):
  enc = tok(a, b, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
  types = enc.get("token_type_ids", np.zeros_like(enc["input_ids"]))
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32), types.astype(np.int32)


def score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
  if metric == "accuracy":
    return float((y == pred).mean())
  if metric == "f1":
    tp, fp, fn = ((pred == 1) & (y == 1)).sum(), ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
    return float(2 * tp / max(2 * tp + fp + fn, 1))
  tp, tn = ((pred == 1) & (y == 1)).sum(), ((pred == 0) & (y == 0)).sum()
  fp, fn = ((pred == 1) & (y == 0)).sum(), ((pred == 0) & (y == 1)).sum()
  den = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  return float((tp * tn - fp * fn) / den) if den else 0.0


def finetune(config: BertConfig, params, tok, task: Task, lr: float, epochs: int, batch: int = 32,
             max_len: int = 64, seed: int = 0) -> float:
  """Fine-tune encoder + head on task.train, return the task metric on task.test."""
  n_labels = int(max(task.train[2].max(), task.test[2].max())) + 1
  model = Classifier(config, n_labels)
  xtr, xte = _encode(tok, *task.train[:2], max_len), _encode(tok, *task.test[:2], max_len)
  ytr, yte = task.train[2], task.test[2]
  v = model.init(jax.random.key(seed), *[x[:1] for x in xtr], True)["params"]
  v = {**v, "encoder": jax.tree.map(jnp.asarray, params)}
  steps = max(1, epochs * len(ytr) // batch)
  tx = optax.adamw(train.warmup_linear_decay(lr, steps // 10, steps), weight_decay=0.01,
                   mask=train.decay_mask)
  opt = tx.init(v)

  @jax.jit
  def step(v, opt, x, y, k):
    def loss(v):
      logits = model.apply({"params": v}, *x, False, rngs={"dropout": k})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(v)
    u, opt = tx.update(g, opt, v)
    return optax.apply_updates(v, u), opt

  predict = jax.jit(lambda v, x: model.apply({"params": v}, *x, True).argmax(-1))
  rng = np.random.default_rng(seed)
  for s in range(steps):
    idx = rng.choice(len(ytr), batch, replace=len(ytr) < batch)
    v, opt = step(v, opt, tuple(x[idx] for x in xtr), ytr[idx], jax.random.key(s))
  preds = np.concatenate([np.asarray(predict(v, tuple(x[i:i + 256] for x in xte)))
                          for i in range(0, len(yte), 256)])
  return score(task.metric, yte, preds)


# --- Held-out relation loss -------------------------------------------------------------------------------

def heldout_rows(cfg, tok) -> Dict[str, np.ndarray]:
  """The held-out split of the demo corpus, packed at the run's max_len (text the run never saw when it
  trained on the demo corpus's train split)."""
  return data.tokenize_and_pack(data.load_texts("stdlib", split="heldout"), tok, cfg.data.max_len)


def heldout_relation_loss(cfg, teacher: Tuple[BertConfig, dict], student: Tuple[BertConfig, dict],
                          rows: Dict[str, np.ndarray], batches: int = 8, batch: int = 16) -> float:
  """The run's distillation loss of `student` against `teacher` on `rows` (see heldout_rows)."""
  tcfg, tparams = teacher
  scfg, sparams = student
  tl = train.teacher_layer_index(cfg.loss.teacher_layer, tcfg.num_hidden_layers)
  loss = jax.jit(train.distill_loss_fn(cfg, BertEncoder(tcfg), BertEncoder(scfg), tl))
  n = min(batches, max(1, len(rows["input_ids"]) // batch))
  vals = [float(loss(sparams, tparams, {k: v[i * batch:(i + 1) * batch] for k, v in rows.items()}))
          for i in range(n)]
  return float(np.mean(vals))


# --- A whole run ----------------------------------------------------------------------------------------

def encode_speed(config: BertConfig, params, batch: int = 32, seq: int = 128, reps: int = 3) -> float:
  """Encoding tokens/s of a jitted forward pass on this machine."""
  f = jax.jit(lambda p, ids: BertEncoder(config).apply({"params": p}, ids).last_hidden_state)
  ids = jnp.ones((batch, seq), jnp.int32)
  f(params, ids).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(params, ids).block_until_ready()
  return batch * seq * reps / (time.perf_counter() - t)


def models_of_run(workdir: str, baselines: bool = True):
  """{name: (config, params)} for the teacher, the assistant (if a chain), the student and the
  undistilled baselines of the student's architecture, and the run's config."""
  import ml_collections
  from minilm_jax import checkpoint
  ckpts = os.path.join(workdir, "checkpoints")
  mngr = checkpoint.make_manager(ckpts, 1) if os.path.isdir(ckpts) else None
  step = mngr.latest_step() if mngr else None
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint; is this a minilm-distill workdir?")
  meta = checkpoint.read_meta(mngr, step)
  cfg = ml_collections.ConfigDict(meta["config"])
  teacher_dir = meta["teacher"]["path"]
  models = {}
  a_dir = os.path.join(workdir, "assistant")
  if os.path.isdir(os.path.join(a_dir, "checkpoints")):  # a chain: the teacher is the assistant's
    a_mngr = checkpoint.make_manager(os.path.join(a_dir, "checkpoints"), 1)
    a_meta = checkpoint.read_meta(a_mngr, a_mngr.latest_step())
    models["teacher"] = hf.load_pretrained(a_meta["teacher"]["path"])
    models["assistant"] = hf.load_pretrained(teacher_dir)
    cfg.loss.teacher_layer = a_meta["config"]["loss"]["teacher_layer"]
  else:
    models["teacher"] = hf.load_pretrained(teacher_dir)
  encoder, sparams = hf.load_student(workdir)
  models["student (distilled)"] = (encoder.config, sparams)
  if baselines:
    tcfg, tparams = models["teacher"]
    for init in ("random", "teacher_first", "teacher"):
      c = ml_collections.ConfigDict(cfg.to_dict())
      c.student.init = init
      name = {"random": "baseline: random init", "teacher_first": "baseline: first teacher layers",
              "teacher": "baseline: every k-th teacher layer"}[init]
      p = train.init_student(c, encoder.config, jax.tree.map(jnp.asarray, tparams),
                             tcfg.num_hidden_layers, jax.random.key(cfg.seed))
      models[name] = (encoder.config, jax.device_get(p))
  return cfg, models, teacher_dir


def _quality(cfg, teacher, model, tok, tasks: Dict[str, Task], rows, lrs, epochs) -> dict:
  """Held-out relation loss against `teacher` (None: skip) and each task's best score over the grid."""
  mcfg, params = model
  row = {}
  if teacher is not None and mcfg.hidden_size % cfg.loss.relation_heads == 0:
    row["heldout_relation_loss"] = heldout_relation_loss(cfg, teacher, model, rows)
  for t, task in tasks.items():
    row[t] = max(finetune(mcfg, params, tok, task, lr, ep, seed=cfg.seed) for lr in lrs for ep in epochs)
  return row


def evaluate_run(workdir: str, tasks: Sequence[str] = ("nsp",), lrs: Sequence[float] = (2e-4,),
                 epochs: Sequence[int] = (3,), baselines: bool = True, log=print) -> dict:
  """Every model of the run on every task (best over the lr × epochs grid, same budget for all), plus
  held-out relation loss, size and encoding speed. Writes DIR/eval/results.{json,md,png}."""
  from transformers import AutoTokenizer
  cfg, models, teacher_dir = models_of_run(workdir, baselines)
  tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "student"))
  loaded = {t: load_task(t, cfg.seed) for t in tasks}
  rows = heldout_rows(cfg, tok)
  results = {}
  for name, (mcfg, params) in models.items():
    row = {"layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size,
           "params_M": sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6,
           "encode_tokens_per_s": encode_speed(mcfg, params)}
    teacher = None if name == "teacher" else models["teacher"]
    row.update(_quality(cfg, teacher, (mcfg, params), tok, loaded, rows, lrs, epochs))
    log(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    results[name] = row
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  hf._write_json(os.path.join(out, "results.json"), {"workdir": workdir, "tasks": list(tasks),
                                                      "lrs": list(lrs), "epochs": list(epochs),
                                                      "results": results})
  cols = ["params_M", "encode_tokens_per_s", "heldout_relation_loss", *tasks]
  lines = ["| model | " + " | ".join(cols) + " |", "| --- " * (len(cols) + 1) + "|"]
  for name, row in results.items():
    cell = lambda c: "" if c not in row else (f"{row[c]:.0f}" if c == "encode_tokens_per_s"
                                               else f"{row[c]:.4g}")
    lines.append(f"| {name} | " + " | ".join(cell(c) for c in cols) + " |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _bar_chart(results, tasks, os.path.join(out, "results.png"))
  return results


def evaluate_curve(workdir: str, tasks: Sequence[str] = ("nsp",), lrs: Sequence[float] = (2e-4,),
                   epochs: Sequence[int] = (3,), log=print) -> dict:
  """Quality against compute: the student of every kept checkpoint on the tasks and the held-out relation
  loss, beside the flat lines of DIR/eval/results.json (run `evaluate_run` first, same grid). Writes
  DIR/eval/curve.{json,png}: {step: row} with the tokens seen at each step."""
  from transformers import AutoTokenizer
  from minilm_jax import checkpoint
  table = os.path.join(workdir, "eval", "results.json")
  if not os.path.isfile(table):
    raise FileNotFoundError(f"{table}: no results table; evaluate the run without --curve first")
  with open(table) as f:
    flat = json.load(f)
  if (flat["tasks"], flat["lrs"], flat["epochs"]) != (list(tasks), list(lrs), list(epochs)):
    raise ValueError(f"{table} was made with tasks {flat['tasks']}, lrs {flat['lrs']} and epochs "
                     f"{flat['epochs']}: evaluate the curve on the same grid, or evaluate the run again")
  cfg, models, _ = models_of_run(workdir, baselines=False)
  student_config = models["student (distilled)"][0]
  tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "student"))
  loaded = {t: load_task(t, cfg.seed) for t in tasks}
  rows = heldout_rows(cfg, tok)
  mngr = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), 1)
  curve = {}
  for step in mngr.all_steps():
    params = checkpoint.restore_params(mngr, step)
    row = {"tokens": step * cfg.batch_size * cfg.data.max_len}
    row.update(_quality(cfg, models["teacher"], (student_config, params), tok, loaded, rows, lrs, epochs))
    log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    curve[step] = row
  hf._write_json(os.path.join(workdir, "eval", "curve.json"),
                 {"workdir": workdir, "tasks": list(tasks), "curve": curve})
  _curve_plot(curve, flat["results"], tasks, os.path.join(workdir, "eval", "curve.png"))
  return curve


def _curve_plot(curve: dict, flat: dict, tasks: Sequence[str], png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = [*tasks, "heldout_relation_loss"]
  steps = sorted(curve)
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=110, squeeze=False)
  for ax, m in zip(axes[0], metrics):
    ax.plot(steps, [curve[s][m] for s in steps], "o-", color="black", label="student (distilled)")
    for i, (name, row) in enumerate((n, r) for n, r in flat.items() if n != "student (distilled)"):
      if m in row:
        ax.axhline(row[m], color=f"C{i}", ls="--", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(m)
    if m == "heldout_relation_loss":
      ax.set_yscale("log")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)


def _bar_chart(results: dict, tasks: Sequence[str], png: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results)
  fig, axes = plt.subplots(1, len(tasks), figsize=(4 + 2 * len(names), 4), dpi=110, squeeze=False)
  for ax, t in zip(axes[0], tasks):
    ax.barh(names, [results[n][t] for n in names], color="tab:blue")
    ax.set_xlabel(t)
    ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)
