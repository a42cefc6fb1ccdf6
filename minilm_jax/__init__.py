"""minilm_jax: MiniLM deep self-attention distillation in JAX/Flax."""

from minilm_jax.hf import load_pretrained, load_student, save_pretrained
from minilm_jax.model import BertConfig, BertEncoder, EncoderOutput, encoder_for
from minilm_jax.modernbert import ModernBertConfig, ModernBertEncoder

__all__ = ["BertConfig", "BertEncoder", "EncoderOutput", "ModernBertConfig", "ModernBertEncoder",
           "encoder_for", "load_pretrained", "load_student", "save_pretrained"]
