"""The fine-tuning protocol: the encoder, the evaluation's pooling and a linear head trained on a task for
each learning rate, dev scored after each epoch, test read once per seed with the best dev (lr, epoch)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilm_jax import losses
from minilm_jax.evaluation import stats
from minilm_jax.evaluation.protocol import Task, split_dev
from minilm_jax.families import encoder_for
from minilm_jax.model import BertConfig
from minilm_jax.optimizer import decay_mask, warmup_linear_decay


class Classifier(nn.Module):
  """Encoder, the evaluation's sentence pooling (without normalisation), dropout, linear head."""
  config: BertConfig
  num_labels: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, ids, mask, types, deterministic):
    h = encoder_for(self.config, name="encoder")(ids, mask, types, deterministic=deterministic).last_hidden_state
    pooled = losses.sentence_embedding(h, mask, self.pooling)
    pooled = nn.Dropout(0.1)(pooled, deterministic=deterministic)
    return nn.Dense(self.num_labels, name="head")(pooled)


def _encode(tok, a, b, max_len):
  enc = tok(a, b, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
  types = enc.get("token_type_ids", np.zeros_like(enc["input_ids"]))
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32), types.astype(np.int32)


@functools.lru_cache(maxsize=8)
def _predict_fn(model: Classifier):
  return jax.jit(lambda v, x: model.apply({"params": v}, *x, True).argmax(-1))


@functools.lru_cache(maxsize=8)
def _train_step(model: Classifier, total: int):
  """(tx, step), cached so models of one shape share the compile: AdamW on a unit-peak warmup/linear-decay
  schedule over `total` steps, the update scaled by the lr argument (AdamW's decoupled decay scales with lr
  too, so this is AdamW at that lr)."""
  tx = optax.adamw(warmup_linear_decay(1.0, total // 10, total), weight_decay=0.01,
                   mask=decay_mask)

  @jax.jit
  def step(v, opt, x, y, k, lr):
    def loss(v):
      logits = model.apply({"params": v}, *x, False, rngs={"dropout": k})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    u, opt = tx.update(jax.grad(loss)(v), opt, v)
    return optax.apply_updates(v, jax.tree.map(lambda a: lr * a, u)), opt
  return tx, step


def finetune(config: BertConfig, params, tok, task: Task, lrs: Sequence[float] = (1e-4, 3e-4),
             epochs: int = 3, seeds: int = 3, batch: int = 32, max_len: int = 64, pooling: str = "mean",
             log=lambda m: None) -> dict:
  """The fine-tuning protocol on `task` (see the package docstring). Per seed: a dev split (the task's,
  or 20% of its train part), for each lr `epochs` epochs on one schedule with dev scored after each, the
  params of the best dev (lr, epoch) kept, and test scored once with those. Returns the mean test score
  over seeds, its spread (sd over seeds) and SE, and every seed's dev grid, choice and test score."""
  n_labels = int(max(task.train[2].max(), task.test[2].max())) + 1
  max_len = min(max_len, config.max_position_embeddings)
  model = Classifier(config, n_labels, pooling)
  xte = _encode(tok, *task.test[:2], max_len)
  predict = _predict_fn(model)
  def run(v, x, n, chunk=128):  # fixed-size chunks (the last padded): one compile
    pad = lambda a: np.concatenate([a, np.zeros((-len(a) % chunk, *a.shape[1:]), a.dtype)])
    x = tuple(pad(a) for a in x)
    return np.concatenate([np.asarray(predict(v, tuple(a[i:i + chunk] for a in x)))
                           for i in range(0, len(x[0]), chunk)])[:n]
  fns = {}
  per_seed = []
  for seed in range(seeds):
    t = split_dev(task, seed)
    xtr, xdev = _encode(tok, *t.train[:2], max_len), _encode(tok, *t.dev[:2], max_len)
    ytr, ydev = t.train[2], t.dev[2]
    per_epoch = max(1, -(-len(ytr) // batch))
    total = epochs * per_epoch
    if total not in fns:  # one compile per schedule length; lr is an argument
      fns[total] = _train_step(model, total)
    tx, step = fns[total]
    head = model.init(jax.random.key(seed), *[x[:1] for x in xtr], True)["params"]
    grid, best = [], None
    for lr in lrs:
      v = {**head, "encoder": jax.tree.map(jnp.asarray, params)}
      opt = tx.init(v)
      rng = np.random.default_rng([seed, len(grid)])
      for ep in range(1, epochs + 1):
        perm = rng.permutation(len(ytr))
        perm = np.concatenate([perm, rng.choice(len(ytr), per_epoch * batch - len(ytr))])  # full batches
        for s in range(per_epoch):
          idx = perm[s * batch:(s + 1) * batch]
          k = jax.random.fold_in(jax.random.key(seed), (ep - 1) * per_epoch + s)
          v, opt = step(v, opt, tuple(x[idx] for x in xtr), ytr[idx], k, lr)
        dev = stats.score(task.metric, ydev, run(v, xdev, len(ydev)))
        grid.append({"lr": lr, "epoch": ep, "dev": dev})
        if best is None or dev > best[0]:  # strictly better: the first of equals is kept
          best = (dev, lr, ep, jax.device_get(v))
    dev, lr, ep, v = best
    pred = run(v, xte, len(task.test[2]))  # the one test read
    test = stats.score(task.metric, task.test[2], pred)
    per_seed.append({"seed": seed, "lr": lr, "epoch": ep, "dev": dev, "test": test, "dev_grid": grid,
                     "test_pred": pred.tolist()})
    log(f"  {task.name} seed {seed}: lr {lr:g}, epoch {ep}: dev {dev:.3f}, test {test:.3f}")
  tests = np.array([s["test"] for s in per_seed])
  spread = float(tests.std(ddof=1)) if seeds > 1 else 0.0
  return {"value": float(tests.mean()), "spread": spread, "se": spread / math.sqrt(seeds),
          "n": len(task.test[2]), "n_train": len(task.train[2]), "metric": task.metric,
          "test_labels": task.test[2].tolist(), "seeds": per_seed}
