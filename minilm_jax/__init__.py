"""minilm_jax: MiniLM deep self-attention distillation in JAX/Flax."""

_EXPORTS = {"load_pretrained": "hf", "load_student": "hf", "save_pretrained": "hf", "BertConfig": "model",
            "BertEncoder": "model", "EncoderOutput": "model", "encoder_for": "families",
            "ModernBertConfig": "modernbert", "ModernBertEncoder": "modernbert"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  # Loaded on first use (PEP 562), so `import minilm_jax.shards` in a tokenising worker process does
  # not import JAX and Flax, which it never uses.
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(f"minilm_jax.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'minilm_jax' has no attribute {name!r}")
