"""A run's configuration: every key with its default, every check of a config, and the run's identity
that a resume must match. Configs (configs/*.py) import only this module."""

from __future__ import annotations

import hashlib
import json
import os

import jax.numpy as jnp

from minilm_jax import hf, objective
from minilm_jax.model import BertConfig
from minilm_jax.student import STUDENT_INITS, check_init  # noqa: F401 (STUDENT_INITS: its old home)


def default_config():
  """Every config key with its default; configs/*.py start from this and change what they need."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"  # HF folder or hub id (this one ships offline)
  c.student = dict(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536,
                   # "random" (the papers) | "teacher" (every k-th layer) | "teacher_first" | "best" (the
                   # subset of teacher layers that scores best on the training corpus, chosen before
                   # training) | "layers:1,3,5" (those teacher layers, 0-based, increasing)
                   init="random",
                   dropout=0.1)
  c.loss = dict(version="v2",       # "v1": attention + value relation | "v2": Q-Q + K-K + V-V
                relation_heads=12,  # v1: the native head count; v2: A_r (48 base, 64 large in the paper)
                teacher_layer=-1,   # 1-based as in the papers (21 of 24 for BERT-large); -1 = last
                reduction="example",  # "example": 1/(A|x|) per example then batch mean | "token"
                weights=(),         # per-relation weights (v1: 2, v2: 3); () = all 1
                chunk_heads=0,      # 0 = automatic; n = relation KL n heads at a time (n = heads: direct)
                block_keys=0,       # 0 = automatic (128 above 128 tokens); n = relation KL n keys at a time
                implementation="auto",  # relation KL: "auto" (Pallas kernels on TPU, XLA elsewhere) | "xla"
                                        # | "pallas" (TPU only; chunk_heads and block_keys do not apply)
                # What the student matches (objective.py): "relations" (the papers), "hidden" (the
                # teacher's states at the output of teacher_layer), "embedding" (its sentence embedding)
                terms="relations",
                term_weights=())    # one weight per term, in the order of `terms`; () = all 1
  # "stdlib" (demo corpus) | "pydocs" (stdlib + installed packages' docstrings) | a .txt/.jsonl/.parquet
  # file or folder, local or gs:// | a `datasets` hub name (streamed)
  c.data = dict(source="stdlib",
                hub_config="", text_field="text", split="train", max_len=128,
                cache_dir="",       # token shards (shards.py): "" = WORKDIR/cache; local or gs://, shareable
                num_proc=0)         # processes that tokenise; 0 = one per core
  c.batch_size = 32                 # global, over all devices and hosts
  c.grad_accum = 1
  c.steps = 1000
  c.seed = 0
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.keep_every = 0                  # > 0: also keep every n-th step's checkpoint for good
  c.max_nonfinite_steps = 0         # NaN/Inf steps skipped before the run stops with an error
  c.optim = dict(lr=6e-4, warmup_steps=100, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)
  # cpu_devices: XLA:CPU devices a CPU-only host is split into (xla_flags.py): 0 = one per usable core,
  # as many as split the batch evenly; 1 = XLA's one device. Accelerator hosts ignore it.
  c.parallel = dict(mode="jit", fsdp=1, cpu_devices=0)
  c.export = dict(sentence_transformers=True)  # also make DIR/student a sentence-transformers folder
  # Teaching assistant (MiniLM v1, Sec. 3.3): first distil the teacher into an assistant with the
  # teacher's depth and the student's width, in DIR/assistant; then the assistant teaches the student.
  c.assistant = dict(enabled=False, steps=0)  # steps 0: as many as the student stage
  c.precision = "float32"           # "bfloat16": bf16 teacher and compute; the loss stays fp32
  return c


def compute_dtype(precision: str):
  if precision not in ("float32", "bfloat16"):
    raise ValueError(f"precision {precision!r}: use 'float32' or 'bfloat16'")
  return jnp.float32 if precision == "float32" else jnp.bfloat16


_FINITE = lambda v: v == v and abs(v) != float("inf")
# Every numeric key's range: (test, what it must be). ml_collections already refuses a wrong type.
_RANGES = {
    "student.num_layers": (lambda v: v >= 1, "at least 1"),
    "student.hidden_size": (lambda v: v >= 1, "at least 1"),
    "student.num_heads": (lambda v: v >= 1, "at least 1"),
    "student.intermediate_size": (lambda v: v >= 1, "at least 1"),
    "student.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "loss.chunk_heads": (lambda v: v >= 0, "0 (automatic) or more"),
    "loss.block_keys": (lambda v: v >= 0, "0 (automatic) or more"),
    "data.max_len": (lambda v: v >= 8, "at least 8 (a [CLS], a [SEP] and some text)"),
    "data.num_proc": (lambda v: v >= 0, "0 (one per core) or more"),
    "steps": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "grad_accum": (lambda v: v >= 1, "at least 1"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "checkpoint_every": (lambda v: v >= 1, "at least 1"),
    "keep_checkpoints": (lambda v: v >= 1, "at least 1"),
    "keep_every": (lambda v: v >= 0, "0 (off) or more"),
    "max_nonfinite_steps": (lambda v: v >= 0, "0 or more"),
    "optim.lr": (lambda v: _FINITE(v) and v > 0, "positive and finite"),
    "optim.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "optim.weight_decay": (lambda v: _FINITE(v) and v >= 0, "finite and ≥ 0"),
    "optim.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.eps": (lambda v: _FINITE(v) and v > 0, "positive and finite"),
    "optim.clip_norm": (lambda v: _FINITE(v) and v >= 0, "finite and ≥ 0 (0: no clipping)"),
    "parallel.fsdp": (lambda v: v >= 1, "at least 1"),
    "parallel.cpu_devices": (lambda v: v >= 0, "0 (one per usable core) or more"),
    "assistant.steps": (lambda v: v >= 0, "0 (as many as the student stage) or more"),
}


def check_ranges(cfg) -> None:
  """Each numeric key in its range, as a one-line ValueError naming the key (and a teacher named)."""
  if not str(cfg.teacher).strip():
    raise ValueError("teacher is empty: give an HF folder, a gs:// folder or a hub id")
  for key, (ok, what) in _RANGES.items():
    v = cfg
    for part in key.split("."):
      v = v[part]
    if not ok(v):
      raise ValueError(f"{key} {v!r} must be {what}")
  if cfg.loss.weights and (len(cfg.loss.weights) != {"v1": 2, "v2": 3}.get(cfg.loss.version)
                           or not all(_FINITE(w) and w >= 0 for w in cfg.loss.weights)):
    raise ValueError(f"loss.weights {tuple(cfg.loss.weights)}: give 2 (v1) or 3 (v2) finite weights ≥ 0, "
                     "or () for all 1")
  if cfg.loss.reduction not in ("example", "token"):
    raise ValueError(f"loss.reduction {cfg.loss.reduction!r}: use 'example' or 'token'")
  check_init(cfg.student.init, cfg.student.num_layers)


def check_config(cfg, tcfg: BertConfig) -> None:
  """Bad values and bad combinations as one-line ValueErrors, before any compile."""
  check_ranges(cfg)
  s, l = cfg.student, cfg.loss
  check_init(s.init, s.num_layers, tcfg.num_hidden_layers)
  if s.hidden_size % s.num_heads:
    raise ValueError(f"student.num_heads {s.num_heads} does not divide student.hidden_size {s.hidden_size}")
  objective.check_terms(cfg)
  if "relations" not in objective.terms_of(cfg):
    pass  # no relation term: its version and heads do not matter
  elif l.version not in ("v1", "v2"):
    raise ValueError(f"loss.version {l.version!r}: use 'v1' or 'v2'")
  elif l.version == "v1":
    if tcfg.num_attention_heads != s.num_heads:
      raise ValueError(f"loss.version 'v1' needs equal head counts: teacher has "
                       f"{tcfg.num_attention_heads}, student.num_heads is {s.num_heads} (use v2)")
    if l.relation_heads != s.num_heads:
      raise ValueError(f"loss.version 'v1' uses the native heads: loss.relation_heads must be "
                       f"{s.num_heads}, not {l.relation_heads}")
  for who, width in (("teacher hidden size", tcfg.hidden_size), ("student.hidden_size", s.hidden_size)):
    if "relations" in objective.terms_of(cfg) and (l.relation_heads < 1 or width % l.relation_heads):
      raise ValueError(f"loss.relation_heads {l.relation_heads} does not divide the {who} {width}")
  if cfg.data.max_len > tcfg.max_len:
    raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the teacher's {tcfg.max_len} positions")
  compute_dtype(cfg.precision)


# --- The run's identity: what a resume must match ---------------------------------------------------

def _hash_files(h, folder: str, names) -> str:
  for name in names:
    with open(os.path.join(folder, name), "rb") as f:
      for block in iter(lambda: f.read(1 << 24), b""):
        h.update(block)
  return h.hexdigest()


def teacher_identity(teacher_dir: str, tcfg: BertConfig) -> dict:
  """Path and SHA-256 of the teacher's config and weights, and of its tokenizer: a resume must use the
  same teacher and the same token ids."""
  weights = [n for n in sorted(os.listdir(teacher_dir))
             if n.endswith(".safetensors") or n == "pytorch_model.bin"]
  return {"path": os.path.abspath(teacher_dir),
          "sha256": _hash_files(hashlib.sha256(json.dumps(tcfg.to_dict(), sort_keys=True).encode()),
                                teacher_dir, weights),
          "tokenizer_sha256": _hash_files(hashlib.sha256(), teacher_dir, hf.tokenizer_files(teacher_dir))}


def teacher_differs(saved: dict, now: dict) -> str:
  """What differs between two teacher_identity dicts: "config or weights", "tokenizer" or ""
  (the same teacher). Runs saved before the tokenizer was part of the identity have no tokenizer_sha256:
  nothing to compare there."""
  if saved["sha256"] != now["sha256"]:
    return "config or weights"
  was_tok, now_tok = saved.get("tokenizer_sha256"), now.get("tokenizer_sha256")
  return "tokenizer" if was_tok and now_tok and was_tok != now_tok else ""


# Config keys whose change would make a resumed run differ from an uninterrupted one; and keys inside
# them that do not (where the shards are kept and how many processes made them).
_RESUME_KEYS = ("student", "loss", "data", "batch_size", "grad_accum", "seed", "precision")
_RESUME_FREE = {"data": ("cache_dir", "num_proc"), "loss": ("implementation",)}


def check_resume(saved: dict, now: dict) -> None:
  """Refuse to resume with a different teacher or an incompatible student/data/loss setup."""
  differs = teacher_differs(saved["teacher"], now["teacher"])
  if differs == "config or weights":
    raise ValueError(f"this workdir was trained with teacher {saved['teacher']['path']} "
                     f"(sha256 {saved['teacher']['sha256'][:12]}), but the config names "
                     f"{now['teacher']['path']} (sha256 {now['teacher']['sha256'][:12]}); "
                     "use a new workdir")
  if differs == "tokenizer":
    raise ValueError(f"this workdir was trained with the tokenizer of {saved['teacher']['path']}, and "
                     f"the tokenizer files in {now['teacher']['path']} differ (its token ids would not "
                     "match the run's); use a new workdir")
  if saved["student_config"] != now["student_config"]:
    diff = {k: (saved["student_config"].get(k), v) for k, v in now["student_config"].items()
            if saved["student_config"].get(k) != v}
    raise ValueError(f"this workdir holds an incompatible student (saved vs config: {diff}); "
                     "use a new workdir")
  # A checkpoint written before a config key existed ran with that key's default.
  defaults = json.loads(json.dumps(default_config().to_dict()))
  for key in _RESUME_KEYS:
    was, want = saved["config"].get(key), now["config"].get(key)
    if isinstance(was, dict) and isinstance(defaults.get(key), dict):
      was = {**defaults[key], **was}
    if isinstance(was, dict) and isinstance(want, dict):
      free = _RESUME_FREE.get(key, ())
      was, want = ({k: v for k, v in d.items() if k not in free} for d in (was, want))
    if was != want:
      raise ValueError(f"config key {key!r} differs from the run in this workdir "
                       f"({was} vs {now['config'].get(key)}); use a new workdir")
