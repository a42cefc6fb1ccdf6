"""AdamW with BERT's decay mask (no decay on biases and LayerNorm), the frozen parameters set to zero
updates, and the warmup-then-linear-decay schedule. The evaluation's fine-tuning uses the same pieces."""

from __future__ import annotations

from typing import Any

import jax
import optax

from minilm_jax import objective
from minilm_jax.student import frozen_labels, path_names


def decay_mask(params: Any) -> Any:
  """Weight decay on kernels and embeddings only: not on biases or LayerNorm (as BERT trains)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_names(p)[-1] in ("kernel", "embedding"),
                                          params)


def warmup_linear_decay(lr: float, warmup_steps: int, steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then linear decay to 0 at `steps`."""
  warm = min(warmup_steps, steps)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                               optax.linear_schedule(lr, 0.0, max(steps - warm, 1))], [warm])


def lr_schedule(cfg) -> optax.Schedule:
  return warmup_linear_decay(cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps)


def make_optimizer(cfg, params: Any, scfg) -> optax.GradientTransformation:
  """AdamW over the student's `params` (a tree or its shapes), scfg its config."""
  o = cfg.optim
  adamw = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
      optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask))
  return optax.multi_transform(
      {"train": adamw, "freeze": optax.set_to_zero()},
      frozen_labels(params, scfg, objective.reaches_output(objective.terms_of(cfg))))
