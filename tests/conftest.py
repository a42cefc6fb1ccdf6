"""Shared fixtures: the packaged real teacher and small random Hugging Face checkpoints."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Tests never reach a hub.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def real_teacher():
  from minilm_jax import hf
  try:
    return hf.packaged_teacher_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def make_hf_model(folder, model_type="bert", seed=0, **overrides):
  """Save a randomly initialised transformers model to `folder`; returns the torch model (eval mode)."""
  torch = pytest.importorskip("torch")
  import transformers
  kw = dict(vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=100, max_position_embeddings=64, type_vocab_size=2)
  kw.update(overrides)
  torch.manual_seed(seed)
  if model_type == "bert":
    model = transformers.BertModel(transformers.BertConfig(**kw))
  elif model_type == "roberta":
    kw.setdefault("pad_token_id", 1)
    model = transformers.RobertaModel(transformers.RobertaConfig(**kw))
  else:
    raise ValueError(model_type)
  # Random init leaves LayerNorms at identity and biases at zero; perturb them so the test sees them.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(folder)
  return model


def random_batch(rng, b, t, vocab, padding="right", pad_id=0, low=2):
  """ids [B,T] with lengths between 1 and T, padded on the given side; mask [B,T]."""
  lengths = rng.integers(1, t + 1, size=b)
  lengths[0] = t
  ids = rng.integers(low, vocab, size=(b, t))
  mask = np.zeros((b, t), np.int64)
  for i, n in enumerate(lengths):
    if padding == "right":
      mask[i, :n] = 1
    else:
      mask[i, t - n:] = 1
  ids = np.where(mask > 0, ids, pad_id)
  return ids, mask
