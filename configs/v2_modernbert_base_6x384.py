"""MiniLMv2 recipe for a ModernBERT teacher: ModernBERT-base (22×768) → a 6×384 ModernBERT student,
Q-Q/K-K/V-V relations over 48 relation heads of the last layer, as configs/v2_bert_base_6x384.py does for
BERT-base (the papers' base-size settings: batch 1024, 400k steps, lr 6e-4, 4k warmup, seq 512).

  minilm-distill --config configs/v2_modernbert_base_6x384.py --workdir gs://BUCKET/minilm/mb_6x384

The student is a ModernBERT too: 6 heads of 64 like the teacher's, GeGLU FFN of 576 (the teacher's
1.5× ratio), global attention in layers 0 and 3 (the teacher's every-3rd rhythm) and ±64-token windows
elsewhere, the teacher's rotary thetas. The relations use Q and K after the rotation (modernbert.py).
For long documents raise data.max_len (up to the teacher's 8,192; the attention and the relation loss
then run in chunks and blocks, docs/modernbert.md).
Cost (estimate, bench.step_flops × 400k steps): 5.9e19 FLOPs, about 1.6 days on a TPU v4-8 at 40% MFU.
Target: v4-32 (minilm-compile --config configs/v2_modernbert_base_6x384.py --target v4-32; its figures: docs/compile.md)
Layout: data-parallel: 94.4 ms a step on the v4-32 against 98.4 with the weights sharded over 4 chips
(--config.parallel.fsdp=4, 2.0 GiB a chip instead of 2.4), by the compiler's estimate.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "answerdotai/ModernBERT-base"
  c.student.update(num_layers=6, hidden_size=384, num_heads=6, intermediate_size=576, init="random")
  c.loss.update(version="v2", relation_heads=48, teacher_layer=-1)
  c.data.update(source="wikitext", hub_config="wikitext-103-raw-v1", max_len=512)
  c.batch_size = 1024
  c.steps = 400_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.keep_every = 50_000
  c.optim.update(lr=6e-4, warmup_steps=4000, weight_decay=0.01, eps=1e-6)
  c.precision = "bfloat16"
  return c
