"""Benchmark of the real distillation step (the one the trainer jits), after compilation.

  python -m minilm_jax.bench --teacher DIR --student-layers 3 --student-hidden 384 --student-heads 12 \
      --batch 32 --seq 128 --loss v2 --relation-heads 12 [--precision bfloat16] [--steps 10] \
      [--random-teacher-layers L] [--attention auto|reference|xla|cudnn|pallas] [--cpu-devices N]

Prints one JSON line: tokens_per_s, step_ms, model_flops_per_step, achieved_flops_per_s,
peak_flops_per_s, mfu, peak_memory_bytes (and how each was obtained).
- FLOPs are matmul FLOPs of the work MiniLM needs (MaxText's convention, ../shared/design/anchors.md):
  the teacher 1× forward up to the Q/K/V of the distilled layer, the student 3× forward up to the Q/K/V of
  its last layer, the relation logits (teacher 1×, student 3×); 2 FLOPs per multiply-add.
- The peak on CPU is measured in the same run (best of jitted fp32 matmuls of 1024² and 2048²); on GPU/TPU
  it is the chip's published dense bf16 peak (fp32 runs are still divided by that peak).
- peak_memory_bytes is the device's peak_bytes_in_use where the backend reports it (GPU/TPU), else the
  compiled step's arguments + outputs + temporaries from XLA's memory analysis (CPU).
- --attention forces the attention of teacher and student (train.attention_implementation, replaced for
  the run): "reference" (model.attention), "xla" or "cudnn" (jax.nn.dot_product_attention's), "pallas"
  (train.tpu_attention); "auto" (default) keeps the trainer's choice for the platform and precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import xla_flags

# Published dense bf16 peaks, FLOP/s per chip.
PUBLISHED_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                   "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12,
                   "H200": 989e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12}


def layer_forward_flops(batch: int, seq: int, hidden: int, intermediate: int, ffn_matrices: int = 2,
                        keys: int = 0) -> int:
  """One encoder layer's forward: Q/K/V/output projections 4H², FFN ffn_matrices·H·I per token (2; 3 for
  ModernBERT's GeGLU), and non-causal attention scores and context 4·keys·H per token (keys: T, or a
  local layer's window)."""
  return (2 * batch * seq * (4 * hidden ** 2 + ffn_matrices * hidden * intermediate)
          + 4 * batch * seq * (keys or seq) * hidden)


def model_layer_flops(config, batch: int, seq: int, layer: int) -> int:
  """layer_forward_flops of layer `layer` of a BertConfig or ModernBertConfig."""
  from minilm_jax import modernbert
  if not modernbert.is_modernbert(config):
    return layer_forward_flops(batch, seq, config.hidden_size, config.intermediate_size)
  local = config.layer_types[layer] == modernbert.SLIDING
  keys = min(seq, config.local_attention + 1) if local else seq
  return layer_forward_flops(batch, seq, config.hidden_size, config.intermediate_size, 3, keys)


def step_flops(tcfg, scfg, *, batch, seq, teacher_layer, relations=3, terms=("relations",)) -> int:
  """minilm_flops_per_step for any family: per layer, so local attention and GeGLU count as they are.
  teacher_layer: 0-based ℓ. terms (objective.py) set how far each model runs: with the relations alone
  the teacher stops at ℓ's Q/K/V and the student at its last Q/K/V; "hidden" runs the teacher through ℓ,
  "embedding" through its last layer, and either runs the whole student."""
  qkv = lambda h: 2 * batch * seq * 3 * h * h
  layers = lambda c, n: sum(model_layer_flops(c, batch, seq, i) for i in range(n))
  if "embedding" in terms:
    teacher = layers(tcfg, tcfg.num_hidden_layers)
  elif "hidden" in terms:
    teacher = layers(tcfg, teacher_layer + 1)
  else:
    teacher = layers(tcfg, teacher_layer) + qkv(tcfg.hidden_size)
  full_student = "hidden" in terms or "embedding" in terms
  student = layers(scfg, scfg.num_hidden_layers) if full_student \
      else layers(scfg, scfg.num_hidden_layers - 1) + qkv(scfg.hidden_size)
  logits = relations * 2 * batch * seq ** 2 * (tcfg.hidden_size + 3 * scfg.hidden_size) \
      if "relations" in terms else 0
  return int(teacher + 3 * student + logits)


