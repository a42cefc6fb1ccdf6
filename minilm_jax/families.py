"""The model families: which config class and encoder module an HF `model_type` gets. Apart from
model.py (BERT, RoBERTa, XLM-R) and modernbert.py (which builds on model.py), so neither imports the other
back."""

import jax.numpy as jnp
import flax.linen as nn

from minilm_jax import modernbert
from minilm_jax.model import SUPPORTED_MODEL_TYPES, BertConfig, BertEncoder

MODEL_TYPES = SUPPORTED_MODEL_TYPES + (modernbert.MODEL_TYPE,)


def encoder_for(config, dtype=jnp.float32, param_dtype=jnp.float32, **module_kw) -> nn.Module:
  """The encoder module of `config`'s family: BertEncoder (BERT, RoBERTa, XLM-R) or ModernBertEncoder."""
  cls = modernbert.ModernBertEncoder if modernbert.is_modernbert(config) else BertEncoder
  return cls(config, dtype=dtype, param_dtype=param_dtype, **module_kw)


def config_from_dict(d: dict):
  """An HF config dict as the config of its family (BertConfig or ModernBertConfig)."""
  if d.get("model_type") == modernbert.MODEL_TYPE:
    return modernbert.ModernBertConfig.from_dict(d)
  return BertConfig.from_dict(d)
