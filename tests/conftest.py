"""Shared fixtures: the packaged real teacher and small random Hugging Face checkpoints."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Tests never reach a hub.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run on the CPU, also where a TPU or GPU plugin is installed (minilm-compile's tests use it to
# compile for targets that are not here, which needs no backend of its own).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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


TINY_TEXT = """The quick brown fox jumps over the lazy dog. Attention relations carry what a layer knows.

MiniLM distils the self-attention of a teacher into a small student, layer by layer, relation by relation.

Queries, keys and values are split into relation heads; the student learns the teacher's distributions.

Padding must never count: padded keys are masked and padded rows are excluded from the mean.

A resumed run must see exactly the batches an uninterrupted run would have seen, in the same order."""


def make_tiny_teacher(folder, layers=2, hidden=32, heads=4, intermediate=64, max_positions=64, seed=0):
  """A random BERT with a character-level WordPiece tokenizer, saved as an HF folder."""
  import transformers
  torch = pytest.importorskip("torch")
  vocab = save_char_tokenizer(folder)
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=intermediate,
                                max_position_embeddings=max_positions,
                                initializer_range=0.1)  # sharper attention than 0.02: a loss far from 0
  transformers.BertModel(cfg).save_pretrained(folder)
  return str(folder)


def save_char_tokenizer(folder):
  """The character-level WordPiece tokenizer of the tiny teachers ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3)."""
  import transformers
  os.makedirs(folder, exist_ok=True)
  chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:'\"()-!?"
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars]
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  # Positional: transformers 5 ignores the vocab_file keyword (and would give a 5-token tokenizer).
  tok = transformers.BertTokenizerFast(os.path.join(folder, "vocab.txt"), do_lower_case=True)
  assert len(tok) == len(vocab)
  tok.save_pretrained(folder)
  return len(vocab)


def make_tiny_modernbert(folder, layers=3, hidden=32, heads=4, intermediate=48, local_attention=8,
                         layer_types=None, max_positions=64, seed=0, tokenizer=True, **overrides):
  """A random ModernBertModel (norms and biases perturbed so the test sees them), saved as an HF folder
  with the char tokenizer; returns the torch model (eval mode, eager attention)."""
  torch = pytest.importorskip("torch")
  import transformers
  vocab = save_char_tokenizer(folder) if tokenizer else 99
  torch.manual_seed(seed)
  cfg = transformers.ModernBertConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=intermediate, max_position_embeddings=max_positions,
      local_attention=local_attention, layer_types=layer_types, pad_token_id=0, bos_token_id=2,
      eos_token_id=3, cls_token_id=2, sep_token_id=3, **overrides)
  cfg._attn_implementation = "eager"
  model = transformers.ModernBertModel(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
  return make_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def tiny_modernbert(tmp_path_factory):
  """A random 4×32 ModernBERT teacher (global layers 0 and 3, ±4-token windows) with the char tokenizer."""
  folder = str(tmp_path_factory.mktemp("tiny_modernbert"))
  make_tiny_modernbert(folder, layers=4, hidden=32, heads=4, intermediate=48, local_attention=8)
  return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(TINY_TEXT)
  return str(path)


def override(c, **overrides):
  """c with each dotted key set ("optim.lr": 1e-3 sets c.optim.lr), as --config.KEY=VALUE does."""
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def tiny_config(teacher, corpus, **overrides):
  """A train config for the tiny teacher: 1×16 student, v2 with 4 relation heads, batch 8 × 32."""
  from minilm_jax.train import default_config
  c = default_config()
  c.teacher = teacher
  c.student.update(num_layers=1, hidden_size=16, num_heads=4, intermediate_size=32, init="random")
  c.loss.update(version="v2", relation_heads=4)
  c.data.update(source=corpus, max_len=32)
  c.batch_size = 8
  c.steps = 6
  c.log_every = 1
  c.checkpoint_every = 3
  c.optim.update(lr=3e-3, warmup_steps=2)
  return override(c, **overrides)


TINY_CLI_ARGS = ["--config.student.num_layers=1", "--config.student.hidden_size=16",
                 "--config.student.num_heads=4", "--config.student.intermediate_size=32",
                 "--config.loss.relation_heads=4", "--config.data.max_len=32", "--config.batch_size=8",
                 "--config.log_every=1", "--config.optim.warmup_steps=2",
                 # The demo's output terms need a sentence-transformers teacher; the tiny one is plain BERT.
                 "--config.student.init=random", "--config.loss.terms=relations"]
