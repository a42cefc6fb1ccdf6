"""The optimizer's masks: no decay on biases and LayerNorm; frozen what the objective cannot reach."""

import jax

from minilm_jax import hf, optimizer, student


def leaves(tree):
  return dict(hf.flatten(jax.device_get(tree)))


def test_decay_mask_and_frozen_labels():
  from minilm_jax.model import BertConfig, BertEncoder
  c = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=16, max_position_embeddings=8)
  p = BertEncoder(c).init_params(jax.random.key(0))
  labels, decay = leaves(student.frozen_labels(p, c)), leaves(optimizer.decay_mask(p))
  assert labels[("encoder", "layer", "1", "attention", "self", "query", "kernel")] == "train"
  assert labels[("encoder", "layer", "1", "attention", "output", "dense", "kernel")] == "freeze"
  assert labels[("encoder", "layer", "1", "output", "LayerNorm", "scale")] == "freeze"
  assert labels[("encoder", "layer", "1", "intermediate", "dense", "bias")] == "freeze"
  assert labels[("encoder", "layer", "0", "output", "dense", "kernel")] == "train"
  assert decay[("encoder", "layer", "0", "output", "dense", "kernel")]
  assert decay[("embeddings", "word_embeddings", "embedding")]
  assert not decay[("encoder", "layer", "0", "output", "dense", "bias")]
  assert not decay[("embeddings", "LayerNorm", "scale")]