def minilm_flops_per_step(*, batch, seq, teacher_layers, teacher_hidden, teacher_intermediate,
                          student_layers, student_hidden, student_intermediate, relations=3) -> int:
  """Matmul FLOPs one distillation step needs. `teacher_layers` counts layers up to and including the
  distilled one; `relations` is 3 for v2 (QQ, KK, VV) and 2 for v1 (QK, VV)."""
  qkv = lambda h: 2 * batch * seq * 3 * h * h
  teacher = (teacher_layers - 1) * layer_forward_flops(batch, seq, teacher_hidden, teacher_intermediate) \
      + qkv(teacher_hidden)
  student = (student_layers - 1) * layer_forward_flops(batch, seq, student_hidden, student_intermediate) \
      + qkv(student_hidden)
  logits = relations * 2 * batch * seq ** 2 * (teacher_hidden + 3 * student_hidden)
  return int(teacher + 3 * student + logits)


def measured_cpu_peak(reps: int = 5) -> float:
  """Best FLOP/s of jitted fp32 square matmuls on this machine, now."""
  best = 0.0
  for n in (1024, 2048):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    for _ in range(reps):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
  return best


def peak_flops() -> tuple:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return measured_cpu_peak(), "measured: best jitted fp32 matmul (1024², 2048²)"
  for name, peak in PUBLISHED_PEAKS.items():
    if name.lower() in dev.device_kind.lower():
      return peak * jax.device_count(), f"published bf16 peak of {dev.device_kind} × {jax.device_count()}"
  raise ValueError(f"no published peak for {dev.device_kind}; add it to PUBLISHED_PEAKS")


