"""The distillation trainer: state, the jitted step, the setup, the loop and the teaching-assistant chain.

What it builds on, one module each: config.py (keys, checks, the run's identity), student.py (shape, init,
frozen parameters), objective.py (what the student is trained to match), optimizer.py (AdamW and the
schedule), workdir.py (the workdir's layout and its gs:// mirror), checkpoint.py, data.py, sharding.py.

The step runs the frozen teacher and the student (with dropout) as far as the objective's terms need
(objective.py), takes the weighted terms, and applies AdamW. With the MiniLM relations alone, the teacher
stops at the Q/K/V projections of `loss.teacher_layer` and the student at its own last Q/K/V; the student's
last-layer parameters above them (attention output, its LayerNorm, the FFN) then get no gradient and are
frozen (neither updated nor decayed), as PyTorch's AdamW would leave them. A term that reaches the
student's output ("hidden", "embedding") trains everything. Weight decay skips biases and LayerNorm.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
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

from minilm_jax import attention_kernel, card, checkpoint, data, hf, lock, model, objective, sharding, shards
from minilm_jax import workdir as wd
from minilm_jax.config import check_config, check_ranges, check_resume, compute_dtype, teacher_identity
from minilm_jax.config import default_config  # noqa: F401  (configs written before config.py import it here)
from minilm_jax.families import encoder_for
from minilm_jax.optimizer import lr_schedule, make_optimizer
from minilm_jax.student import every_kth, init_student, student_config, teacher_layer_index


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32 scalar: updates applied (skipped ones included)
  params: Any                  # student params
  opt_state: Any
  nonfinite: jax.Array         # int32: steps whose loss or gradient was NaN/Inf (their update is skipped)
  first_nonfinite: jax.Array   # int32: the first such step, -1 if none


# --- The step -------------------------------------------------------------------------------------------


def make_train_step(cfg, teacher, student, tx, teacher_layer: int,
                    pmap_axis: Optional[str] = None, pooling: Optional[Tuple[str, bool]] = None,
                    mesh=None, implementation: str = "xla"):
  """step(state, teacher_params, batch) -> (state, metrics). Pure; jit it with the state donated.
  metrics: loss, grad_norm, learning_rate and, with several loss terms, each as "loss_<term>".
  pooling: the teacher's sentence pooling (mode, normalize), for the "embedding" term.
  mesh: the jit step's; with fsdp the loss takes the weights gathered (sharding.gathered).
  implementation: the relation KL's (objective.relation_implementation).

  With `pmap_axis`, it is the per-device step of `jax.pmap`: each device takes its own dropout key and
  its shard's gradients are averaged with `lax.pmean` (equal to the global mean when every shard holds
  the same number of examples). The loss and update code is the same.
  """
  schedule = lr_schedule(cfg)
  base_key = jax.random.key(cfg.seed)
  loss_fn = objective.objective_fn(cfg, teacher, student, teacher_layer, pooling,
                                   implementation=implementation, mesh=mesh)
  if mesh is not None:
    loss_fn = lambda p, tp, *args, f=loss_fn: f(sharding.gathered(mesh, p), sharding.gathered(mesh, tp),
                                                *args)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
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
    if mesh is not None:
      grads = sharding.split(mesh, grads)
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
  teacher_config: Any                    # BertConfig or ModernBertConfig, the teacher's family
  student_config: Any
  teacher_layer: int
  mesh: Any
  teacher_params: Any
  state_shardings: Any
  init_state: Callable[[], TrainState]   # jitted, creates the state directly on its shards
  step: Callable                          # jitted (state, teacher_params, batch) -> (state, metrics)
  pooling: Optional[Tuple[str, bool]] = None  # the teacher's sentence pooling, for the "embedding" term
  init_layers: Optional[list] = None          # the teacher layers student.init "best" chose


def attention_implementation(precision: str, platform: Optional[str] = None, mesh=None):
  """A fused attention for model.fused_attention: on a TPU, tpu_attention over `mesh` (the probabilities'
  dropout inside the kernel: batch 1024 x 128 on v4-32, BERT-base -> 6x384, 23.7 ms a step by the
  compiler's estimate with XLA's attention, 16.8 with the kernel for teacher and student); where no
  dropout applies to the probabilities (the teacher), cuDNN's for bf16 on a GPU; None (the XLA
  reference) elsewhere. platform: the devices' ("gpu", "tpu", "cpu"); default: JAX's default backend."""
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return functools.partial(tpu_attention, mesh)
  return "cudnn" if precision == "bfloat16" and platform == "gpu" else None


def tpu_attention(mesh, q_BTD, k_BTD, v_BTD, mask_BT, num_heads, window=None, rate=0.0, key=None):
  """attention_kernel.attention on each device of `mesh` (XLA cannot partition a Pallas kernel), within
  ±window keys (None: all), with dropout `rate` on the probabilities from one seed per batch row drawn
  from `key`. mesh None: one device. [B, T, D] -> [B, T, D]."""
  attend = functools.partial(attention_kernel.attention, num_heads=num_heads, window=window, rate=rate)
  per_device = (lambda f: f) if mesh is None else functools.partial(sharding.per_device, mesh)
  if not rate:
    return per_device(lambda q, k, v, m: attend(q, k, v, m))(q_BTD, k_BTD, v_BTD, mask_BT)
  seeds_B = jax.random.bits(key, (q_BTD.shape[0],), jnp.uint32)
  return per_device(lambda q, k, v, m, s: attend(q, k, v, m, seeds_B=s))(
      q_BTD, k_BTD, v_BTD, mask_BT, seeds_B)


def setup(cfg, teacher=None, devices=None, log: Callable[[str], None] = lambda m: None,
          init_layers: Optional[list] = None) -> Setup:
  """Load the teacher (or take `teacher=(dir, config, params)`), build the models, the optimizer, the
  mesh and the jitted init and step.

  devices: what to build for (default: jax.devices(), every host's). With `params` None the teacher is
  shapes only (ShapeDtypeStructs on their shardings) and nothing touches a device: the step can be
  lowered and compiled for `devices` that are not here (aot.py: a TPU slice's or a GPU's), never run.
  log: where student.init "best" says which layers it chose (a minute's work on the demo's corpus).
  init_layers: the layers a "best" init chose when this run began (a resume's), taken instead of choosing.
  """
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
  chosen = None
  if cfg.student.init == "best" and tparams is None:  # shapes only (aot.py): any subset has the same
    chosen = every_kth(tcfg.num_hidden_layers, scfg.num_hidden_layers)[0]
  elif cfg.student.init == "best" and _fits(init_layers, tcfg.num_hidden_layers, scfg.num_hidden_layers):
    chosen = list(init_layers)
    log(f"student.init best: teacher layers {', '.join(map(str, chosen))}, as this run chose them at its start")
  elif cfg.student.init == "best":  # chosen on the training corpus, before the first step
    from minilm_jax.evaluation import subsets
    log("student.init best: choosing the teacher layers to start from, on the training corpus")
    chosen = subsets.choose_for_training(cfg, teacher_dir, (tcfg, tparams), scfg, log=log)["layers"]
  dtype = compute_dtype(cfg.precision)
  mesh = sharding.make_mesh(cfg.parallel.fsdp, devices)
  sharding.check_batch(mesh, cfg.batch_size, cfg.grad_accum)

  platform = mesh.devices.flat[0].platform
  fused = attention_implementation(cfg.precision, platform, mesh)
  relation_impl = objective.relation_implementation(cfg, platform)
  teacher_model = encoder_for(tcfg, dtype=dtype, param_dtype=dtype, attention_implementation=fused)
  student_model = encoder_for(scfg, dtype=dtype, param_dtype=jnp.float32, attention_implementation=fused)
  # The teacher is frozen: keep it in the compute dtype (bf16 halves its memory and bandwidth).
  abstract = tparams is None
  if abstract:
    tparams = jax.eval_shape(lambda: encoder_for(tcfg, dtype=dtype, param_dtype=dtype).init_params(
        jax.random.key(0)))
  tparams = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype) if abstract
                         else np.asarray(x, dtype), tparams)
  teacher_sh = sharding.tree_shardings(mesh, tparams)
  if abstract:
    teacher_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                  tparams, teacher_sh)
  else:
    teacher_params = jax.device_put(tparams, teacher_sh)

  def init_params(teacher_params):
    params = init_student(cfg, scfg, teacher_params, tcfg.num_hidden_layers, jax.random.key(cfg.seed),
                          chosen)
    if projection:  # trained with the student, never exported (objective.student_params)
      params[objective.PROJECTION] = objective.init_projection(scfg.hidden_size, tcfg.hidden_size)
    return params

  tx = make_optimizer(cfg, jax.eval_shape(init_params, tparams), scfg)

  def init_fn(teacher_params):
    params = init_params(teacher_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      nonfinite=jnp.zeros((), jnp.int32), first_nonfinite=jnp.full((), -1, jnp.int32))

  abstract_state = jax.eval_shape(init_fn, tparams)
  state_sh = sharding.tree_shardings(mesh, abstract_state)
  init_jit = jax.jit(init_fn, in_shardings=(teacher_sh,), out_shardings=state_sh)
  init_state = lambda: init_jit(teacher_params)
  if cfg.parallel.mode == "jit":
    step = jax.jit(make_train_step(cfg, teacher_model, student_model, tx, tl, pooling=pooling, mesh=mesh,
                                   implementation=relation_impl),
                   donate_argnums=(0,),
                   in_shardings=(state_sh, teacher_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)))
  elif cfg.parallel.mode == "pmap":
    if cfg.parallel.fsdp != 1 or jax.process_count() > 1:
      raise ValueError("parallel.mode 'pmap' runs data-parallel on one host: use parallel.fsdp=1, "
                       "or mode 'jit' for fsdp and multi-host")
    step = _pmap_step(make_train_step(cfg, teacher_model, student_model, tx, tl, pmap_axis="batch",
                                      pooling=pooling, implementation=relation_impl), mesh)
  else:
    raise ValueError(f"parallel.mode {cfg.parallel.mode!r}: use 'jit' (default) or 'pmap'")
  return Setup(cfg, teacher_dir, tcfg, scfg, tl, mesh, teacher_params, state_sh, init_state, step,
               pooling, chosen)


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


# --- The loop -------------------------------------------------------------------------------------------

class WorkdirWriteError(OSError):
  """Writing to the workdir failed (a full disk, say); the checkpoints already there are intact."""


class NonFiniteLossError(RuntimeError):
  pass


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
  has its own checkpoints and export, and resumes on its own). The workdir's lock (lock.py) is held
  throughout: a second run on it stops with a one-line error before writing anything."""
  check_ranges(cfg)  # before the lock makes the workdir: a bad value leaves nothing behind
  teacher_dir = hf.resolve(cfg.teacher)  # once: a gs:// teacher is copied to this host here, not again
  teacher_config = hf.load_config(teacher_dir)
  stages = _stages(cfg, teacher_config)
  # Each stage's values against its teacher (the assistant's is made from the teacher's config), also
  # before the lock: a bad combination leaves nothing behind either.
  for stage_cfg, stage_teacher in zip(stages, (teacher_config, student_config(stages[0], teacher_config))):
    check_config(stage_cfg, stage_teacher)
  with lock.acquire(workdir, sharding.hosts(), log) as held:
    if len(stages) == 1:
      return _train_stage(cfg, workdir, progress, log, held, teacher_dir)
    return _train_chain(stages, workdir, held, progress, log, teacher_dir)


def _stages(cfg, teacher_config) -> list:
  """[cfg] or, with a teaching assistant, [assistant stage, student stage] (the student stage's teacher is
  set once the assistant is exported)."""
  if not cfg.assistant.enabled:
    return [cfg]
  a_cfg = copy.deepcopy(cfg)
  a_cfg.assistant.enabled = False
  a_cfg.student.num_layers = teacher_config.num_hidden_layers
  a_cfg.steps = cfg.assistant.steps or cfg.steps
  s_cfg = copy.deepcopy(cfg)
  s_cfg.assistant.enabled = False
  s_cfg.loss.teacher_layer = -1  # the assistant is distilled from its own last layer
  return [a_cfg, s_cfg]


def _train_chain(stages, workdir: str, held: lock.Lock, progress: Optional[bool], log,
                 teacher_dir: str) -> dict:
  from minilm_jax import plots
  a_cfg, s_cfg = stages
  a_dir = wd.join(workdir, wd.ASSISTANT)
  log(f"stage 1/2: teacher -> assistant ({a_cfg.student.num_layers}x{a_cfg.student.hidden_size}) "
      f"in {a_dir}")
  first = _train_stage(a_cfg, a_dir, progress, log, held, teacher_dir)
  if first["preempted"]:
    return first
  if jax.process_count() > 1:  # host 0 wrote the assistant's export; the others read it next
    from jax.experimental.multihost_utils import sync_global_devices
    sync_global_devices("minilm_jax_assistant_exported")
  s_cfg.teacher = first["student_dir"]
  log(f"stage 2/2: assistant -> student in {workdir}")
  second = _train_stage(s_cfg, workdir, progress, log, held)
  if not second["preempted"] and jax.process_index() == 0:
    local, a_local = wd.local_dir(workdir), wd.local_dir(a_dir)
    plots.loss_curves({"teacher -> assistant": os.path.join(a_local, wd.METRICS),
                       "assistant -> student": os.path.join(local, wd.METRICS)},
                      os.path.join(local, wd.CHAIN_PLOT), "MiniLM teaching-assistant chain")
    wd.sync(workdir, local, [wd.CHAIN_PLOT])
  return {**second, "assistant_dir": first["student_dir"]}


@dataclasses.dataclass
class _Run:
  """What the loop works with besides the train state: one stage's setup, data and places."""
  cfg: Any
  s: Setup
  rows: Any                 # the packed token rows (shards.Rows, memory-mapped)
  mngr: Any                 # the Orbax CheckpointManager
  meta: dict                # saved with every checkpoint: the run's identity (config.check_resume)
  workdir: str              # where the checkpoints go (local or gs://)
  local: str                # where metrics, events and the export are written (wd.local_dir)
  progress: bool
  log: Callable[[str], None]
  lock: lock.Lock           # the workdir's: checked before each checkpoint

  def sync_up(self, names=(wd.METRICS, wd.EVENTS)) -> None:
    wd.sync(self.workdir, self.local, list(names))


def prepare_data(cfg, tokenizer_dir: str, workdir: str, progress: bool = False,
                 log: Callable[[str], None] = print) -> str:
  """The run's token shards (made once, in data.num_proc processes, split over the hosts that share the
  cache): their folder, under data.cache_dir or WORKDIR/cache."""
  return shards.prepare(cfg.data.source, tokenizer_dir, cfg.data.max_len,
                        cfg.data.cache_dir or wd.join(workdir, wd.TOKEN_CACHE),
                        text_field=cfg.data.text_field, hub_config=cfg.data.hub_config,
                        split=cfg.data.split, num_proc=cfg.data.num_proc, progress=progress,
                        hosts=sharding.hosts(), log=log)


def _fits(layers: Optional[list], teacher_layers: int, student_layers: int) -> bool:
  """Whether `layers` can start this student: a recorded choice of another shape is the resume's to
  refuse (check_resume), with its own error, not setup's to crash on."""
  return (layers is not None and len(layers) == student_layers
          and all(0 <= i < teacher_layers for i in layers))


def recorded_init_layers(workdir: str) -> Optional[list]:
  """The teacher layers student.init "best" chose when the run in `workdir` began (its newest readable
  checkpoint's record), or None for a new run. A resume takes them rather than choosing again: the
  minute is not spent twice, and the record stays what the student started from, even where the
  choice's near-ties would fall the other way on another machine."""
  from minilm_jax.evaluation import runs
  mngr = runs.open_checkpoints(workdir)
  if mngr is None:
    return None
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return checkpoint.read_meta(mngr, step).get("student_init_layers")
      except Exception:  # Orbax raises many types for a damaged step: restore_latest reports it
        continue
    return None
  finally:
    mngr.close()


def _train_stage(cfg, workdir: str, progress: Optional[bool] = None,
                 log: Callable[[str], None] = print, held: Optional[lock.Lock] = None,
                 teacher_dir: Optional[str] = None) -> dict:
  """One distillation run, teacher to student, in `workdir` (layout: workdir.py); the teacher from
  `teacher_dir` (cfg.teacher already resolved to a local folder) where given, else from cfg.teacher.

  Writes checkpoints (Orbax), metrics.jsonl, tb/ (TensorBoard), and at the end student/ (an HF folder
  with flax_params.msgpack and a model card) and loss.png. Returns a summary dict.
  """
  from transformers import AutoTokenizer
  from minilm_jax import plots
  if progress is None:
    progress = sys.stderr.isatty()
  check_ranges(cfg)  # before the workdir is made: a bad value leaves nothing behind
  wd.check_writable(workdir)
  local = wd.local_dir(workdir)
  os.makedirs(local, exist_ok=True)
  teacher = None if teacher_dir is None else (teacher_dir, *hf.load_pretrained(teacher_dir))
  s = setup(cfg, teacher, log=log,
            init_layers=recorded_init_layers(workdir) if cfg.student.init == "best" else None)
  hf.tokenizer_files(s.teacher_dir)  # none: a one-line error, not a run on [UNK]s
  tok = AutoTokenizer.from_pretrained(s.teacher_dir)
  if len(tok) > s.teacher_config.vocab_size:
    raise ValueError(f"the tokenizer in {s.teacher_dir} has {len(tok)} tokens, but the teacher's "
                     f"embeddings have {s.teacher_config.vocab_size} rows")
  rows = shards.Rows(prepare_data(cfg, s.teacher_dir, workdir, progress, log))
  meta = {"teacher": teacher_identity(s.teacher_dir, s.teacher_config),
          "student_config": s.student_config.to_dict(),
          "config": json.loads(json.dumps(cfg.to_dict())),  # as a checkpoint reads it back
          "data_order": data.ORDER}
  if s.init_layers is not None:  # what a "best" init chose, for minilm-eval to name
    meta["student_init_layers"] = s.init_layers

  mngr = checkpoint.make_manager(wd.join(workdir, wd.CHECKPOINTS), cfg.checkpoint_every,
                                 cfg.keep_checkpoints, cfg.keep_every)
  run = _Run(cfg, s, rows, mngr, meta, workdir, local, progress, log, held or lock.Lock(workdir))
  metrics_path = os.path.join(local, wd.METRICS)
  try:
    state, saved, start = checkpoint.restore_latest(mngr, abstract_state(s),
                                                    lambda saved: check_resume(saved, meta))
    if state is None:
      state, start = s.init_state(), 0
    else:
      log(f"resuming from step {start} in {workdir}")
      if saved.get("data_order") != data.ORDER:
        log(f"warning: this run was started by an earlier minilm_jax, whose batches came in another "
            f"order; from step {start} on they follow this version's order (the same corpus)")
      wd.sync(workdir, local, [wd.METRICS, wd.EVENTS], down=True)
    wd.trim_metrics(metrics_path, start)
    status = _loop(run, state, start)
  except BaseException:
    _finish_saves(mngr, quiet=True)
    raise
  _finish_saves(mngr)
  if status["preempted"]:
    return status
  state = status.pop("state")
  student_dir = os.path.join(local, wd.STUDENT)
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
          card.eval_table(wd.eval_dir(workdir))))
      plots.loss_curve(metrics_path, os.path.join(local, wd.LOSS_PLOT))
      run.sync_up([wd.METRICS, wd.EVENTS, wd.LOSS_PLOT, wd.STUDENT])
    except OSError as e:  # the full disk can also come after the last save: rerunning exports again
      raise WorkdirWriteError(f"writing the student to {student_dir} failed ({e}); the checkpoints are "
                              f"intact (latest complete: step {status['step']}); free space and rerun "
                              "the same command to export it") from e
    student_dir = wd.join(workdir, wd.STUDENT)
    log(f"student written to {student_dir}")
  return {**status, "student_dir": student_dir}


