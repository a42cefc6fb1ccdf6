"""MiniLMv2 recipe: BERT-base teacher → 6×384 student, Q-Q/K-K/V-V relations over 48 relation heads.

  minilm-distill --config configs/v2_bert_base_6x384.py --workdir gs://BUCKET/minilm/v2_6x384

Settings of a public re-implementation (the paper gives batch 1024 / 400k steps for base-size students):
AdamW eps 1e-6, weight decay 0.01, lr 6e-4, 4k warmup, A_r = 48, seq 512.
Cost (estimate): 5.2e19 FLOPs at batch 1024, about 1.4 days on a TPU v4-8 at 40% MFU.
Target: v4-32 (minilm-compile --config configs/v2_bert_base_6x384.py --target v4-32; its figures: docs/compile.md)
Layout: weights sharded over 4 chips (parallel.fsdp=4): 72.5 ms a step on the v4-32 against 74.1
data-parallel, by the compiler's estimate; on fewer than 4 devices add --config.parallel.fsdp=1.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "bert-base-uncased"
  c.student.update(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, init="random")
  c.loss.update(version="v2", relation_heads=48, teacher_layer=-1)
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
