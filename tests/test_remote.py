"""remote.py: local copies of remote folders, and where they are cached."""

import os

import pytest

from minilm_jax import hf, remote


def test_remote_folder_is_fetched_to_a_local_cache(real_teacher, tmp_path, monkeypatch):
  # etils.epath handles gs:// here; a local path goes through the same copying code.
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  local = remote.fetch_remote(real_teacher)
  assert local.startswith(str(tmp_path / "home"))
  for name in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
    with open(os.path.join(local, name), "rb") as a, open(os.path.join(real_teacher, name), "rb") as b:
      assert a.read() == b.read(), name
  with pytest.raises(FileNotFoundError, match="no such folder"):
    remote.fetch_remote(str(tmp_path / "nope"))
  seen = []
  monkeypatch.setattr(remote, "fetch_remote", lambda url: seen.append(url) or local)
  config, _ = hf.load_pretrained("gs://bucket/run/assistant/student")
  assert seen == ["gs://bucket/run/assistant/student"] and config.num_hidden_layers == 6


def test_cache_dir_is_per_kind_and_key(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  a, b = remote.cache_dir("runs", "gs://x/a"), remote.cache_dir("runs", "gs://x/b")
  assert a != b and a == remote.cache_dir("runs", "gs://x/a")
  assert a.startswith(os.path.join(str(tmp_path), ".cache", "minilm_jax", "runs"))
  assert remote.cache_dir("shards", "gs://x/a") != a
