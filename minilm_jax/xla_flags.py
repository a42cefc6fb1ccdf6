"""XLA:CPU flags: the routes the benchmarks compare, and the ones this package sets by default.

XLA reads XLA_FLAGS once, when JAX starts its first backend (not when jax is imported), so
`minilm_jax/__init__.py` calls `apply_cpu_defaults()` before anything touches a device. A flag the
user's XLA_FLAGS already sets is left as the user set it; MINILM_XLA_DEFAULTS=0 turns the defaults off
(the benchmarks' route runner does, so each route is exactly what it says).

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
  backward; `individual_dot` (one dot per fusion) compiles.
"""

from __future__ import annotations

import importlib.util
import os
import sys

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

# The CPU default, one route as a whole ({flag: value}): oneDNN runs each dot alone, YNNPACK nothing.
# At the target shape it ran the whole step 1.2x faster than XLA's default (README, Performance).
# It is left out when the user's XLA_FLAGS names any of its flags (theirs wins, and half a route is no
# route), off x86 (oneDNN is built into the x86 jaxlib only) and on a jaxlib other than the one
# measured (XLA aborts on a flag it does not know).
CPU_DEFAULTS: dict = {
    "--xla_cpu_use_onednn": "true",
    "--xla_cpu_experimental_onednn_fusion_type": "individual_dot",
    "--xla_cpu_experimental_ynn_fusion_type": "",
}
MEASURED_JAXLIB = "0.10."

# XLA_FLAGS as the user set them, before apply_cpu_defaults (the route runner starts from these).
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")


def _flag_names(flags: str) -> set:
  return {f.split("=", 1)[0] for f in flags.split() if f.startswith("--")}


def _backend_will_be_cpu(environ) -> bool:
  """True when JAX will start on CPU: JAX_PLATFORMS names cpu first, or is unset and no GPU/TPU
  plugin is installed. Decided without importing jax."""
  platforms = environ.get("JAX_PLATFORMS", environ.get("JAX_PLATFORM_NAME", "")).strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                 "libtpu"):
    try:
      if importlib.util.find_spec(plugin) is not None:
        return False
    except (ImportError, ValueError):
      pass
  return True


def with_cpu_defaults(xla_flags: str, defaults: dict = None) -> str:
  """`xla_flags` plus the defaults, unless it already names one of them."""
  defaults = CPU_DEFAULTS if defaults is None else defaults
  if _flag_names(xla_flags) & set(defaults):
    return xla_flags.strip()
  return " ".join([xla_flags.strip(), *(f"{k}={v}" for k, v in defaults.items())]).strip()


def _jaxlib_measured() -> bool:
  """x86 and the jaxlib whose flags were measured; read from metadata, without importing jax."""
  import importlib.metadata
  import platform
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  try:
    return importlib.metadata.version("jaxlib").startswith(MEASURED_JAXLIB)
  except importlib.metadata.PackageNotFoundError:
    return False


def apply_cpu_defaults(environ=None, defaults: dict = None) -> bool:
  """Adds the CPU defaults to environ["XLA_FLAGS"] when JAX will run on CPU and has not started a
  backend yet. Returns whether XLA_FLAGS changed."""
  environ = os.environ if environ is None else environ
  defaults = CPU_DEFAULTS if defaults is None else defaults
  if not defaults or environ.get("MINILM_XLA_DEFAULTS", "1") == "0" or not _backend_will_be_cpu(environ):
    return False
  if defaults is CPU_DEFAULTS and not _jaxlib_measured():
    return False
  xb = sys.modules.get("jax._src.xla_bridge")
  if xb is not None and xb.backends_are_initialized():
    return False  # too late: XLA has read its flags
  old = environ.get("XLA_FLAGS", "")
  new = with_cpu_defaults(old, defaults)
  if new == old.strip():
    return False
  environ["XLA_FLAGS"] = new
  return True
