"""minilm_jax.xla_flags: the routes do to the compiled HLO what they say, and the package sets none;
the TPU flags join LIBTPU_INIT_ARGS without overriding the user's or naming a flag libtpu lacks."""

import json
import os
import platform
import subprocess
import sys

import pytest

from minilm_jax import targets, xla_flags

needs_libtpu = pytest.mark.skipif(not targets.has_module("libtpu"), reason="libtpu not installed")


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


def test_tpu_flags_join_the_users_args_and_keep_the_users_values():
  name, value = next(iter(xla_flags.TPU_FLAGS.items()))
  user = f"--xla_some_user_flag=1 --{name}=false"
  args = xla_flags.tpu_init_args(user).split()
  assert args[:2] == user.split()  # the user's own, first and unchanged
  assert f"--{name}={value}" not in args
  assert sorted(a.split("=")[0] for a in args[2:]) == sorted(f"--{n}" for n in xla_flags.TPU_FLAGS
                                                              if n != name)
  assert xla_flags.tpu_init_args(" ".join(args)) == " ".join(args)  # adding them again changes nothing
  assert xla_flags.tpu_init_args("") == " ".join(f"--{n}={v}" for n, v in xla_flags.TPU_FLAGS.items())


def test_flags_the_libtpu_lacks_are_left_out(tmp_path, monkeypatch):
  names = list(xla_flags.TPU_FLAGS)
  lib = tmp_path / "libtpu.so"
  # The first flag appears only inside a longer name: not defined. The others are NUL-terminated names.
  lib.write_bytes(b"\x7fELF\0" + names[0].encode() + b"_v2\0" +
                  b"".join(n.encode() + b"\0" for n in names[1:]) + b"tail")
  assert xla_flags.libtpu_knows(str(lib), names) == set(names[1:])
  monkeypatch.setattr(xla_flags, "_libtpu_path", lambda: str(lib))
  env = {"LIBTPU_INIT_ARGS": "--xla_user=2"}
  xla_flags.set_tpu_flags(env)
  assert env["LIBTPU_INIT_ARGS"].split() == ["--xla_user=2"] + [f"--{n}={xla_flags.TPU_FLAGS[n]}"
                                                                  for n in names[1:]]
  monkeypatch.setattr(xla_flags, "_libtpu_path", lambda: None)
  env = {}
  xla_flags.set_tpu_flags(env)  # no libtpu (a GPU or CPU machine): nothing set
  assert env == {}


@needs_libtpu
def test_the_installed_libtpu_knows_every_tpu_flag():
  every = dict(xla_flags.TPU_FLAGS)
  for flags in xla_flags.GENERATION_FLAGS.values():
    every.update(flags)
  assert xla_flags.libtpu_knows(xla_flags._libtpu_path(), list(every)) == set(every)


def test_generation_flags_follow_the_accelerator_type(tmp_path, monkeypatch):
  names = ("v5litepod-16", "v5e-4", "v6e-8", "v4-32", "v5p-8", "", "h100")
  assert [xla_flags.tpu_generation(t) for t in names] == ["v5e", "v5e", "v6e", "v4", "v5p", None, None]
  lib = tmp_path / "libtpu.so"
  every = [*xla_flags.TPU_FLAGS, "xla_tpu_scoped_vmem_limit_kib"]
  lib.write_bytes(b"\0" + b"".join(n.encode() + b"\0" for n in every))
  monkeypatch.setattr(xla_flags, "_libtpu_path", lambda: str(lib))
  vmem = "--xla_tpu_scoped_vmem_limit_kib=98304"
  for accelerator, expected in (("v5litepod-16", True), ("v6e-8", True), ("v4-32", False), ("", False)):
    env = {"TPU_ACCELERATOR_TYPE": accelerator}
    xla_flags.set_tpu_flags(env)
    assert (vmem in env["LIBTPU_INIT_ARGS"].split()) == expected, accelerator
  env = {}
  xla_flags.set_tpu_flags(env, generation="v5e")  # a compile-only target names its generation
  assert vmem in env["LIBTPU_INIT_ARGS"].split()
  env = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "LIBTPU_INIT_ARGS": "--xla_tpu_scoped_vmem_limit_kib=65536"}
  xla_flags.set_tpu_flags(env)  # the user's own value stays
  assert env["LIBTPU_INIT_ARGS"].split().count("--xla_tpu_scoped_vmem_limit_kib=65536") == 1
  assert vmem not in env["LIBTPU_INIT_ARGS"]


