"""MiniLM v1 recipe (Wang et al. 2020): BERT-base teacher → 6×768 student, attention + value relation.

  minilm-distill --config configs/v1_bert_base_6x768.py --workdir gs://BUCKET/minilm/v1_6x768 \
      --config.data.source=wikitext --config.data.hub_config=wikitext-103-raw-v1

Paper: batch 1024, 400k steps, peak lr 5e-4, 4k warmup then linear decay, seq 512, dropout 0.1, weight
decay 0.01, on English Wikipedia + BookCorpus (use your own corpus; wikitext-103 is a small stand-in).
Cost (estimate, bench.minilm_flops_per_step × 400k steps): 9.0e19 FLOPs, about 0.6 days on a TPU v4-32
(16 chips) at 40% MFU, 2.4 days on a v4-8.
Reported dev average over 8 tasks: 80.4 (BERT-base 81.5).
Target: v4-32 (minilm-compile --config configs/v1_bert_base_6x768.py --target v4-32; its figures: docs/compile.md)
Layout: weights sharded over 4 chips (parallel.fsdp=4): 78.4 ms a step on the v4-32 against 80.5
data-parallel, by the compiler's estimate; on fewer than 4 devices add --config.parallel.fsdp=1.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "bert-base-uncased"
  c.student.update(num_layers=6, hidden_size=768, num_heads=12, intermediate_size=3072, init="random")
  c.loss.update(version="v1", relation_heads=12, teacher_layer=-1)
  c.data.update(source="wikitext", hub_config="wikitext-103-raw-v1", max_len=512)
  c.batch_size = 1024
  c.steps = 400_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.keep_every = 50_000
  c.optim.update(lr=5e-4, warmup_steps=4000, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6)
  c.precision = "bfloat16"
  c.parallel.fsdp = 4
  return c
