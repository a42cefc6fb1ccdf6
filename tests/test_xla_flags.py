"""minilm_jax.xla_flags: the routes do to the compiled HLO what they say, and the package sets none."""

import json
import os
import platform
import subprocess
import sys

import pytest

from minilm_jax import xla_flags


def test_every_route_names_known_flags():
  for name, flags in xla_flags.ROUTES.items():
    for flag in flags.split():
      assert flag.startswith("--xla_cpu_") and "=" in flag, (name, flag)


PROBE = """
import json, os
import minilm_jax, jax, jax.numpy as jnp
hlo = jax.jit(jnp.matmul).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "ynn": hlo.count("__ynn_fusion"),
                  "onednn": hlo.count("__onednn_fusion")}))
"""


def compiled(route):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.ROUTES[route])
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN is in x86 jaxlibs")
def test_routes_change_the_compiled_step_and_importing_the_package_sets_none():
  default = compiled("default")
  assert default["xla_flags"] == "" and default["ynn"] >= 1 and default["onednn"] == 0
  plain = compiled("plain")
  assert plain["ynn"] == 0 and plain["onednn"] == 0
  onednn = compiled("onednn-individual_dot")
  assert onednn["ynn"] == 0 and onednn["onednn"] >= 1
