"""Ahead-of-time: the trainer's step of a config, compiled for an accelerator that is not here.

  minilm-compile --config configs/v2_bert_base_6x384.py --target v4-32 [--config.KEY=VALUE ...]

The step is built by `train.setup`, the same as the trainer's, for the devices of the target
(targets.py) and from shapes alone: only the teacher's config.json is read (a local folder, a copy
shipped for the recipes' teachers, or the hub), never its weights, tokenizer or data. XLA then runs the
target's whole compiler, and the compiled program tells:
- memory per device (`memory_analysis`: arguments + outputs − donated + temporaries), against the chip's
  HBM;
- the compiler's own cost model of one step (`cost_analysis()["optimal_seconds"]`, TPU only; XLA:GPU has
  none). XLA:TPU's model charges −1 s for each custom call it cannot cost (the `ConcatBitcast` of its
  memory-space assignment), so the raw figure comes out negative; one second per such call is added back,
  as MaxText's train_compile does;
- the collectives, and where the step's bytes go (hlo.top_traffic: the program's sources that read and
  write the most), from the optimised HLO (hlo.py);
- tokens/s, MFU (bench.step_flops, the FLOPs MiniLM needs, over the chip's dense bf16 peak) and the time
  and chip-hours of the config's whole token budget, from that step estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
from importlib import resources
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from minilm_jax import bench, hf, hlo, objective, remote, sharding, targets

# Custom calls that XLA:TPU's cost model charges −1 s each (see the module docstring).
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)


class DoesNotFit(ValueError):
  """The step needs more memory per device than the target's chips have."""


def teacher_folder(teacher: str) -> str:
  """A folder holding the teacher's config.json (and, where it has them, its sentence-transformers
  modules): the teacher's own folder, the package's copy of a recipe teacher's config, or the config
  files alone from the hub."""
  if os.path.isdir(teacher) or "://" in teacher:
    return remote.resolve(teacher)
  shipped = resources.files("minilm_jax").joinpath("teacher_configs", teacher.replace("/", "--"))
  if shipped.is_dir():
    return str(shipped)
  if teacher in remote.PACKAGED:
    try:
      return remote.packaged_teacher_path()
    except FileNotFoundError:
      pass
  try:
    from huggingface_hub import hf_hub_download
    folder = os.path.dirname(hf_hub_download(teacher, "config.json"))
  except Exception as e:  # offline, unknown id, gated: say which and why
    raise FileNotFoundError(f"{teacher}: not a local folder, and its config.json could not be fetched "
                            f"from the hub ({type(e).__name__}); give a folder that holds it") from None
  for name in ("modules.json", "1_Pooling/config.json"):
    try:
      hf_hub_download(teacher, name)
    except Exception:
      pass  # not a sentence-transformers model: setup says so if the config needs one
  return folder


def step_args(s) -> tuple:
  """ShapeDtypeStructs (with shardings) of the step's arguments: state, teacher params, batch."""
  from minilm_jax import train
  batch = jax.ShapeDtypeStruct((s.cfg.batch_size, s.cfg.data.max_len), jnp.int32,
                               sharding=sharding.batch_sharding(s.mesh))
  return train.abstract_state(s), s.teacher_params, {"input_ids": batch, "attention_mask": batch}


@dataclasses.dataclass
class Compiled:
  """A config's step compiled for a target, and what it took."""
  cfg: Any
  target: targets.Target
  setup: Any            # train.Setup (shapes only)
  compiled: Any         # jax.stages.Compiled
  compile_s: float

  @property
  def hlo_text(self) -> str:
    return self.compiled.as_text()


def compile_step(cfg, target: str) -> Compiled:
  """Build the trainer's step of `cfg` for `target` (a name, targets.py) and compile it there."""
  import time
  from minilm_jax import config, train
  config.check_ranges(cfg)
  if cfg.parallel.mode != "jit":
    raise ValueError(f"parallel.mode {cfg.parallel.mode!r}: minilm-compile compiles the 'jit' step")
  t = targets.parse(target)
  folder = teacher_folder(cfg.teacher)
  s = train.setup(cfg, teacher=(folder, hf.load_config(folder), None), devices=targets.devices(t))
  t0 = time.perf_counter()
  lowered = s.step.lower(*step_args(s))
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA:TPU refuses a program whose buffers exceed HBM. Its status code, the message's first word,
    # is the only structured field a compile error carries.
    if not str(e).startswith("RESOURCE_EXHAUSTED"):
      raise
    raise refusal(str(e).splitlines()[0], cfg, t) from None
  return Compiled(cfg, t, s, compiled, time.perf_counter() - t0)


class OutOfVmem(RuntimeError):
  """The step asks a core's vector memory (VMEM) for more than it has: no batch or model size causes
  that, a kernel's blocks or a compiler flag do."""


def refusal(first_line: str, cfg, t) -> Exception:
  """The error for XLA:TPU's RESOURCE_EXHAUSTED `first_line`: DoesNotFit (with what to change) when HBM
  ran out; OutOfVmem when the message names VMEM, the one memory space whose overflow the batch does not
  decide (a 2 MiB all-reduce piece did it, xla_flags.py)."""
  if "memory space vmem" in first_line.lower():
    return OutOfVmem(f"XLA:TPU ran out of VMEM compiling the step for {t.name} ({first_line}): a Pallas "
                     "kernel's blocks or a flag in LIBTPU_INIT_ARGS ask for more vector memory than a "
                     "core has; a smaller batch will not help, so please report it")
  return DoesNotFit(f"the step does not fit on {t.name} ({first_line}): "
                    f"{_what_to_change(cfg, t.num_devices)}")