def test_cpu_devices_are_the_most_cores_that_split_the_batch():
  assert xla_flags.cpu_device_count(32, cores=2) == 2
  assert xla_flags.cpu_device_count(32, cores=3) == 2     # 3 does not divide 32
  assert xla_flags.cpu_device_count(6, cores=4) == 3
  assert xla_flags.cpu_device_count(7, cores=2) == 1      # a prime batch: XLA's one device
  assert xla_flags.cpu_device_count(32, fsdp=2, cores=8) == 8
  assert xla_flags.cpu_device_count(32, fsdp=4, cores=2) == 1   # no multiple of fsdp: the mesh says so
  assert xla_flags.cpu_device_count(32, cores=1) == 1
  assert xla_flags.cpu_device_count(32, grad_accum=4, cores=2) == 2   # micro-batches of 8
  assert xla_flags.cpu_device_count(12, grad_accum=4, cores=2) == 1   # micro-batches of 3
  for bad in ({"fsdp": 0}, {"grad_accum": 0}, {"grad_accum": 5}):      # out of range, or not dividing
    assert xla_flags.cpu_device_count(32, cores=2, **bad) == 1
  assert 1 <= xla_flags.cpu_device_count(1024) <= xla_flags.usable_cores()


def test_cpu_devices_join_xla_flags_and_keep_the_users_count():
  e = {}
  xla_flags.set_cpu_devices(1, e)
  assert e == {}                                           # one device: XLA's default, nothing to say
  e = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  xla_flags.set_cpu_devices(2, e)
  assert e["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=2"
  e = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_flags.set_cpu_devices(2, e)
  assert e["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_cpu_devices_set_before_jax_starts_are_the_devices_jax_has():
  code = ("from minilm_jax import xla_flags; xla_flags.set_cpu_devices(3)\n"
          "import jax; print(jax.device_count(), jax.devices()[0].platform)")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["3", "cpu"]


def test_tpu_chips_are_found_by_device_node_or_google_pci_vendor(tmp_path):
  assert not xla_flags.tpu_chips_present(str(tmp_path))
  nic = tmp_path / "sys/bus/pci/devices/0000:00:04.0"
  nic.mkdir(parents=True)
  (nic / "vendor").write_text("0x8086\n")
  assert not xla_flags.tpu_chips_present(str(tmp_path))
  (nic / "vendor").write_text("0x1ae0\n")  # Google's vendor id
  assert xla_flags.tpu_chips_present(str(tmp_path))
  for node in ("dev/accel0", "dev/vfio/0"):
    other = tmp_path / node.replace("/", "_")
    (other / os.path.dirname(node)).mkdir(parents=True)
    (other / node).write_text("")
    assert xla_flags.tpu_chips_present(str(other)), node


def test_an_absent_tpu_keeps_jax_on_the_cpu_unless_told_otherwise(tmp_path, monkeypatch):
  monkeypatch.setattr(xla_flags, "_libtpu_path", lambda: "/x/libtpu.so")
  env = {}
  xla_flags.skip_absent_tpu(env, root=str(tmp_path))  # libtpu, no chips, no GPU plugin here
  assert env == {"JAX_PLATFORMS": "cpu"}
  env = {"JAX_PLATFORMS": "tpu"}
  xla_flags.skip_absent_tpu(env, root=str(tmp_path))
  assert env == {"JAX_PLATFORMS": "tpu"}  # the user's choice stands
  (tmp_path / "dev").mkdir()
  (tmp_path / "dev" / "accel0").write_text("")
  env = {}
  xla_flags.skip_absent_tpu(env, root=str(tmp_path))
  assert env == {}  # a TPU host: JAX finds its chips
  monkeypatch.setattr(xla_flags, "_libtpu_path", lambda: None)
  xla_flags.skip_absent_tpu(env, root=str(tmp_path / "none"))
  assert env == {}  # without libtpu JAX has nothing to start


def test_a_cpu_host_with_libtpu_starts_jax_without_libtpu_errors():
  # What `make demo` shows a newcomer: the test extra installs libtpu; on a host without a TPU the
  # commands must not pass a page of libtpu's hostname errors on their way to the CPU.
  if xla_flags._libtpu_path() is None or xla_flags.tpu_chips_present():
    pytest.skip("needs libtpu installed on a host without TPU chips")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  for first in ("", "import jax; "):  # the CLI's config file imports JAX before the command runs
    code = (first + "import os; from minilm_jax import xla_flags; xla_flags.skip_absent_tpu(); "
            "import jax; print(jax.default_backend(), os.environ['JAX_PLATFORMS'], jax.config.jax_platforms)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["cpu", "cpu", "cpu"], (first, r.stderr[-2000:])
    assert "TPU" not in r.stderr, (first, r.stderr[-2000:])
