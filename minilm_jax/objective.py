"""What the student is trained to match: the MiniLM relations and, optionally, the teacher's output.

`loss.terms` names the terms, `loss.term_weights` weighs them (default: all 1):
- "relations" (the papers): the v1 or v2 relation KL between the Q/K/V of teacher layer ℓ and the
  student's last layer. It never reaches the student's last block above its Q/K/V.
- "hidden": cosine distance between the student's final token states and the teacher's at the output
  of layer ℓ (losses.hidden_loss).
- "embedding": squared distance between the student's and the teacher's sentence embeddings, with the
  teacher's sentence-transformers pooling and normalisation (losses.sentence_embedding/embedding_loss).

When the widths differ, the output terms first map the student's states to the teacher's width with a
learned linear projection (TinyBERT's fit_dense), kept in the trained params under `PROJECTION`, saved in
checkpoints and left out of the exported student (`student_params`). It starts as [I | 0]: a student
sliced from the teacher's first columns then starts exactly in the teacher's coordinates.

Each model runs only as far as the active terms need: with relations alone, the teacher stops at layer
ℓ's Q/K/V and the student at its last Q/K/V (its last block above them is frozen: it gets no gradient);
"hidden" runs the teacher to the output of layer ℓ, "embedding" to its end, and either runs the student
to its end, so nothing in it is frozen.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from minilm_jax import losses, relation_kernel, sharding
from minilm_jax.families import encoder_for

TERMS = ("relations", "hidden", "embedding")
OUTPUT_TERMS = ("hidden", "embedding")
PROJECTION = "distill_projection"


def terms_of(cfg) -> Tuple[str, ...]:
  """The active terms of `cfg.loss.terms` ("relations,hidden" or a sequence), in the order given."""
  raw = cfg.loss.terms
  names = [t.strip() for t in (raw.split(",") if isinstance(raw, str) else raw)]
  return tuple(t for t in names if t)


def term_weights(cfg) -> Dict[str, float]:
  """{term: weight}; `loss.term_weights` () means 1 for every term."""
  terms = terms_of(cfg)
  w = tuple(cfg.loss.term_weights) or (1.0,) * len(terms)
  return dict(zip(terms, (float(x) for x in w)))


def reaches_output(terms: Sequence[str]) -> bool:
  """Whether a term trains the student's output (then nothing in the student is frozen)."""
  return any(t in OUTPUT_TERMS for t in terms)


def check_terms(cfg) -> None:
  """One-line ValueErrors for bad `loss.terms` / `loss.term_weights`."""
  raw = cfg.loss.terms
  if not isinstance(raw, (str, tuple, list)):
    raise ValueError(f"loss.terms {raw!r}: give a comma-separated string such as 'relations,hidden'")
  terms = terms_of(cfg)
  if not terms:
    raise ValueError(f"loss.terms is empty: use some of {', '.join(TERMS)}")
  unknown = [t for t in terms if t not in TERMS]
  if unknown:
    raise ValueError(f"loss.terms: unknown term {unknown[0]!r}; use some of {', '.join(TERMS)}")
  if len(set(terms)) != len(terms):
    raise ValueError(f"loss.terms {','.join(terms)} names a term twice")
  w = tuple(cfg.loss.term_weights)
  if w and len(w) != len(terms):
    raise ValueError(f"loss.term_weights has {len(w)} weights for {len(terms)} terms "
                     f"({','.join(terms)})")
  if any(not isinstance(x, (int, float)) or not x >= 0 or x == float("inf") for x in w):
    raise ValueError(f"loss.term_weights {w}: weights must be finite and ≥ 0")
  if w and not sum(w) > 0:
    raise ValueError(f"loss.term_weights {w}: at least one weight must be positive")


def needs_projection(terms: Sequence[str], student_width: int, teacher_width: int) -> bool:
  return reaches_output(terms) and student_width != teacher_width


def init_projection(student_width: int, teacher_width: int, dtype=jnp.float32) -> Dict[str, jax.Array]:
  """{"kernel": [D_s, D_t] = [I | 0] (or [I; 0] when narrower), "bias": [D_t] zeros}."""
  return {"kernel": jnp.eye(student_width, teacher_width, dtype=dtype),
          "bias": jnp.zeros((teacher_width,), dtype)}


def student_params(params: Dict[str, Any]) -> Dict[str, Any]:
  """The student's own params: what the trainer trains, less the projection (what gets exported)."""
  return {k: v for k, v in params.items() if k != PROJECTION}


IMPLEMENTATIONS = ("auto", "xla", "pallas")


def relation_implementation(cfg, platform: str) -> str:
  """losses.py's implementation of the relation KL for `loss.implementation` on `platform` ("tpu",
  "gpu", "cpu"): "auto" is the Pallas kernels on a TPU (nothing of size T² in HBM) and XLA elsewhere."""
  impl = cfg.loss.get("implementation", "auto")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"loss.implementation {impl!r}: use one of {', '.join(IMPLEMENTATIONS)}")
  if impl == "pallas" and platform != "tpu":
    raise ValueError(f"loss.implementation 'pallas' is a TPU kernel, and these devices are {platform}: "
                     "use 'auto' or 'xla'")
  return "pallas" if impl == "pallas" or (impl == "auto" and platform == "tpu") else "xla"


