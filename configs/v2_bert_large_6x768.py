"""MiniLMv2 recipe: BERT-large teacher (24×1024) → 6×768 student, distilling teacher layer 21 of 24
(an upper-middle layer works better than the last for large teachers), A_r = 64 relation heads.

  minilm-distill --config configs/v2_bert_large_6x768.py --workdir gs://BUCKET/minilm/v2_large_6x768

The teacher runs only up to layer 21's Q/K/V. Cost (estimate): 1.7e20 FLOPs at batch 1024 × 400k ×
512, about 1.1 days on a TPU v4-32 at 40% MFU. Use parallel.fsdp to shard the teacher if memory is short.
Target: v4-32 (minilm-compile --config configs/v2_bert_large_6x768.py --target v4-32; its figures: docs/compile.md)
Layout: weights sharded over 4 chips (parallel.fsdp=4): 152.4 ms a step on the v4-32 against 153.3
data-parallel, by the compiler's estimate; on fewer than 4 devices add --config.parallel.fsdp=1.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "bert-large-uncased"
  c.student.update(num_layers=6, hidden_size=768, num_heads=12, intermediate_size=3072, init="random")
  c.loss.update(version="v2", relation_heads=64, teacher_layer=21)
  c.data.update(source="wikitext", hub_config="wikitext-103-raw-v1", max_len=512)
  c.batch_size = 1024
  c.steps = 400_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.keep_every = 50_000
  c.optim.update(lr=6e-4, warmup_steps=4000, weight_decay=0.01, eps=1e-6)
  c.precision = "bfloat16"
  c.parallel.fsdp = 4
  return c
