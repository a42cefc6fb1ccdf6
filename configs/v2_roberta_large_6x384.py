"""MiniLMv2 recipe: RoBERTa-large teacher → 6×384 student, teacher layer 19 of 24, A_r = 64.

  minilm-distill --config configs/v2_roberta_large_6x384.py --workdir gs://BUCKET/minilm/v2_roberta

RoBERTa positions are offset by the padding index (handled by the encoder); max_len is at most 512.
Cost (estimate): 1.2e20 FLOPs at batch 1024 × 400k × 512, about 0.8 days on a TPU v4-32 at 40% MFU.
Target: v4-32 (minilm-compile --config configs/v2_roberta_large_6x384.py --target v4-32; its figures: docs/compile.md)
Layout: weights sharded over 4 chips (parallel.fsdp=4): 124.4 ms a step on the v4-32 against 124.8
data-parallel, by the compiler's estimate; on fewer than 4 devices add --config.parallel.fsdp=1.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "roberta-large"
  c.student.update(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, init="random")
  c.loss.update(version="v2", relation_heads=64, teacher_layer=19)
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
