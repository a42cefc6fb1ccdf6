"""Demo: the packaged all-MiniLM-L6-v2 (6×384) distilled into a 3×384 student with the MiniLMv2 loss,
on the embedded standard-library corpus. Works offline.

  minilm-distill --config configs/demo.py --workdir workdirs/demo

Cost: about 6 minutes on 2 CPU cores (250 steps of 32×128 tokens at ~1.4 s a step, plus ~30 s of
tokenising and compiling). The loss falls from about 2.3 to about 0.75. The corpus is a small demo corpus
(~425k tokens of Python documentation), not a pretraining corpus.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"   # resolves to the packaged copy offline
  c.student.update(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536, init="random")
  c.loss.update(version="v2", relation_heads=12, teacher_layer=-1)
  c.data.update(source="stdlib", max_len=128)
  c.batch_size = 32
  c.steps = 250
  c.log_every = 10
  c.checkpoint_every = 50
  c.optim.update(lr=1e-3, warmup_steps=30)
  return c
