"""MiniLM v1 recipe: BERT-base teacher → 6×384 student (12 heads, as v1 needs equal head counts).

  minilm-distill --config configs/v1_bert_base_6x384.py --workdir gs://BUCKET/minilm/v1_6x384

Paper: as 6×768 but batch 256 and peak lr 3e-4; 400k steps at seq 512. Reported (Table 3,
SQuAD2/MNLI/SST-2 average): 81.9, and 82.1 through a 12×384 teaching assistant (configs/ta_*.py).
Cost (estimate): 1.3e19 FLOPs, about 0.3 days on a TPU v4-8 at 40% MFU.
Target: v4-8 (minilm-compile --config configs/v1_bert_base_6x384.py --target v4-8; its figures: docs/compile.md)
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "bert-base-uncased"
  c.student.update(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, init="random")
  c.loss.update(version="v1", relation_heads=12, teacher_layer=-1)
  c.data.update(source="wikitext", hub_config="wikitext-103-raw-v1", max_len=512)
  c.batch_size = 256
  c.steps = 400_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.keep_every = 50_000
  c.optim.update(lr=3e-4, warmup_steps=4000, weight_decay=0.01, eps=1e-6)
  c.precision = "bfloat16"
  return c