def make_batch(batch: int, seq: int, vocab: int, padded_fraction: float, seed: int = 0) -> dict:
  """Random ids with [CLS] first; the first `padded_fraction` of the rows have their second half padded."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, seq)).astype(np.int32)
  ids[:, 0] = 101 if vocab > 101 else 1
  mask = np.ones((batch, seq), np.int32)
  mask[:int(round(batch * padded_fraction)), seq // 2:] = 0
  return {"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask}


ATTENTIONS = ("auto", "reference", "xla", "cudnn", "pallas")


def forced_attention(name: str):
  """A stand-in for train.attention_implementation(precision, platform, mesh) that always picks `name`."""
  def choose(precision, platform=None, mesh=None, *args, **kwargs):
    from minilm_jax import train
    if name == "pallas":
      return functools.partial(train.tpu_attention, mesh)
    return None if name == "reference" else name
  return choose


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--teacher", required=True, help="HF folder or hub id")
  p.add_argument("--student-layers", type=int, default=3)
  p.add_argument("--student-hidden", type=int, default=384)
  p.add_argument("--student-heads", type=int, default=12)
  p.add_argument("--student-intermediate", type=int, default=0, help="default: 4 × hidden")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--loss", choices=("v1", "v2"), default="v2")
  p.add_argument("--relation-heads", type=int, default=12)
  p.add_argument("--teacher-layer", type=int, default=-1)
  p.add_argument("--chunk-heads", type=int, default=0, help="0: automatic; = relation heads: direct")
  p.add_argument("--block-keys", type=int, default=0, help="0: automatic; n: the blockwise relation KL, "
                 "n keys at a time")
  p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--padded-fraction", type=float, default=0.25)
  p.add_argument("--random-teacher-layers", type=int, default=0,
                 help="a random teacher of this depth, with the --teacher's widths and max(seq, its) "
                      "positions, instead of its weights")
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="XLA:CPU devices to split a CPU-only host into, as the trainer does "
                      "(parallel.cpu_devices): 0, one per usable core that splits the batch; 1, one")
  p.add_argument("--attention", choices=ATTENTIONS, default="auto",
                 help="the attention implementation (module docstring); auto: the trainer's")
  p.add_argument("--compile-only", action="store_true",
                 help="compile and report XLA's memory analysis without running (for shapes that may "
                      "not fit)")
  return p.parse_args(argv)


def run(args) -> dict:
  from minilm_jax import config, hf, modernbert, sharding, train
  from minilm_jax.families import encoder_for
  teacher_dir = hf.resolve(args.teacher)
  tcfg = hf.load_config(teacher_dir)
  if args.random_teacher_layers:
    tcfg = dataclasses.replace(tcfg, max_position_embeddings=max(args.seq, tcfg.max_position_embeddings))
    depth = {"num_hidden_layers": args.random_teacher_layers}
    if modernbert.is_modernbert(tcfg):  # its layer pattern follows the depth (checked with it: one replace)
      depth["layer_types"] = modernbert.every_nth_global(args.random_teacher_layers, tcfg.global_every or 3)
    tcfg = dataclasses.replace(tcfg, **depth)
    tparams = jax.device_get(encoder_for(tcfg).init_params(jax.random.key(1)))
  else:
    tcfg, tparams = hf.load_pretrained(teacher_dir)
  cfg = config.default_config()
  cfg.teacher = teacher_dir
  cfg.student.update(num_layers=args.student_layers, hidden_size=args.student_hidden,
                     num_heads=args.student_heads,
                     intermediate_size=args.student_intermediate or 4 * args.student_hidden)
  cfg.loss.update(version=args.loss, relation_heads=args.relation_heads, teacher_layer=args.teacher_layer,
                  chunk_heads=args.chunk_heads, block_keys=args.block_keys)
  cfg.data.max_len = args.seq
  cfg.batch_size = args.batch
  cfg.steps = 1_000_000  # the schedule's length does not change the cost
  cfg.precision = args.precision
  cfg.parallel.fsdp = args.fsdp
  attention = getattr(args, "attention", "auto")  # callers may build args without the flag
  if attention == "auto":
    s = train.setup(cfg, teacher=(teacher_dir, tcfg, tparams))
  else:  # setup builds the models with the chosen attention; the step traced later keeps it
    with mock.patch.object(train, "attention_implementation", forced_attention(attention)):
      s = train.setup(cfg, teacher=(teacher_dir, tcfg, tparams))
  batch = sharding.put_batch(s.mesh, make_batch(args.batch, args.seq, tcfg.vocab_size,
                                                args.padded_fraction))
  state = s.init_state()
  t0 = time.perf_counter()
  compiled = s.step.lower(state, s.teacher_params, batch).compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  analysed = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
  if args.compile_only:
    return {"impl": "minilm_jax", "batch": args.batch, "seq": args.seq, "relation_heads":
            args.relation_heads, "chunk_heads": args.chunk_heads, "block_keys": args.block_keys,
            "compiled_memory_bytes": analysed,
            "temp_bytes": int(m.temp_size_in_bytes), "compile_s": compile_s}
  for _ in range(args.warmup):
    state, metrics = compiled(state, s.teacher_params, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):  # no host sync inside the loop
    state, metrics = compiled(state, s.teacher_params, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / args.steps

  flops = step_flops(tcfg, s.student_config, batch=args.batch, seq=args.seq,
                     teacher_layer=s.teacher_layer, relations=3 if args.loss == "v2" else 2)
  peak, peak_source = peak_flops()
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    mem, mem_source = int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  else:
    mem = analysed
    mem_source = "XLA memory analysis: arguments + outputs + temporaries"
  return {
      "impl": "minilm_jax", "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "batch": args.batch, "seq": args.seq, "loss_version": args.loss,
      "relation_heads": args.relation_heads, "precision": args.precision, "attention": attention,
      "tokens_per_s": args.batch * args.seq / step_s, "step_ms": 1e3 * step_s,
      "model_flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
      "peak_flops_per_s": peak, "peak_source": peak_source, "mfu": flops / step_s / peak,
      "peak_memory_bytes": mem, "memory_source": mem_source, "compile_s": compile_s,
      "loss": float(metrics["loss"]), "chunk_heads": args.chunk_heads, "block_keys": args.block_keys,
  }


def main(argv=None):
  args = parse_args(argv)
  # Before anything asks JAX for devices: XLA:CPU reads XLA_FLAGS once.
  xla_flags.skip_absent_tpu()
  xla_flags.set_cpu_devices(args.cpu_devices or xla_flags.cpu_device_count(args.batch, args.fsdp))
  print(json.dumps(run(args)))


if __name__ == "__main__":
  main()
