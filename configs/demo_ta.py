"""Demo teaching-assistant chain: the packaged all-MiniLM-L6-v2 (6×384) → assistant 6×192 (the teacher's
depth, the student's width) → 3×192 student, MiniLMv2 with 12 relation heads, on the embedded corpus.

  minilm-distill --config configs/demo_ta.py --workdir workdirs/demo_ta

Cost: about 8 minutes on 2 CPU cores (150 assistant steps and 150 student steps of 32×128 tokens).
Writes workdirs/demo_ta/assistant/student (the assistant), workdirs/demo_ta/student and loss_chain.png.
Target: v5e-4 (minilm-compile --config configs/demo_ta.py --target v5e-4; its figures: docs/compile.md)
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"
  c.student.update(num_layers=3, hidden_size=192, num_heads=12, intermediate_size=768, init="random")
  c.assistant.update(enabled=True, steps=150)
  c.loss.update(version="v2", relation_heads=12, teacher_layer=-1)
  c.data.update(source="stdlib", max_len=128)
  c.batch_size = 32
  c.steps = 150
  c.log_every = 10
  c.checkpoint_every = 50
  c.optim.update(lr=1e-3, warmup_steps=20)
  return c