def _what_to_change(cfg, devices: int, over: int = 2) -> str:
  per_device = cfg.batch_size // (devices * cfg.grad_accum)
  return (f"set --config.grad_accum={cfg.grad_accum * over} (a micro-batch of "
          f"{max(per_device // over, 1)} per device), or --config.parallel.fsdp to shard the weights, or "
          "use a larger slice or a shorter data.max_len")


def memory_per_device(compiled) -> int:
  """Bytes one device holds while the step runs: its arguments, outputs not donated, temporaries."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def step_seconds(compiled, hlo_text: str) -> Optional[float]:
  """XLA's cost-model estimate of one step, corrected for uncosted custom calls; None without one."""
  cost = compiled.cost_analysis() or {}
  if "optimal_seconds" not in cost:
    return None
  calls = hlo.custom_call_targets(hlo_text)
  corrected = float(cost["optimal_seconds"]) + sum(calls[name] for name in UNCOSTED_CUSTOM_CALLS)
  return corrected if corrected > 0 else None


def report(c: Compiled) -> Dict[str, Any]:
  """The figures minilm-compile prints (its JSON line)."""
  cfg, t, s = c.cfg, c.target, c.setup
  text = c.hlo_text
  mem = memory_per_device(c.compiled)
  step_s = step_seconds(c.compiled, text)
  cost = c.compiled.cost_analysis() or {}
  tokens = cfg.batch_size * cfg.data.max_len
  flops = bench.step_flops(s.teacher_config, s.student_config, batch=cfg.batch_size,
                           seq=cfg.data.max_len, teacher_layer=s.teacher_layer,
                           relations=3 if cfg.loss.version == "v2" else 2,
                           terms=objective.terms_of(cfg))
  budget_s = step_s * cfg.steps if step_s else None
  return {
      "target": t.name, "platform": t.platform, "devices": t.num_devices,
      "device_kind": s.mesh.devices.flat[0].device_kind,
      "batch_size": cfg.batch_size, "seq": cfg.data.max_len, "precision": cfg.precision,
      "fsdp": cfg.parallel.fsdp, "grad_accum": cfg.grad_accum,
      "memory_per_device_bytes": mem, "hbm_bytes": t.hbm_bytes, "fits": mem <= t.hbm_bytes,
      "hbm_spare": 1 - mem / t.hbm_bytes,
      "step_seconds_estimate": step_s,
      "tokens_per_s_estimate": tokens / step_s if step_s else None,
      "model_flops_per_step": flops,
      "mfu_estimate": flops / (step_s * t.num_devices * t.peak_flops) if step_s else None,
      "xla_flops_per_device": cost.get("flops"), "hbm_bytes_accessed_per_device": cost.get("bytes accessed"),
      "collectives": hlo.collectives(text),
      "top_traffic": [[name, b] for name, b in hlo.top_traffic(text, 8)],
      "steps": cfg.steps, "tokens": tokens * cfg.steps,
      "budget_hours": budget_s / 3600 if budget_s else None,
      "budget_chip_hours": budget_s * t.num_devices / 3600 if budget_s else None,
      "compile_s": round(c.compile_s, 1),
  }


def check_fits(c: Compiled, r: Dict[str, Any]) -> None:
  """DoesNotFit, naming what to change, when the step needs more than the chips' HBM."""
  if r["fits"]:
    return
  need, have = r["memory_per_device_bytes"], r["hbm_bytes"]
  raise DoesNotFit(f"the step needs {need / targets.GiB:.1f} GiB per device and {r['target']} has "
                   f"{have / targets.GiB:.1f} GiB: "
                   f"{_what_to_change(c.cfg, r['devices'], math.ceil(need / have))}")


def table(r: Dict[str, Any]) -> str:
  """A short human-readable summary of `report`."""
  gib = lambda b: f"{b / targets.GiB:.2f} GiB"
  est = lambda v, fmt: fmt.format(v) if v is not None else "— (no cost model for this target)"
  rows = [
      ("target", f"{r['target']}: {r['devices']} × {r['device_kind']}"),
      ("step", f"batch {r['batch_size']} × {r['seq']} tokens, {r['precision']}, fsdp={r['fsdp']}, "
               f"grad_accum={r['grad_accum']}"),
      ("memory per device", f"{gib(r['memory_per_device_bytes'])} of {gib(r['hbm_bytes'])} "
                            f"({'fits' if r['fits'] else 'DOES NOT FIT'}, {r['hbm_spare']:.0%} spare)"),
      ("compiler's step", est(r["step_seconds_estimate"], "{:.4f} s")),
      ("tokens/s", est(r["tokens_per_s_estimate"], "{:,.0f}")),
      ("MFU", est(r["mfu_estimate"], "{:.2f}")),
      ("collectives", ", ".join(f"{k} ×{v['count']} (largest {v['largest_bytes'] / 2**20:.1f} MiB)"
                                for k, v in r["collectives"].items()) or "none"),
      ("whole budget", est(r["budget_hours"], "{:.3g} h") + (
          f", {r['budget_chip_hours']:.3g} chip-hours ({r['steps']:,} steps, {r['tokens']:.3g} tokens)"
          if r["budget_hours"] is not None else "")),
  ]
  rows += [("top traffic" if i == 0 else "", f"{b / 1e9:6.2f} GB  {name}")
           for i, (name, b) in enumerate(r["top_traffic"][:5])]
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