def _kl_rows_per_device(mesh, *arrays, scale):
  """relation_kernel.kl_rows on each device's rows (XLA cannot partition a Pallas kernel); the teacher
  is frozen, so the kernels skip its gradients."""
  kl_rows = functools.partial(relation_kernel.kl_rows, scale=scale, teacher_grads=False)
  return sharding.per_device(mesh, kl_rows)(*arrays)


def relation_loss_fn(cfg, student_heads: int, implementation: str = "xla", mesh=None) -> Callable:
  """(teacher_qkv, student_qkv, mask) -> scalar, the configured v1 or v2 loss. implementation:
  losses.py's ("xla", "pallas"; see relation_implementation); mesh: where the batch is split (the
  Pallas kernels then run per device)."""
  l = cfg.loss
  if implementation == "pallas" and mesh is not None:
    implementation = functools.partial(_kl_rows_per_device, mesh)
  kw = dict(reduction=l.reduction, chunk_heads=l.chunk_heads or None, block_keys=l.get("block_keys") or None,
            implementation=implementation)
  if l.weights:
    kw["weights"] = tuple(l.weights)
  if l.version == "v1":
    return lambda t, s, m: losses.minilm_v1_loss(t, s, m, l.relation_heads,
                                                 student_num_heads=student_heads, **kw)
  if l.version == "v2":
    return lambda t, s, m: losses.minilm_v2_loss(t, s, m, l.relation_heads, **kw)
  raise ValueError(f"loss.version {l.version!r}: use 'v1' or 'v2'")


def _truncated(model, depth: int):
  """The same encoder with only its first `depth` layers (its params dict may hold more)."""
  if depth == model.config.num_hidden_layers:
    return model
  return encoder_for(model.config.truncated(depth), dtype=model.dtype, param_dtype=model.param_dtype,
                     attention_implementation=model.attention_implementation)


def objective_fn(cfg, teacher, student, teacher_layer: int,
                 pooling: Optional[Tuple[str, bool]] = None,
                 terms: Optional[Sequence[str]] = None, implementation: str = "xla",
                 mesh=None) -> Callable:
  """f(params, teacher_params, batch, rng=None) -> (total, {term: value}), all fp32 scalars.

  params: the student's params (plus `PROJECTION` when the widths differ); batch: input_ids and
  attention_mask [B, T]; rng: the student's dropout key (None: no dropout). teacher_layer: 0-based ℓ.
  pooling: (mode, normalize) of the teacher's sentence embedding, needed by "embedding".
  terms: overrides cfg's (the evaluation takes the relations alone).
  implementation: the relation KL's (relation_implementation); mesh: the step's (relation_loss_fn).
  """
  terms = tuple(terms) if terms is not None else terms_of(cfg)
  weights = term_weights(cfg) if terms == terms_of(cfg) else {t: 1.0 for t in terms}
  if "embedding" in terms and pooling is None:
    raise ValueError("loss term 'embedding' needs the teacher's sentence pooling")
  relation = relation_loss_fn(cfg, student.config.num_attention_heads, implementation, mesh) \
      if "relations" in terms else None
  out = reaches_output(terms)
  # How far the teacher runs: Q/K/V of ℓ (relations), the output of ℓ (hidden), its end (embedding).
  t_depth = teacher.config.num_hidden_layers if "embedding" in terms else teacher_layer + 1
  t_model = _truncated(teacher, t_depth)

  def f(params, teacher_params, batch, rng=None):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # Named scopes: a profile or the compiled HLO's metadata tells the three parts of the step apart.
    with jax.named_scope("teacher"):
      t = t_model.apply({"params": teacher_params}, ids, mask, capture_layer=teacher_layer,
                        stop_at_capture=not out)
      t = jax.lax.stop_gradient(t)
    with jax.named_scope("student"):
      s = student.apply({"params": student_params(params)}, ids, mask, capture_layer=-1,
                        stop_at_capture=not out, deterministic=rng is None,
                        rngs={} if rng is None else {"dropout": rng})
    parts = {}
    if relation is not None:
      with jax.named_scope("relation_loss"):
        parts["relations"] = relation(t.qkv, s.qkv, mask)
    if out:
      h_s = s.last_hidden_state
      if PROJECTION in params:
        p = params[PROJECTION]
        h_s = h_s.astype(jnp.float32) @ p["kernel"] + p["bias"]
      if "hidden" in terms:
        parts["hidden"] = losses.hidden_loss(t.layer_output, h_s, mask, cfg.loss.reduction)
      if "embedding" in terms:
        e_t = losses.sentence_embedding(t.last_hidden_state, mask, *pooling)
        e_s = losses.sentence_embedding(h_s, mask, *pooling)
        parts["embedding"] = losses.embedding_loss(e_t, e_s, mask)
    total = sum(weights[k] * v for k, v in parts.items() if weights[k] != 0)
    return jnp.asarray(total, jnp.float32), parts

  return f


def distill_loss_fn(cfg, teacher, student, teacher_layer: int,
                    pooling: Optional[Tuple[str, bool]] = None,
                    terms: Optional[Sequence[str]] = None) -> Callable:
  """loss(params, teacher_params, batch, rng=None) -> scalar: the weighted total of objective_fn."""
  f = objective_fn(cfg, teacher, student, teacher_layer, pooling, terms)
  return lambda *args, **kw: f(*args, **kw)[0]
