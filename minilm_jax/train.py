"""The distillation trainer: state, the jitted step, and the loop (closures over the config).

The step runs the frozen teacher and the student (with dropout) as far as the objective's terms need
(objective.py), takes the weighted terms, and applies AdamW. With the MiniLM relations alone, the teacher
stops at the Q/K/V projections of `loss.teacher_layer` and the student at its own last Q/K/V; the student's
last-layer parameters above them (attention output, its LayerNorm, the FFN) then get no gradient and are
frozen (neither updated nor decayed), as PyTorch's AdamW would leave them. A term that reaches the
student's output ("hidden", "embedding") trains everything. Weight decay skips biases and LayerNorm.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from minilm_jax import card, checkpoint, data, hf, objective, sharding
from minilm_jax.model import BertConfig, BertEncoder

STUDENT_INITS = ("random", "teacher", "teacher_first")


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32 scalar: updates applied (skipped ones included)
  params: Any                  # student params
  opt_state: Any
  nonfinite: jax.Array         # int32: steps whose loss or gradient was NaN/Inf (their update is skipped)
  first_nonfinite: jax.Array   # int32: the first such step, -1 if none


def default_config():
  """Every config key with its default; configs/*.py start from this and change what they need."""
  import ml_collections
  c = ml_collections.ConfigDict()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"  # HF folder or hub id (this one ships offline)
  c.student = dict(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536,
                   init="random",   # "random" (the papers) | "teacher" (every k-th layer) | "teacher_first"
                   dropout=0.1)
  c.loss = dict(version="v2",       # "v1": attention + value relation | "v2": Q-Q + K-K + V-V
                relation_heads=12,  # v1: the native head count; v2: A_r (48 base, 64 large in the paper)
                teacher_layer=-1,   # 1-based as in the papers (21 of 24 for BERT-large); -1 = last
                reduction="example",  # "example": 1/(A|x|) per example then batch mean | "token"
                weights=(),         # per-relation weights (v1: 2, v2: 3); () = all 1
                chunk_heads=0,      # 0 = automatic; n = relation KL n heads at a time (long sequences)
                # What the student matches (objective.py): "relations" (the papers), "hidden" (the
                # teacher's states at the output of teacher_layer), "embedding" (its sentence embedding)
                terms="relations",
                term_weights=())    # one weight per term, in the order of `terms`; () = all 1
  # "stdlib" (demo corpus) | "pydocs" (stdlib + installed packages' docstrings) | a .txt/.jsonl/.parquet
  # file or folder | a `datasets` hub name
  c.data = dict(source="stdlib",
                hub_config="", text_field="text", split="train", max_len=128)
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
  c.parallel = dict(mode="jit", fsdp=1)
  c.export = dict(sentence_transformers=True)  # also make DIR/student a sentence-transformers folder
  # Teaching assistant (MiniLM v1, Sec. 3.3): first distil the teacher into an assistant with the
  # teacher's depth and the student's width, in DIR/assistant; then the assistant teaches the student.
  c.assistant = dict(enabled=False, steps=0)  # steps 0: as many as the student stage
  c.precision = "float32"           # "bfloat16": bf16 teacher and compute; the loss stays fp32
  return c


# --- Configuration -> models ---------------------------------------------------------------------------

def teacher_layer_index(teacher_layer: int, num_layers: int) -> int:
  """`loss.teacher_layer` is 1-based as in the papers (21 of 24 for BERT-large) or negative from the
  end (-1 = last). Returns the 0-based index."""
  if 1 <= teacher_layer <= num_layers:
    return teacher_layer - 1
  if -num_layers <= teacher_layer <= -1:
    return num_layers + teacher_layer
  raise ValueError(f"loss.teacher_layer {teacher_layer} is out of range for a {num_layers}-layer "
                   f"teacher: use 1..{num_layers}, or -1 for the last")


def student_config(cfg, teacher: BertConfig) -> BertConfig:
  """The teacher's vocabulary, positions and type vocabulary, with the student's depth and width."""
  s = cfg.student
  return dataclasses.replace(
      teacher, num_hidden_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
      intermediate_size=s.intermediate_size, hidden_dropout_prob=s.dropout,
      attention_probs_dropout_prob=s.dropout)


def teacher_init_layers(init: str, teacher_layers: int, student_layers: int) -> list:
  """Teacher layer indices a "teacher"/"teacher_first" init copies into student layers 0..n-1."""
  if student_layers > teacher_layers:
    raise ValueError(f"student.init={init!r} needs a student no deeper than the teacher "
                     f"({student_layers} > {teacher_layers} layers)")
  if init == "teacher_first":
    return list(range(student_layers))
  k = teacher_layers // student_layers  # every k-th layer, starting from the first
  return [i * k for i in range(student_layers)]


def init_student(cfg, scfg: BertConfig, teacher_params: Any, teacher_layers: int, rng) -> Any:
  """Random init (the paper), or teacher layers sliced to the student's width (first rows/columns)."""
  params = BertEncoder(scfg).init_params(rng)
  if cfg.student.init == "random":
    return params
  layers = teacher_init_layers(cfg.student.init, teacher_layers, scfg.num_hidden_layers)
  cut = lambda t, s: t[tuple(slice(0, n) for n in s.shape)].astype(s.dtype)
  out = jax.tree.map(cut, {k: v for k, v in teacher_params.items() if k != "encoder"},
                     {k: v for k, v in params.items() if k != "encoder"})
  out["encoder"] = {"layer": {str(i): jax.tree.map(cut, teacher_params["encoder"]["layer"][str(t)],
                                                   params["encoder"]["layer"][str(i)])
                              for i, t in enumerate(layers)}}
  return out


# --- Optimizer ------------------------------------------------------------------------------------------

def _path_names(path) -> Tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def frozen_labels(params: Any, num_layers: int, reaches_output: bool = False) -> Any:
  """"freeze" for the student's last-layer parameters the loss cannot reach, "train" elsewhere.
  With `reaches_output` (a term on the student's output, see objective.reaches_output) every parameter
  gets a gradient, so none is frozen."""
  last = str(num_layers - 1)
  def label(path, _):
    n = _path_names(path)
    unreachable = n[:3] == ("encoder", "layer", last) and n[3:5] != ("attention", "self")
    return "freeze" if unreachable and not reaches_output else "train"
  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any) -> Any:
  """Weight decay on kernels and embeddings only: not on biases or LayerNorm (as BERT trains)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not (_path_names(p)[-1] == "bias" or "LayerNorm" in _path_names(p)), params)


def warmup_linear_decay(lr: float, warmup_steps: int, steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then linear decay to 0 at `steps`."""
  warm = min(warmup_steps, steps)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                               optax.linear_schedule(lr, 0.0, max(steps - warm, 1))], [warm])


def lr_schedule(cfg) -> optax.Schedule:
  return warmup_linear_decay(cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps)


def make_optimizer(cfg, params: Any, num_layers: int) -> optax.GradientTransformation:
  o = cfg.optim
  adamw = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
      optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                  mask=decay_mask))
  return optax.multi_transform(
      {"train": adamw, "freeze": optax.set_to_zero()},
      frozen_labels(params, num_layers, objective.reaches_output(objective.terms_of(cfg))))


# --- The step -------------------------------------------------------------------------------------------

# What the student is trained to match lives in objective.py; these names stay for existing callers.
relation_loss_fn = objective.relation_loss_fn
distill_loss_fn = objective.distill_loss_fn


def make_train_step(cfg, teacher: BertEncoder, student: BertEncoder, tx, teacher_layer: int,
                    pmap_axis: Optional[str] = None, pooling: Optional[Tuple[str, bool]] = None):
  """step(state, teacher_params, batch) -> (state, metrics). Pure; jit it with the state donated.
  metrics: loss, grad_norm, learning_rate and, with several loss terms, each as "loss_<term>".
  pooling: the teacher's sentence pooling (mode, normalize), for the "embedding" term.

  With `pmap_axis`, it is the per-device step of `jax.pmap`: each device takes its own dropout key and
  its shard's gradients are averaged with `lax.pmean` (equal to the global mean when every shard holds
  the same number of examples). The loss and update code is the same.
  """
  schedule = lr_schedule(cfg)
  base_key = jax.random.key(cfg.seed)
  grad_fn = jax.value_and_grad(objective.objective_fn(cfg, teacher, student, teacher_layer, pooling),
                               has_aux=True)
  log_parts = len(objective.terms_of(cfg)) > 1

  def step(state: TrainState, teacher_params, batch):
    rng = jax.random.fold_in(base_key, state.step)  # no RNG in the state: resumes replay exactly
    if pmap_axis is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(pmap_axis))
    accum = cfg.grad_accum
    if accum == 1:
      (loss, parts), grads = grad_fn(state.params, teacher_params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
      def body(carry, xs):
        i, mb = xs
        (l, p), g = grad_fn(state.params, teacher_params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, p, g)), None
      zero_parts = {t: jnp.zeros((), jnp.float32) for t in objective.terms_of(cfg)}
      zeros = (jnp.zeros((), jnp.float32), zero_parts, jax.tree.map(jnp.zeros_like, state.params))
      (loss, parts, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss, parts, grads = jax.tree.map(lambda x: x / accum, (loss, parts, grads))
    if pmap_axis is not None:
      loss, parts, grads = jax.lax.pmean((loss, parts, grads), pmap_axis)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        nonfinite=state.nonfinite + (~finite).astype(jnp.int32),
        first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step,
                                  state.first_nonfinite))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
    if log_parts:
      metrics.update({f"loss_{t}": v for t, v in parts.items()})
    return new_state, metrics

  return step


# --- Setup shared by the trainer, the benchmark and the tests -------------------------------------------

@dataclasses.dataclass
class Setup:
  """Everything a run needs besides data: models, params on devices, the jitted step."""
  cfg: Any
  teacher_dir: str
  teacher_config: BertConfig
  student_config: BertConfig
  teacher_layer: int
  mesh: Any
  teacher_params: Any
  state_shardings: Any
  init_state: Callable[[], TrainState]   # jitted, creates the state directly on its shards
  step: Callable                          # jitted (state, teacher_params, batch) -> (state, metrics)
  pooling: Optional[Tuple[str, bool]] = None  # the teacher's sentence pooling, for the "embedding" term


def _dtype(precision: str):
  if precision not in ("float32", "bfloat16"):
    raise ValueError(f"precision {precision!r}: use 'float32' or 'bfloat16'")
  return jnp.float32 if precision == "float32" else jnp.bfloat16


def check_config(cfg, tcfg: BertConfig) -> None:
  """Bad combinations as one-line ValueErrors, before any compile."""
  s, l = cfg.student, cfg.loss
  if s.init not in STUDENT_INITS:
    raise ValueError(f"student.init {s.init!r}: use one of {', '.join(STUDENT_INITS)}")
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
  if not 0 < cfg.optim.lr < float("inf"):
    raise ValueError(f"optim.lr {cfg.optim.lr} must be positive and finite")
  if cfg.data.max_len > tcfg.max_len:
    raise ValueError(f"data.max_len {cfg.data.max_len} exceeds the teacher's {tcfg.max_len} positions")
  if cfg.steps < 1 or cfg.batch_size < 1 or cfg.log_every < 1 or cfg.checkpoint_every < 1:
    raise ValueError("steps, batch_size, log_every and checkpoint_every must be positive")
  if cfg.grad_accum < 1:
    raise ValueError(f"grad_accum {cfg.grad_accum} must be positive")
  _dtype(cfg.precision)


def setup(cfg, teacher=None) -> Setup:
  """Load the teacher (or take `teacher=(dir, config, params)`), build the models, the optimizer, the
  mesh and the jitted init and step."""
  if teacher is None:
    teacher_dir = hf.resolve(cfg.teacher)
    tcfg, tparams = hf.load_pretrained(teacher_dir)
  else:
    teacher_dir, tcfg, tparams = teacher
  check_config(cfg, tcfg)
  tl = teacher_layer_index(cfg.loss.teacher_layer, tcfg.num_hidden_layers)
  scfg = student_config(cfg, tcfg)
  terms = objective.terms_of(cfg)
  pooling = None
  if "embedding" in terms:
    pooling = hf.sentence_pooling(teacher_dir)
    if pooling is None:
      raise ValueError(f"loss term 'embedding' needs a sentence-transformers teacher (with modules.json), "
                       f"and {teacher_dir} is not one: use 'hidden' instead")
  projection = objective.needs_projection(terms, scfg.hidden_size, tcfg.hidden_size)
  dtype = _dtype(cfg.precision)
  mesh = sharding.make_mesh(cfg.parallel.fsdp)
  sharding.check_batch(mesh, cfg.batch_size, cfg.grad_accum)

  teacher_model = BertEncoder(tcfg, dtype=dtype, param_dtype=dtype)
  student_model = BertEncoder(scfg, dtype=dtype, param_dtype=jnp.float32)
  # The teacher is frozen: keep it in the compute dtype (bf16 halves its memory and bandwidth).
  tparams = jax.tree.map(lambda x: np.asarray(x, dtype), tparams)
  teacher_sh = sharding.tree_shardings(mesh, tparams)
  teacher_params = jax.device_put(tparams, teacher_sh)

  def init_params(teacher_params):
    params = init_student(cfg, scfg, teacher_params, tcfg.num_hidden_layers, jax.random.key(cfg.seed))
    if projection:  # trained with the student, never exported (objective.student_params)
      params[objective.PROJECTION] = objective.init_projection(scfg.hidden_size, tcfg.hidden_size)
    return params

  tx = make_optimizer(cfg, jax.eval_shape(init_params, tparams), scfg.num_hidden_layers)

  def init_fn(teacher_params):
    params = init_params(teacher_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite=jnp.zeros((), jnp.int32), first_nonfinite=jnp.full((), -1, jnp.int32))

  abstract_state = jax.eval_shape(init_fn, tparams)
  state_sh = sharding.tree_shardings(mesh, abstract_state)
  init_state = jax.jit(lambda: init_fn(teacher_params), out_shardings=state_sh)
  if cfg.parallel.mode == "jit":
    step = jax.jit(make_train_step(cfg, teacher_model, student_model, tx, tl, pooling=pooling),
                   donate_argnums=(0,),
                   in_shardings=(state_sh, teacher_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)))
  elif cfg.parallel.mode == "pmap":
    if cfg.parallel.fsdp != 1 or jax.process_count() > 1:
      raise ValueError("parallel.mode 'pmap' runs data-parallel on one host: use parallel.fsdp=1, "
                       "or mode 'jit' for fsdp and multi-host")
    step = _pmap_step(make_train_step(cfg, teacher_model, student_model, tx, tl, pmap_axis="batch",
                                      pooling=pooling), mesh)
  else:
    raise ValueError(f"parallel.mode {cfg.parallel.mode!r}: use 'jit' (default) or 'pmap'")
  return Setup(cfg, teacher_dir, tcfg, scfg, tl, mesh, teacher_params, state_sh, init_state, step,
               pooling)


def _pmap_step(per_device_step, mesh):
  """The pmap path behind the jit path's interface (global state in, global state out), for pipelines
  built on pmap. Each call replicates the state over a leading device axis and takes device 0's copy
  back; the copies cost a little, which is why "jit" is the default."""
  devices = list(mesh.devices.flat)
  n = len(devices)
  pstep = jax.pmap(per_device_step, axis_name="batch", devices=devices)
  # Arrays laid out the way the pmap shim expects: leading axis over a one-axis "batch" mesh.
  stacked = NamedSharding(jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Auto,),
                                        devices=devices), P("batch"))

  def step(state, teacher_params, batch):
    rep = lambda x: jax.device_put(jnp.broadcast_to(x, (n,) + x.shape), stacked)
    split = lambda x: jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), stacked)
    new_state, metrics = pstep(jax.tree.map(rep, state), jax.tree.map(rep, teacher_params),
                               jax.tree.map(split, batch))
    take0 = lambda x: x[0]
    return jax.tree.map(take0, new_state), jax.tree.map(take0, metrics)

  return step


def abstract_state(s: Setup) -> Any:
  """ShapeDtypeStructs of the state with their shardings: the target of a restore."""
  shapes = jax.eval_shape(s.init_state)
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes,
                      s.state_shardings)


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


# --- The loop -------------------------------------------------------------------------------------------

class WorkdirWriteError(OSError):
  """Writing to the workdir failed (a full disk, say); the checkpoints already there are intact."""


class NonFiniteLossError(RuntimeError):
  pass


# Config keys whose change would make a resumed run differ from an uninterrupted one.
_RESUME_KEYS = ("student", "loss", "data", "batch_size", "grad_accum", "seed", "precision")


def check_resume(saved: dict, now: dict) -> None:
  """Refuse to resume with a different teacher or an incompatible student/data/loss setup."""
  if saved["teacher"]["sha256"] != now["teacher"]["sha256"]:
    raise ValueError(f"this workdir was trained with teacher {saved['teacher']['path']} "
                     f"(sha256 {saved['teacher']['sha256'][:12]}), but the config names "
                     f"{now['teacher']['path']} (sha256 {now['teacher']['sha256'][:12]}); "
                     "use a new workdir")
  # Runs saved before the tokenizer was part of the identity have no tokenizer_sha256: nothing to compare.
  if saved["teacher"].get("tokenizer_sha256", now["teacher"]["tokenizer_sha256"]) != \
      now["teacher"]["tokenizer_sha256"]:
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
    was = saved["config"].get(key)
    if isinstance(was, dict) and isinstance(defaults.get(key), dict):
      was = {**defaults[key], **was}
    if was != now["config"].get(key):
      raise ValueError(f"config key {key!r} differs from the run in this workdir "
                       f"({was} vs {now['config'].get(key)}); use a new workdir")


def _trim_metrics(path: str, last_step: int) -> None:
  """Drop lines logged after the checkpoint we resume from: they will be logged again."""
  if jax.process_index() != 0 or not os.path.isfile(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line)
    except (ValueError, KeyError):
      pass  # a torn last line from a crash
  with open(path + ".tmp", "w") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


def is_remote(path: str) -> bool:
  return "://" in path


def _check_writable(workdir: str) -> None:
  from etils import epath
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(workdir) / f".write-probe-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise OSError(f"workdir {workdir} is not writable ({e.strerror or e})") from None


def local_dir(workdir: str) -> str:
  """Where metrics, TensorBoard events, the token cache and the export are written: the workdir itself,
  or for a remote (gs://) workdir a local mirror that is copied up at every checkpoint and at the end
  (Orbax writes the checkpoints straight to the remote workdir)."""
  return hf.cache_dir("runs", workdir) if is_remote(workdir) else workdir


def _sync(workdir: str, local: str, names, down: bool = False) -> None:
  """Copy files/folders `names` between the local mirror and a remote workdir (process 0 only)."""
  if not is_remote(workdir) or jax.process_index() != 0:
    return
  from etils import epath
  for name in names:
    src, dst = (epath.Path(workdir) / name, epath.Path(local) / name) if down else \
        (epath.Path(local) / name, epath.Path(workdir) / name)
    if src.exists():
      hf.copy_tree(src, dst)


class _StopFlag:
  """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    if jax.process_count() == 1:  # multi-host runs agree on preemption through Orbax instead
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train_and_evaluate(cfg, workdir: str, progress: Optional[bool] = None,
                       log: Callable[[str], None] = print) -> dict:
  """Distil `cfg.teacher` into a student in `workdir`, resuming from its latest checkpoint; with
  `assistant.enabled`, through a teaching assistant trained first in `workdir/assistant` (each stage
  has its own checkpoints and export, and resumes on its own)."""
  if not cfg.assistant.enabled:
    return _train_stage(cfg, workdir, progress, log)
  from minilm_jax import plots
  teacher_config = hf.load_config(hf.resolve(cfg.teacher))
  a_cfg = copy.deepcopy(cfg)
  a_cfg.assistant.enabled = False
  a_cfg.student.num_layers = teacher_config.num_hidden_layers
  a_cfg.steps = cfg.assistant.steps or cfg.steps
  a_dir = os.path.join(workdir, "assistant") if not is_remote(workdir) else f"{workdir}/assistant"
  log(f"stage 1/2: teacher -> assistant ({a_cfg.student.num_layers}x{a_cfg.student.hidden_size}) "
      f"in {a_dir}")
  first = _train_stage(a_cfg, a_dir, progress, log)
  if first["preempted"]:
    return first
  if jax.process_count() > 1:  # host 0 wrote the assistant's export; the others read it next
    from jax.experimental.multihost_utils import sync_global_devices
    sync_global_devices("minilm_jax_assistant_exported")
  s_cfg = copy.deepcopy(cfg)
  s_cfg.assistant.enabled = False
  s_cfg.teacher = first["student_dir"]
  s_cfg.loss.teacher_layer = -1  # the assistant is distilled from its own last layer
  log(f"stage 2/2: assistant -> student in {workdir}")
  second = _train_stage(s_cfg, workdir, progress, log)
  if not second["preempted"] and jax.process_index() == 0:
    local, a_local = local_dir(workdir), local_dir(a_dir)
    plots.loss_curves({"teacher -> assistant": os.path.join(a_local, "metrics.jsonl"),
                       "assistant -> student": os.path.join(local, "metrics.jsonl")},
                      os.path.join(local, "loss_chain.png"), "MiniLM teaching-assistant chain")
    _sync(workdir, local, ["loss_chain.png"])
  return {**second, "assistant_dir": first["student_dir"]}


def _train_stage(cfg, workdir: str, progress: Optional[bool] = None,
                 log: Callable[[str], None] = print) -> dict:
  """One distillation run, teacher to student, in `workdir`.

  Writes workdir/checkpoints (Orbax), metrics.jsonl, tb/ (TensorBoard), and at the end student/ (an HF
  folder with flax_params.msgpack) and loss.png. Returns a summary dict.
  """
  from transformers import AutoTokenizer
  from minilm_jax import plots
  if progress is None:
    progress = sys.stderr.isatty()
  _check_writable(workdir)
  local = local_dir(workdir)
  os.makedirs(local, exist_ok=True)
  s = setup(cfg)
  hf.tokenizer_files(s.teacher_dir)  # none: a one-line error, not a run on [UNK]s
  tok = AutoTokenizer.from_pretrained(s.teacher_dir)
  if len(tok) > s.teacher_config.vocab_size:
    raise ValueError(f"the tokenizer in {s.teacher_dir} has {len(tok)} tokens, but the teacher's "
                     f"embeddings have {s.teacher_config.vocab_size} rows")
  docs = data.load_texts(cfg.data.source, cfg.data.text_field, cfg.data.hub_config, cfg.data.split)
  rows = data.tokenize_and_pack(docs, tok, cfg.data.max_len, os.path.join(local, "cache"), progress)
  meta = {"teacher": teacher_identity(s.teacher_dir, s.teacher_config),
          "student_config": s.student_config.to_dict(),
          "config": json.loads(json.dumps(cfg.to_dict()))}  # as a checkpoint reads it back

  mngr = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), cfg.checkpoint_every,
                                 cfg.keep_checkpoints, cfg.keep_every)
  try:
    state, saved, start = checkpoint.restore_latest(mngr, abstract_state(s),
                                                    lambda saved: check_resume(saved, meta))
    if state is None:
      state, start = s.init_state(), 0
    else:
      log(f"resuming from step {start} in {workdir}")
      _sync(workdir, local, ["metrics.jsonl", "tb"], down=True)
    metrics_path = os.path.join(local, "metrics.jsonl")
    _trim_metrics(metrics_path, start)
    status = _loop(cfg, s, state, start, rows, mngr, meta, local,
                   lambda: _sync(workdir, local, ["metrics.jsonl", "tb"]), progress, log)
    if status["preempted"]:
      return status
  finally:
    mngr.wait_until_finished()  # never exit with a save half done
    mngr.close()
  state = status.pop("state")
  student_dir = os.path.join(local, "student")
  params = objective.student_params(state.params)  # the projection head stays in the checkpoints
  if jax.process_count() > 1:  # every host takes part in gathering the (possibly sharded) params
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    try:
      hf.export_student(student_dir, s.student_config, jax.device_get(params), tokenizer=s.teacher_dir)
      if cfg.export.sentence_transformers:
        hf.export_sentence_transformers(student_dir, s.student_config, s.teacher_dir, cfg.data.max_len)
      card.write_card(student_dir, card.model_card(
          meta["config"], meta["student_config"], status["step"], cfg.export.sentence_transformers,
          card.eval_table(local)))
      plots.loss_curve(metrics_path, os.path.join(local, "loss.png"))
      _sync(workdir, local, ["metrics.jsonl", "tb", "loss.png", "student"])
    except OSError as e:  # the full disk can also come after the last save: rerunning exports again
      raise WorkdirWriteError(f"writing the student to {student_dir} failed ({e}); the checkpoints are "
                              f"intact (latest complete: step {status['step']}); free space and rerun "
                              "the same command to export it") from e
    if is_remote(workdir):
      student_dir = f"{workdir.rstrip('/')}/student"
    log(f"student written to {student_dir}")
  return {**status, "student_dir": student_dir}


def _loop(cfg, s: Setup, state, start, rows, mngr, meta, workdir, sync_up, progress, log) -> dict:
  """The steps from `start` to cfg.steps; `workdir` here is where metrics and events are written."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  from tqdm.auto import tqdm
  from tensorboardX import SummaryWriter
  tokens_per_step = cfg.batch_size * cfg.data.max_len
  make_batch = lambda step: data.host_batch(rows, step, cfg.batch_size, cfg.seed, jax.process_index(),
                                            jax.process_count())
  bar = tqdm(total=cfg.steps, initial=start, desc="distilling", unit="step", disable=not progress,
             dynamic_ncols=True)
  writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start) if jax.process_index() == 0 \
      else None
  last_t, last_step, last = time.time(), start, None
  step_meta = lambda step: {**meta, "step": step, "data_position": step * cfg.batch_size}

  def check_finite(state, step):
    bad, first = int(state.nonfinite), int(state.first_nonfinite)
    if bad > cfg.max_nonfinite_steps:
      raise NonFiniteLossError(
          f"the loss or gradient was NaN/Inf at step {first + 1} ({bad} such steps, "
          f"max_nonfinite_steps={cfg.max_nonfinite_steps}); the last good checkpoint is step "
          f"{mngr.latest_step()}")

  try:
    with _StopFlag() as stop, open(metrics_path if jax.process_index() == 0 else os.devnull,
                                   "a") as mfile:
      for i, batch in data.prefetch(make_batch, start, cfg.steps):
        state, metrics = s.step(state, s.teacher_params, sharding.put_batch(s.mesh, batch))
        step = i + 1
        if step % cfg.log_every == 0 or step == cfg.steps:
          m = jax.device_get(metrics)
          check_finite(state, step)
          now = time.time()
          rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                 "learning_rate": float(m["learning_rate"]),
                 "tokens_per_s": tokens_per_step * (step - last_step) / max(now - last_t, 1e-9),
                 "nonfinite_steps": int(state.nonfinite),
                 **{k: float(v) for k, v in m.items() if k.startswith("loss_")}}
          last_t, last_step, last = now, step, rec
          if jax.process_index() == 0:
            mfile.write(json.dumps(rec) + "\n")
            mfile.flush()
            for k in ("loss", "grad_norm", "learning_rate", "tokens_per_s"):
              writer.add_scalar(k, rec[k], step)
          bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update(1)
        preempted = stop.signal is not None or mngr.reached_preemption(step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or preempted:
          check_finite(state, step)
          try:
            checkpoint.save(mngr, step, state, step_meta(step), force=True)
            if writer is not None:
              writer.flush()
            sync_up()
          except Exception as e:  # a failed async save surfaces here (or at the final wait)
            raise WorkdirWriteError(f"saving the checkpoint at step {step} failed ({e}); earlier "
                                    f"checkpoints are intact (latest complete: step {mngr.latest_step()})"
                                    ) from e
        if preempted and step < cfg.steps:
          mngr.wait_until_finished()
          log(f"stopped by {stop.signal or 'preemption'} at step {step}; checkpoint saved; "
              "rerun the same command to resume")
          return {"preempted": True, "step": step, "last": last}
  except WorkdirWriteError:
    raise
  except OSError as e:
    # e.g. a full disk while writing metrics or events: say where, and what is safe.
    raise WorkdirWriteError(f"writing to {workdir} failed near step {bar.n} ({e}); earlier checkpoints "
                            f"are intact (latest complete: step {mngr.latest_step()})") from e
  finally:
    bar.close()
    if writer is not None:
      try:
        writer.close()
      except OSError:
        pass  # a full disk: never mask the error that brought us here
  if start >= cfg.steps:
    log(f"already trained to step {start}")
  return {"preempted": False, "step": max(start, cfg.steps), "last": last, "state": state}
