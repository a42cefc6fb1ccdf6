"""Hugging Face checkpoints in and out: an HF folder (or hub id) <-> (config, params).

Reads BertModel, BertForMaskedLM and BertForPreTraining checkpoints (weights with or without the `bert.`
prefix), RoBERTa and XLM-R ones (`roberta.` prefix, positions offset by the padding index), and
ModernBertModel / ModernBertForMaskedLM ones (`model.` prefix), from `model.safetensors`, sharded
safetensors with their index, or `pytorch_model.bin` when torch is installed. Heads (`cls.*`, `lm_head.*`,
`head.*`, `decoder.*`) and the pooler are not part of the encoder and are dropped. The config is a
BertConfig (model.py) or a ModernBertConfig (modernbert.py), by `model_type`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from minilm_jax import modernbert
from minilm_jax import workdir as wd
from minilm_jax.remote import PACKAGED, packaged_teacher_path, resolve  # noqa: F401 (hf.resolve: callers')
from minilm_jax.families import MODEL_TYPES, config_from_dict, encoder_for

_DROPPED_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.", "head.", "decoder.")

# A tokenizer's own files (fast, WordPiece, BPE, SentencePiece). Without one of them transformers 5 builds
# a 5-token BERT tokenizer that maps every word to [UNK], and a run would train on nothing.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")
_TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def tokenizer_files(folder: str) -> list:
  """The tokenizer's files in `folder` (TOKENIZER_FILES and its settings files), sorted: what the export
  copies and the run's identity hashes. FileNotFoundError when it has none of TOKENIZER_FILES."""
  names = sorted(os.listdir(folder))
  if not any(n in TOKENIZER_FILES for n in names):
    raise FileNotFoundError(f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                            "copy the teacher's tokenizer into the folder")
  return [n for n in names if n in TOKENIZER_FILES or n in _TOKENIZER_SETTINGS]


