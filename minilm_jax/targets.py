"""Accelerators to compile for without having one: Cloud TPU slices and NVIDIA GPUs by name.

A target name is what Cloud TPU and GPU users say: `v4-32` (TensorCores, as `gcloud` names v4 and v5p
slices: 16 chips), `v5e-16` and `v6e-8` (chips), `v5p-8`, and `h100`, `h200`, `a100` (one GPU) or
`h100x8` (eight on one host). `devices(target)` gives that hardware's devices as XLA sees it (libtpu's or
the CUDA plugin's compile-only topology, jax.experimental.topologies), so `jax.jit(...).lower(...)
.compile()` runs the target's whole compiler here. The figures below are the vendors' published
per-chip numbers: HBM, dense bf16 peak, HBM bandwidth. A v4/v5p chip's two TensorCores are one device
(megacore), as on the real slices.
"""

from __future__ import annotations

import dataclasses
import os
import re
from importlib import resources
from typing import Any, List

from minilm_jax import xla_flags

GiB = 1 << 30

# family: (chips per slice name unit, HBM bytes, bf16 FLOP/s, HBM bytes/s) per chip; v4 and v5p count
# TensorCores (2 a chip) in their names, v5e and v6e count chips.
_TPU = {
    "v4": dict(cores_per_chip=2, hbm=32 * GiB, peak=275e12, bandwidth=1228e9, topology="v4"),
    "v5p": dict(cores_per_chip=2, hbm=95 * GiB, peak=459e12, bandwidth=2765e9, topology="v5"),
    "v5e": dict(cores_per_chip=1, hbm=16 * GiB, peak=197e12, bandwidth=819e9, topology="v5e"),
    "v6e": dict(cores_per_chip=1, hbm=32 * GiB, peak=918e12, bandwidth=1640e9, topology="v6e"),
}
# Chips -> the slice's chip grid (Cloud TPU's own topologies for these sizes).
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

# GPUs: dense bf16 peak (SXM parts); the rest (HBM size and bandwidth) is read from the target config
# that XLA:GPU compiles for, gpu_specs/NAME.txtpb.
_GPU_PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
_PER_HOST_GPUS = (1, 2, 4, 8)


class UnknownTarget(ValueError):
  """A target name this module does not know."""


class MissingCompiler(ImportError):
  """The target's compiler (libtpu, or the CUDA plugin) is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str          # "tpu" or "gpu"
  num_devices: int
  hbm_bytes: int         # per device
  peak_flops: float      # dense bf16 FLOP/s per device
  hbm_bandwidth: float   # bytes/s per device
  topology: str          # TPU: "v4:2x2x4"; GPU: "1x1x8" (slices x hosts x GPUs)
  gpu: str = ""          # GPU: its name in gpu_specs/


def known() -> List[str]:
  """Example target names, smallest slice of each family first (the CLI's help lists them)."""
  tpu = [f"{f}-{c * p['cores_per_chip']}" for f, p in _TPU.items()
         for c in sorted(_GRID_3D if p["cores_per_chip"] == 2 else _GRID_2D)]
  return tpu + list(_GPU_PEAK) + [f"{g}x{n}" for g in _GPU_PEAK for n in _PER_HOST_GPUS[1:]]


def parse(name: str) -> Target:
  """The Target of a name; UnknownTarget (a ValueError) naming the accepted forms otherwise."""
  n = name.strip().lower()
  m = re.fullmatch(r"(h100|h200|a100)(?:x(\d+))?", n)
  if m:
    gpu, count = m.group(1), int(m.group(2) or 1)
    if count not in _PER_HOST_GPUS:
      raise UnknownTarget(f"target {name!r}: one host holds {', '.join(map(str, _PER_HOST_GPUS))} GPUs")
    spec = _gpu_spec(gpu)
    field = lambda key: float(re.search(rf"\b{key}: ([0-9.e+]+)", spec).group(1))
    return Target(n, "gpu", count, int(field("device_memory_size")), _GPU_PEAK[gpu],
                  field("memory_bandwidth"), f"1x1x{count}", gpu)
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", n)
  if not m:
    raise UnknownTarget(f"target {name!r}: use a TPU slice (v4-8 ... v4-2048, v5p-8 ..., v5e-1 ... "
                        "v5e-256, v6e-1 ... v6e-256) or a GPU (h100, h200, a100, or h100x8 for 8 on "
                        "one host)")
  family = "v5e" if m.group(1) == "v5litepod" else m.group(1)
  p, size = _TPU[family], int(m.group(2))
  chips, rem = divmod(size, p["cores_per_chip"])
  grids = _GRID_3D if p["cores_per_chip"] == 2 else _GRID_2D
  if rem or chips not in grids:
    sizes = ", ".join(f"{family}-{c * p['cores_per_chip']}" for c in sorted(grids))
    raise UnknownTarget(f"target {name!r}: {family} slices here are {sizes}")
  return Target(f"{family}-{size}", "tpu", chips, p["hbm"], p["peak"], p["bandwidth"],
                f"{p['topology']}:{grids[chips]}")


def _gpu_spec(gpu: str) -> str:
  """The GpuTargetConfig text proto of a GPU (what XLA:GPU would read off the card)."""
  return resources.files("minilm_jax").joinpath("gpu_specs", f"{gpu}.txtpb").read_text()


def devices(target: Target) -> List[Any]:
  """The target's devices, for a Mesh to compile for (never to run on). MissingCompiler when its
  compiler is not installed: libtpu (`pip install 'minilm-jax[tpu]'`) or the CUDA plugin
  (`pip install 'minilm-jax[cuda]'`)."""
  from jax.experimental import topologies
  if target.platform == "tpu":
    _quiet_libtpu()
    # compiled as the trainer compiles it on a TPU VM of this generation
    xla_flags.set_tpu_flags(generation=xla_flags.tpu_generation(target.name))
    kw = {"chip_config_name": "megacore"} if _TPU[target.name.split("-")[0]]["cores_per_chip"] == 2 \
        else {}
    if target.num_devices == 1:
      kw["chips_per_host_bounds"] = [1, 1, 1]  # the default host (2x2) would not divide one chip
    try:
      return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                               **kw).devices)
    except (RuntimeError, ValueError) as e:
      if has_module("libtpu"):
        raise
      raise MissingCompiler(f"compiling for {target.name} needs libtpu: pip install "
                            "'minilm-jax[tpu]' (or 'jax[tpu]')") from e
  # The CUDA plugin compiles for the target config without a GPU; its version checks need one.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if not has_module("jax_plugins.xla_cuda12") and not has_module("jax_cuda12_plugin"):
    raise MissingCompiler(f"compiling for {target.name} needs the CUDA plugin: pip install "
                          "'minilm-jax[cuda]' (or 'jax[cuda12]')")
  return list(topologies.get_topology_desc(platform="cuda", target_config=_gpu_spec(target.gpu),
                                           topology=target.topology).devices)


def has_module(name: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def _quiet_libtpu() -> None:
  """libtpu looks for the TPU VM it runs on and prints a page of warnings when it finds none; a
  compile-only topology needs none of that. Nor the lockfile by which libtpu keeps a second process
  off the chips: compiling opens no chip, and two compiles (or a compile beside a run) may share."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
