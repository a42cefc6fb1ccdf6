"""MiniLM v1 with a teaching assistant (paper Table 3): BERT-base (12×768) → assistant (12×384, the
teacher's depth and the student's width) → 6×384 student.

  minilm-distill --config configs/ta_bert_base_6x384.py --workdir gs://BUCKET/minilm/ta_6x384

Stage 1 runs in WORKDIR/assistant (its own checkpoints and export), stage 2 in WORKDIR; rerunning the
command resumes whichever stage was interrupted. Reported: 82.1 average (SQuAD2/MNLI/SST-2), against
81.9 without the assistant.
Cost (estimate): 1.3e19 FLOPs for the student stage at batch 256 × 400k × 512, and about 2.6e19 for the
12-layer assistant stage: about 1 day on a TPU v4-8 at 40% MFU for both.
Target: v4-8 (minilm-compile --config configs/ta_bert_base_6x384.py --target v4-8; its figures: docs/compile.md)
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "bert-base-uncased"
  c.student.update(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, init="random")
  c.assistant.update(enabled=True, steps=400_000)
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