def _finish_saves(mngr, quiet: bool = False) -> None:
  """Wait for the last async save, then close the manager: never exit with a save half done. A save
  that fails only here (a full disk, CI saw one) is a WorkdirWriteError; with `quiet` it is dropped, as
  the error already on its way out says more (a save failing at step k often fails k+1 too)."""
  try:
    try:
      mngr.wait_until_finished()
    finally:
      mngr.close()
  except Exception as e:
    if not quiet:
      raise WorkdirWriteError(f"finishing the last checkpoint save failed ({e}); earlier checkpoints "
                              f"are intact (latest complete: step {mngr.latest_step()})") from e


def _loop(run: _Run, state, start: int) -> dict:
  """The steps from `start` to cfg.steps: log, checkpoint, stop cleanly on a signal or preemption."""
  cfg, s, mngr = run.cfg, run.s, run.mngr
  metrics_path = os.path.join(run.local, wd.METRICS)
  from tqdm.auto import tqdm
  from tensorboardX import SummaryWriter
  tokens_per_step = cfg.batch_size * cfg.data.max_len
  make_batch = lambda step: data.host_batch(run.rows, step, cfg.batch_size, cfg.seed, jax.process_index(),
                                            jax.process_count())
  bar = tqdm(total=cfg.steps, initial=start, desc="distilling", unit="step", disable=not run.progress,
             dynamic_ncols=True)
  writer = SummaryWriter(os.path.join(run.local, wd.EVENTS), purge_step=start) \
      if jax.process_index() == 0 else None
  last_t, last_step, last = time.time(), start, None
  step_meta = lambda step: {**run.meta, "step": step, "data_position": step * cfg.batch_size}

  def check_finite(state, step):
    bad, first = int(state.nonfinite), int(state.first_nonfinite)
    if bad > cfg.max_nonfinite_steps:
      raise NonFiniteLossError(
          f"the loss or gradient was NaN/Inf at step {first + 1} ({bad} such steps, "
          f"max_nonfinite_steps={cfg.max_nonfinite_steps}); the last good checkpoint is step "
          f"{mngr.latest_step()}")

  try:
    with _StopFlag() as stop, open(metrics_path if jax.process_index() == 0 else os.devnull,
                                   "a") as mfile, \
        contextlib.closing(data.prefetch(make_batch, start, cfg.steps)) as batches:
      for i, batch in batches:
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
          run.lock.check()  # a gs:// lease taken over: write nothing more
          try:
            checkpoint.save(mngr, step, state, step_meta(step), force=True)
            if writer is not None:
              writer.flush()
            run.sync_up()
          except Exception as e:  # a failed async save surfaces here (or at the final wait)
            raise WorkdirWriteError(f"saving the checkpoint at step {step} failed ({e}); earlier "
                                    f"checkpoints are intact (latest complete: step {mngr.latest_step()})"
                                    ) from e
        if preempted and step < cfg.steps:
          mngr.wait_until_finished()
          run.log(f"stopped by {stop.signal or 'preemption'} at step {step}; checkpoint saved; "
              "rerun the same command to resume")
          return {"preempted": True, "step": step, "last": last}
  except WorkdirWriteError:
    raise
  except OSError as e:
    # e.g. a full disk while writing metrics or events: say where, and what is safe.
    raise WorkdirWriteError(f"writing to {run.local} failed near step {bar.n} ({e}); earlier checkpoints "
                            f"are intact (latest complete: step {mngr.latest_step()})") from e
  finally:
    bar.close()
    if writer is not None:
      try:
        writer.close()
      except OSError:
        pass  # a full disk: never mask the error that brought us here
  if start >= cfg.steps:
    run.log(f"already trained to step {start}")
  return {"preempted": False, "step": max(start, cfg.steps), "last": last, "state": state}
