"""XLA flags: the XLA:TPU flags the trainer's step is compiled with (`set_tpu_flags`), the XLA:CPU
devices a host is split into (`set_cpu_devices`), and the XLA:CPU routes the benchmarks compare.

TPU. `set_tpu_flags` adds TPU_FLAGS to LIBTPU_INIT_ARGS, which libtpu reads once, when it starts: the
trainer's command (cli.py) and the compile-only TPU targets (targets.devices) call it before that. Left to itself,
XLA:TPU all-reduces a data-parallel step's weight gradients as one synchronous all-reduce after the whole
backward pass (84 MB a step for BERT-base -> 6x384). With these flags the gradients are reduced by
asynchronous collective fusions, in pieces of at most 32 MiB, that overlap the backward pass's compute:
v4-32, batch 1024 x 128, 14.5 -> 13.8 ms a step by the compiler's estimate (fsdp=4: 13.7 -> 13.5);
v5e-16, 20.1 -> 19.1 ms. All four are needed (without the size limit: 14.5 ms, one piece; without the
first, or the two collective-fusion flags: 14.9 ms); a 2 MiB limit overflows v4's VMEM, 64 MiB is one
piece again. On v5e and v6e, XLA's fusions may also use 96 MiB of scoped VMEM (GENERATION_FLAGS): fewer
memory-space copies, v5e-16 18.9 -> 16.3 ms at T = 128 and 92.1 -> 88.3 ms at T = 512. A flag the user
already put in LIBTPU_INIT_ARGS keeps the user's value, and a flag the installed libtpu does not know
is left out (libtpu aborts on an unknown flag).

No TPU. Where libtpu is installed on a host without TPU chips, `skip_absent_tpu` sets JAX_PLATFORMS=cpu
(docs/tpu.md): the commands call it with the others, before JAX starts a backend.

CPU devices. XLA:CPU runs a batched dot (the attention scores and context, the relation logits: [B·A,
T, d] × [B·A, d, T]) on one core, whatever the cores: the step's batched matmuls run as fast pinned to
one core as on two, well under half of PyTorch's rate (docs/performance.md, "The ceiling").
`set_cpu_devices` splits the host into one XLA:CPU device per usable core (`cpu_device_count`), so that
the trainer's mesh splits the batch over them and every op, the batched dots included, runs on every
core: on the 2-core Xeon the step at 32 × 128 is 8% faster (docs/performance.md, the peers' table;
4 devices on the 2 cores were slower than one). The trainer end to end measured level with one device
there: its host work (batches) had been using the core the batched dots left idle. The loss is the same
to the last bit there; in general the gradient's sum is taken in another order. Accelerator hosts are
not affected: their mesh is made of the accelerators.

CPU routes: the XLA_FLAGS that choose how jaxlib 0.10's XLA:CPU runs the step's dots and the work
around them, for the benchmarks to compare (benchmarks/routes.py runs one process per route: XLA reads
XLA_FLAGS once, when JAX starts its first backend).

Flag values in jaxlib 0.10 (from its DebugOptions; checked against the compiled HLO):
- `--xla_cpu_experimental_ynn_fusion_type=` takes a comma list of `dot`, `eltwise`, `reduce`,
  `individual_dot`, `individual_convolution` (or `invalid`). Bare names replace XLA's default list,
  `+name`/`-name` edit it, an empty value clears it (no YNNPACK at all: dots go to XLA's own Eigen
  dot thunk, elementwise work to XLA's loop fusions). The default list behaves as {reduce,
  individual_dot}: a reduce fusion grows over the elementwise ops and the dot that feed it (a softmax
  with its matmul, a LayerNorm with its projection), so `-dot`, `-eltwise` and `-individual_dot` each
  compile the same HLO as the default, and `-reduce` leaves YNNPACK the dots alone.
- `--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=` takes the same names. `dot`
  lets an elementwise producer or a second dot join the oneDNN fusion, which oneDNN's graph API cannot
  compile ("partition compile failed", then SIGILL) on the step's dropout-then-matmul and Q/K/V
  backward; `individual_dot` (one dot per fusion) compiles, and ran the step 1.1-1.2× faster than the
  default, but a process that used it aborts at exit in about one run in four to ten (`Check failed:
  available_.size() == num_created_` in ~OneDnnFusionThunk: a pooled oneDNN object is not returned),
  even for a lone [4096, 384] × [384, 1536] matmul. So no route is set by default: XLA's own stays.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import mmap
import os
import sys
from typing import Callable, MutableMapping, Optional, Sequence

# name -> value: XLA:TPU's gradient all-reduces asynchronous, in pieces that overlap the backward pass.
TPU_FLAGS = {
    "xla_enable_async_all_reduce": "true",
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": "true",
    "xla_jf_crs_combiner_threshold_in_bytes": str(32 << 20),
}


# generation -> flags, for chips whose VMEM (128 MiB a core on v5e and v6e) holds more than XLA:TPU's
# default scoped limit: 96 MiB for a fusion's scratch (MaxText's value for dense models). By the
# compiler's estimate, BERT-base -> 6x384 at batch 1024 x 128: v5e-16 18.9 -> 16.3 ms, v6e-16 7.8 -> 6.5;
# 80 MiB changed nothing. v4 (16 MiB) and v5p keep the default.
GENERATION_FLAGS = {
    "v5e": {"xla_tpu_scoped_vmem_limit_kib": str(96 * 1024)},
    "v6e": {"xla_tpu_scoped_vmem_limit_kib": str(96 * 1024)},
}


def tpu_generation(accelerator_type: str) -> Optional[str]:
  """"v5e" for Cloud TPU's "v5litepod-16" (or "v5e-16"), "v6e" for "v6e-8", "v4", "v5p"; None for
  anything else (an empty string, a GPU)."""
  family = accelerator_type.strip().lower().split("-")[0]
  family = "v5e" if family == "v5litepod" else family
  return family if family in ("v4", "v5e", "v5p", "v6e") else None


def tpu_init_args(current: str, known: Callable[[str], bool] = lambda name: True,
                  flags: Optional[dict] = None) -> str:
  """LIBTPU_INIT_ARGS `current` with each of `flags` (default TPU_FLAGS) that it does not set and that
  `known` says the installed libtpu has, appended as --name=value."""
  given = {arg.lstrip("-").split("=", 1)[0] for arg in current.split()}
  flags = TPU_FLAGS if flags is None else flags
  extra = [f"--{name}={value}" for name, value in flags.items() if name not in given and known(name)]
  return " ".join(current.split() + extra)


def libtpu_knows(path: str, names: Sequence[str]) -> set:
  """Which of the flag `names` the libtpu library at `path` defines (their names are NUL-terminated
  strings in it; half a second for its ~700 MB, so a process scans a library once)."""
  return set(_defined(path, tuple(names)))


@functools.lru_cache(maxsize=4)
def _defined(path: str, names: tuple) -> tuple:
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    return tuple(n for n in names if m.find(b"\0" + n.encode() + b"\0") >= 0)


def _libtpu_path() -> Optional[str]:
  spec = importlib.util.find_spec("libtpu")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "libtpu.so")
  return path if os.path.isfile(path) else None


def set_tpu_flags(environ: MutableMapping[str, str] = os.environ, generation: Optional[str] = None) -> None:
  """Add TPU_FLAGS, and GENERATION_FLAGS of `generation` (default: the one environ's
  TPU_ACCELERATOR_TYPE names, which launch/tpu_vm.sh sets), to environ["LIBTPU_INIT_ARGS"] (module
  docstring) where libtpu is installed; call it before JAX starts libtpu (later calls change nothing
  that libtpu reads)."""
  path = _libtpu_path()
  if path is not None:
    generation = generation or tpu_generation(environ.get("TPU_ACCELERATOR_TYPE", ""))
    flags = {**TPU_FLAGS, **GENERATION_FLAGS.get(generation, {})}
    known = libtpu_knows(path, list(flags))
    environ["LIBTPU_INIT_ARGS"] = tpu_init_args(environ.get("LIBTPU_INIT_ARGS", ""), known.__contains__,
                                                flags)


def tpu_chips_present(root: str = "/") -> bool:
  """Whether this host may have TPU chips: an accel or vfio device node, or a PCI device of Google's
  vendor id (gVNIC network cards have it too, so a Google Cloud VM without TPUs may answer True)."""
  nodes = glob.glob(os.path.join(root, "dev/accel*")) + glob.glob(os.path.join(root, "dev/vfio/[0-9]*"))
  vendors = glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor"))
  return bool(nodes) or any(_read(f) == "0x1ae0" for f in vendors)


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ""


GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin")


def skip_absent_tpu(environ: MutableMapping[str, str] = os.environ, root: str = "/") -> None:
  """Keep JAX on the CPU where libtpu is installed (the tpu and test extras bring it, for minilm-compile)
  but the host has no TPU and no GPU plugin: JAX would start libtpu, which prints a page of errors
  about TPU hostnames before JAX falls back to the CPU. Leaves a JAX_PLATFORMS the user set alone; call
  it before JAX starts its first backend (importing JAX is fine: its config is updated too)."""
  if ("JAX_PLATFORMS" in environ or _libtpu_path() is None or tpu_chips_present(root)
          or any(importlib.util.find_spec(p) for p in GPU_PLUGINS)):
    return
  environ["JAX_PLATFORMS"] = "cpu"
  if environ is os.environ and "jax" in sys.modules:  # JAX read the variable when it was imported
    sys.modules["jax"].config.update("jax_platforms", "cpu")


HOST_DEVICES = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
  """The cores this process may run on (its affinity mask: a container's or taskset's limit)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_device_count(batch: int, fsdp: int = 1, grad_accum: int = 1, cores: Optional[int] = None) -> int:
  """How many XLA:CPU devices to split a host into for steps of `batch` examples (global) in
  `grad_accum` micro-batches: the most, up to one per usable core, that split a micro-batch evenly and
  are a multiple of `fsdp`; 1 (XLA's default) when none is, or when the values are out of range (read
  before the config is checked: the trainer then says what is wrong, in one line)."""
  if grad_accum < 1 or fsdp < 1 or batch % grad_accum:
    return 1
  cores = usable_cores() if cores is None else cores
  fits = [n for n in range(1, cores + 1) if (batch // grad_accum) % n == 0 and n % fsdp == 0]
  return max(fits, default=1)


def set_cpu_devices(n: int, environ: MutableMapping[str, str] = os.environ) -> None:
  """Make XLA:CPU start `n` devices (module docstring): XLA_FLAGS gets HOST_DEVICES=n, unless the user's
  XLA_FLAGS already sets it (the tests' 8 emulated devices, say). XLA reads XLA_FLAGS when JAX starts
  its first backend: call it before anything asks JAX for devices (later calls change nothing)."""
  current = environ.get("XLA_FLAGS", "")
  if n > 1 and HOST_DEVICES not in current:
    environ["XLA_FLAGS"] = f"{current} {HOST_DEVICES}={n}".strip()


_YNN = "--xla_cpu_experimental_ynn_fusion_type"
_ONEDNN = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type"

# name -> XLA_FLAGS: every way jaxlib 0.10's XLA:CPU can run the step's dots and the work around them.
ROUTES = {
    "default": "",                                      # YNN fusions: dots with their eltwise/reduce
    "ynn-dot": f"{_YNN}=-dot",                          # each YNN fusion type taken out in turn
    "ynn-eltwise": f"{_YNN}=-eltwise",
    "ynn-reduce": f"{_YNN}=-reduce",
    "ynn-individual_dot": f"{_YNN}=-individual_dot",
    "ynn-dots-only": f"{_YNN}=-eltwise,-reduce",        # YNN runs the dots, alone; XLA the rest
    "plain": f"{_YNN}=",                                # no YNN: XLA's own dots and loop fusions
    "onednn-dot": f"{_ONEDNN}=dot {_YNN}=",             # the oneDNN set (fails on the step)
    "onednn-individual_dot": f"{_ONEDNN}=individual_dot {_YNN}=",
}
