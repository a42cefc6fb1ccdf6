"""minilm_jax: MiniLM deep self-attention distillation in JAX/Flax."""

# First: the CPU's XLA flags must be in XLA_FLAGS before JAX starts a backend.
from minilm_jax import xla_flags as _xla_flags

_xla_flags.apply_cpu_defaults()

from minilm_jax.hf import load_pretrained, load_student, save_pretrained
from minilm_jax.model import BertConfig, BertEncoder, EncoderOutput, encoder_for
from minilm_jax.modernbert import ModernBertConfig, ModernBertEncoder

__all__ = ["BertConfig", "BertEncoder", "EncoderOutput", "ModernBertConfig", "ModernBertEncoder",
           "encoder_for", "load_pretrained", "load_student", "save_pretrained"]
