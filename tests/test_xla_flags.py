"""minilm_jax.xla_flags: the CPU defaults reach XLA before JAX starts, and the user's own flags win."""

import json
import os
import subprocess
import sys

from minilm_jax import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"
CPU = {"JAX_PLATFORMS": "cpu"}


def test_defaults_are_added_on_cpu():
  env = dict(CPU)
  assert xla_flags.apply_cpu_defaults(env, {YNN: "", "--xla_cpu_use_onednn": "false"})
  assert env["XLA_FLAGS"] == f"{YNN}= --xla_cpu_use_onednn=false"


def test_the_users_setting_wins():
  env = dict(CPU, XLA_FLAGS="--xla_dump_to=/tmp/x")
  assert xla_flags.apply_cpu_defaults(env, {YNN: ""})
  assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {YNN}="
  # Naming any flag of the default route leaves the whole route out: half a route is no route.
  env = dict(CPU, XLA_FLAGS=f"{YNN}=dot")
  assert not xla_flags.apply_cpu_defaults(env, {YNN: "", "--xla_cpu_use_onednn": "true"})
  assert env["XLA_FLAGS"] == f"{YNN}=dot"


def test_left_alone_off_cpu_or_when_turned_off():
  for env in ({"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"}, dict(CPU, MINILM_XLA_DEFAULTS="0")):
    before = dict(env)
    assert not xla_flags.apply_cpu_defaults(env, {YNN: ""})
    assert env == before


def test_every_route_names_known_flags():
  for name, flags in xla_flags.ROUTES.items():
    for flag in flags.split():
      assert flag.startswith("--xla_cpu_") and "=" in flag, (name, flag)


def _run(code, **env):
  env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MINILM_XLA_DEFAULTS")}, **CPU, **env}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = """
import json, os
import minilm_jax, jax, jax.numpy as jnp
hlo = jax.jit(jnp.matmul).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "ynn": hlo.count("__ynn_fusion"),
                  "onednn": hlo.count("__onednn_fusion")}))
"""


def test_importing_the_package_applies_the_defaults_before_jax_starts():
  got = _run(PROBE)
  if xla_flags._jaxlib_measured():  # x86 and the measured jaxlib: the oneDNN route
    for flag, value in xla_flags.CPU_DEFAULTS.items():
      assert f"{flag}={value}" in got["xla_flags"].split()
    assert (got["ynn"], got["onednn"]) == (0, 1)
  user = _run(PROBE, XLA_FLAGS=f"{YNN}=individual_dot")  # the user's own route, untouched
  assert user["xla_flags"] == f"{YNN}=individual_dot" and (user["ynn"], user["onednn"]) == (1, 0)
  # The mechanism itself, with a default that shows in the compiled HLO: YNN dots off.
  code = PROBE.replace("import minilm_jax,", f"from minilm_jax import xla_flags\n"
                       f"xla_flags.apply_cpu_defaults(defaults={{{YNN!r}: ''}})\nimport")
  assert _run(code)["ynn"] == 0
  assert _run(code, XLA_FLAGS=f"{YNN}=individual_dot")["ynn"] > 0  # the user's setting wins
  assert _run(code, MINILM_XLA_DEFAULTS="0")["ynn"] > 0