def load_config(folder: str):
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
  with open(path) as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if d.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"{path}: model_type {d.get('model_type')!r} is not supported; supported: "
                     f"{', '.join(MODEL_TYPES)} (BertModel/ForMaskedLM/ForPreTraining, "
                     "RobertaModel, XLMRobertaModel, ModernBertModel/ForMaskedLM checkpoints)")
  try:
    return config_from_dict(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from None


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable or truncated weights file ({e})") from None


def _read_torch_bin(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ImportError(f"{path}: reading pytorch_model.bin needs torch; install it, or save the "
                      "checkpoint as model.safetensors") from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"{path}: unreadable or truncated weights file ({e})") from None
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def read_state_dict(folder: str) -> Tuple[str, Dict[str, np.ndarray]]:
  """(file name, {HF tensor name: array}) from the folder's weights files."""
  single, index = os.path.join(folder, "model.safetensors"), \
      os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(single):
    return single, _read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for shard in shards:
      p = os.path.join(folder, shard)
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{index}: names shard {shard}, which is missing")
      sd.update(_read_safetensors(p))
    return index, sd
  binary = os.path.join(folder, "pytorch_model.bin")
  if os.path.isfile(binary):
    return binary, _read_torch_bin(binary)
  raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin")


def _hf_to_flax_name(name: str) -> Optional[Tuple[Tuple[str, ...], bool]]:
  """HF tensor name -> (flax param path, transpose?), or None for tensors the encoder does not use."""
  for prefix in ("bert.", "roberta.", "model."):
    if name.startswith(prefix):
      name = name[len(prefix):]
  if name.startswith(_DROPPED_PREFIXES) or name.endswith(("position_ids", "token_type_ids")):
    return None
  parts = name.split(".")
  module, leaf = parts[:-1], parts[-1]
  if module and (module[-1] == "LayerNorm" or module[-1].endswith("norm")):  # ModernBERT's *norm
    leaf = {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}[leaf]
    return tuple(module) + (leaf,), False
  if module and module[-1].endswith("_embeddings"):
    return tuple(module) + ("embedding",), False
  return tuple(module) + ({"weight": "kernel", "bias": "bias"}[leaf],), leaf == "weight"


def flatten(tree, prefix=()):
  """(path tuple, leaf) for every leaf of a nested dict of params, depth first."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def param_shapes(config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{flax param path: shape} of the encoder of this config, without allocating it."""
  abstract = jax.eval_shape(lambda: encoder_for(config).init_params(jax.random.key(0)))
  return {p: tuple(v.shape) for p, v in flatten(abstract)}


def load_pretrained(path: str) -> Tuple[Any, Dict[str, Any]]:
  """Read an HF folder (or hub id) into (config, params): a BertConfig or a ModernBertConfig.

  params is the nested dict for `encoder_for(config).apply({"params": params}, ...)` (BertEncoder or
  ModernBertEncoder), with numpy fp32
  leaves (put them on devices as you like). The pooler and task heads are dropped. Raises a ValueError /
  FileNotFoundError naming the file for a missing config, an unsupported model_type, shapes that
  disagree with the config, missing tensors, or a truncated weights file: never a partial load.
  """
  folder = resolve(path)
  config = load_config(folder)
  fname, state_dict = read_state_dict(folder)
  expected = param_shapes(config)
  flat = {}
  for name, array in state_dict.items():
    try:
      mapped = _hf_to_flax_name(name)
    except KeyError:
      mapped = None
    if mapped is None:
      continue
    fpath, transpose = mapped
    if fpath not in expected:
      continue  # e.g. extra tensors of an architecture variant the encoder does not use
    array = np.asarray(array, np.float32)
    # PyTorch Linear stores [out, in]; Flax Dense wants [in, out].
    want = expected[fpath][::-1] if transpose else expected[fpath]
    if array.shape != want:
      raise ValueError(f"{fname}: tensor {name} has shape {tuple(array.shape)}, but config.json "
                       f"implies {want}")
    flat[fpath] = np.ascontiguousarray(array.T if transpose else array)
  missing = sorted("/".join(p) for p in expected if p not in flat)
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ValueError(f"{fname}: {len(missing)} encoder tensors are missing: {shown}")
  return config, _unflatten(flat)


def _flax_to_hf_name(fpath: Tuple[str, ...]) -> Tuple[str, bool]:
  *module, leaf = fpath
  if leaf == "embedding":
    return ".".join(module) + ".weight", False
  if leaf == "scale":
    return ".".join(module) + ".weight", False
  if leaf == "kernel":
    return ".".join(module) + ".weight", True
  return ".".join(module) + ".bias", False


def write_atomically(path: str, write):
  """`write(tmp)` then rename tmp to `path`: a reader never sees a half-written file."""
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def write_json(path: str, obj) -> None:
  """obj as indented JSON at path, written atomically (folders made as needed)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  def write(p):
    with open(p, "w") as f:
      json.dump(obj, f, indent=2)
  write_atomically(path, write)


def save_pretrained(path: str, config, params: Dict[str, Any], tokenizer=None) -> str:
  """Write an HF folder: config.json, model.safetensors (fp32) and, if given, the tokenizer files.

  `tokenizer` is a folder to copy tokenizer files from, or an object with `save_pretrained`.
  `transformers.BertModel.from_pretrained(path)` (AutoModel for RoBERTa/XLM-R, and for ModernBERT,
  which loads it as ModernBertModel) loads every encoder weight, and no warning: a BERT-family encoder
  has no pooler here, so an identity pooler is written (pooler_output = tanh(h_[CLS]), no random
  weights). Use `last_hidden_state`, as MiniLM students and sentence-transformers do; the pooler is there
  so that loading is clean and deterministic. ModernBertModel has no pooler.
  """
  from safetensors.numpy import save_file
  expected = param_shapes(config)
  flat = dict(flatten(jax.device_get(params)))
  if set(flat) != set(expected):
    raise ValueError(f"params do not match the config: missing {sorted(set(expected) - set(flat))[:3]}, "
                     f"unexpected {sorted(set(flat) - set(expected))[:3]}")
  tensors = {}
  for fpath, array in flat.items():
    name, transpose = _flax_to_hf_name(fpath)
    array = np.asarray(array, np.float32)
    tensors[name] = np.ascontiguousarray(array.T if transpose else array)
  if not modernbert.is_modernbert(config):
    d = config.hidden_size
    tensors["pooler.dense.weight"] = np.eye(d, dtype=np.float32)
    tensors["pooler.dense.bias"] = np.zeros(d, np.float32)
  os.makedirs(path, exist_ok=True)
  write_atomically(os.path.join(path, "model.safetensors"),
                   lambda p: save_file(tensors, p, metadata={"format": "pt"}))
  write_json(os.path.join(path, "config.json"), config.to_hf_dict())
  if isinstance(tokenizer, (str, os.PathLike)):
    for name in tokenizer_files(tokenizer):
      shutil.copy2(os.path.join(tokenizer, name), os.path.join(path, name))
  elif tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path


FLAX_PARAMS = "flax_params.msgpack"


def export_student(path: str, config, params: Dict[str, Any], tokenizer=None) -> str:
  """An HF folder (see save_pretrained) that also holds the exact Flax params as `flax_params.msgpack`."""
  from flax import serialization
  save_pretrained(path, config, params, tokenizer)
  blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, jax.device_get(params)))
  def write(p):
    with open(p, "wb") as f:
      f.write(blob)
  write_atomically(os.path.join(path, FLAX_PARAMS), write)
  return path


def load_student(path: str):
  """(encoder, params) from a trainer workdir, its `student/` folder, or any HF folder: one line for Flax
  users (a BertEncoder, or a ModernBertEncoder for a ModernBERT student). Prefers the exact Flax params,
  else converts model.safetensors."""
  from flax import serialization
  folder = wd.join(path, wd.STUDENT) if os.path.isdir(wd.join(path, wd.STUDENT)) else path
  flax_file = os.path.join(folder, FLAX_PARAMS)
  if os.path.isfile(flax_file):
    config = load_config(folder)
    with open(flax_file, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    expected = param_shapes(config)
    got = {p: tuple(v.shape) for p, v in flatten(params)}
    if got != expected:
      raise ValueError(f"{flax_file}: params do not match {os.path.join(folder, 'config.json')}")
  else:
    config, params = load_pretrained(folder)
  return encoder_for(config), params


def _read_json(folder: str, name: str) -> Optional[Any]:
  p = os.path.join(folder, name)
  if not os.path.isfile(p):
    return None
  with open(p) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}: not valid JSON ({e})") from None


# sentence-transformers Pooling config keys -> losses.sentence_embedding pooling modes.
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


def sentence_pooling(folder: str) -> Optional[Tuple[str, bool]]:
  """(pooling, normalize) of a sentence-transformers folder, as `losses.sentence_embedding` takes them;
  None when the folder is not a sentence-transformers model (no modules.json). A module the student
  cannot reproduce (a Dense head, two pooling modes at once) is a ValueError."""
  modules = _read_json(folder, "modules.json")
  if modules is None:
    return None
  pooling, normalize = None, False
  for m in modules:
    kind = m.get("type", "").rsplit(".", 1)[-1]
    if kind == "Pooling":
      cfg = _read_json(folder, os.path.join(m.get("path", ""), "config.json")) or \
          {"pooling_mode_mean_tokens": True}
      modes = [mode for key, mode in _POOLING_KEYS.items() if cfg.get(key)]
      if len(modes) != 1:
        raise ValueError(f"{folder}: pooling {modes or 'none'} is not supported; use one of "
                         f"{', '.join(_POOLING_KEYS.values())}")
      pooling = modes[0]
    elif kind == "Normalize":
      normalize = True
    elif kind != "Transformer":
      raise ValueError(f"{folder}: the sentence-transformers module {kind} is not supported "
                       "(Transformer, Pooling and Normalize are)")
  if pooling is None:
    raise ValueError(f"{folder}: modules.json has no Pooling module")
  return pooling, normalize


def export_sentence_transformers(path: str, config, teacher_dir: str, max_seq_length: int) -> str:
  """Make the HF folder at `path` a sentence-transformers folder too: modules.json, the pooling config
  and sentence_bert_config.json, copied from the teacher where it has them (mean pooling otherwise).
  `sentence_transformers.SentenceTransformer(path)` then loads the student."""
  read = lambda name: _read_json(teacher_dir, name)
  write = lambda name, obj: write_json(os.path.join(path, name), obj)

  modules = read("modules.json") or [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  for m in modules:
    if m["type"].endswith("Pooling"):
      pooling = read(os.path.join(m["path"], "config.json")) or {
          "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
          "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
      write(os.path.join(m["path"], "config.json"),
            {**pooling, "word_embedding_dimension": config.hidden_size})
    elif m["path"] and os.path.isdir(os.path.join(teacher_dir, m["path"])):
      # Parameter-free modules (Normalize) are copied as they are; a Dense head would not fit the
      # student's width, so it is refused rather than copied.
      if m["type"].endswith("Dense"):
        raise ValueError(f"{teacher_dir}: the teacher's sentence-transformers Dense module cannot be "
                         "carried over to a student of another width")
      shutil.copytree(os.path.join(teacher_dir, m["path"]), os.path.join(path, m["path"]),
                      dirs_exist_ok=True)
  write("modules.json", modules)
  sbert = read("sentence_bert_config.json") or {"do_lower_case": False}
  write("sentence_bert_config.json", {**sbert, "max_seq_length": min(
      sbert.get("max_seq_length", max_seq_length), config.max_len)})
  return path
