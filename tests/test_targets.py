"""Accelerator names -> compile-only devices (targets.py)."""

import pytest

from minilm_jax import targets


def test_tpu_names_as_cloud_tpu_spells_them():
  v4 = targets.parse("v4-32")  # v4 and v5p names count TensorCores: 16 megacore chips
  assert (v4.platform, v4.num_devices, v4.topology, v4.hbm_bytes) == ("tpu", 16, "v4:2x2x4", 32 * 2**30)
  v5e = targets.parse("v5e-16")  # v5e and v6e names count chips
  assert (v5e.num_devices, v5e.topology, v5e.peak_flops) == (16, "v5e:4x4", 197e12)
  assert targets.parse("v5litepod-4") == targets.parse("V5E-4")
  assert targets.parse("v5e-1").topology == "v5e:1x1"
  assert targets.parse("v6e-8").num_devices == 8 and targets.parse("v5p-8").num_devices == 4


def test_gpu_names_read_their_target_config():
  h100 = targets.parse("h100")
  assert (h100.platform, h100.num_devices, h100.topology, h100.gpu) == ("gpu", 1, "1x1x1", "h100")
  assert 79e9 < h100.hbm_bytes < 86e9 and 3e12 < h100.hbm_bandwidth < 3.5e12  # 80 GB, 3.35 TB/s
  assert targets.parse("h200").hbm_bytes > 140e9
  assert targets.parse("h100x8").num_devices == 8


@pytest.mark.parametrize("name", ["v4-6", "v5e-512", "v5e-3", "h100x3", "k80", "tpu", ""])
def test_unknown_names_are_refused_with_the_accepted_forms(name):
  with pytest.raises(targets.UnknownTarget):  # a ValueError: the CLI's one-line error
    targets.parse(name)


def test_every_listed_name_parses():
  names = targets.known()
  assert "v4-8" in names and "v5e-256" in names and "h100x8" in names
  for n in names:
    assert targets.parse(n).num_devices >= 1


def test_devices_of_a_tpu_slice():
  pytest.importorskip("libtpu")
  devs = targets.devices(targets.parse("v5e-4"))
  assert len(devs) == 4 and {d.platform for d in devs} == {"tpu"}
  assert len(targets.devices(targets.parse("v4-8"))) == 4  # megacore: one device a chip


def test_a_missing_compiler_says_what_to_install(monkeypatch):
  from jax.experimental import topologies

  def no_libtpu(**kw):
    raise RuntimeError("Unable to initialize backend 'tpu'")
  monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
  monkeypatch.setattr(targets, "has_module", lambda name: False)
  with pytest.raises(targets.MissingCompiler, match=r"minilm-jax\[tpu\]"):
    targets.devices(targets.parse("v5e-4"))
  with pytest.raises(targets.MissingCompiler, match=r"minilm-jax\[cuda\]"):
    targets.devices(targets.parse("h100"))
