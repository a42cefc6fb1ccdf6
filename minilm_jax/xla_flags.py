"""XLA:CPU routes: the XLA_FLAGS that choose how jaxlib 0.10's XLA:CPU runs the step's dots and the work
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
