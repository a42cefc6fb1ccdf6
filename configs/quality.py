"""Quality against compute: the demo's teacher and 3×384 student, for as long as fits in about an hour on
2 CPU cores, on the bigger "pydocs" corpus (the standard library's text plus every installed package's
docstrings, ~43 MB), keeping a checkpoint every 250 steps for the evaluation curve.

  minilm-distill --config configs/quality.py --workdir workdirs/quality
  minilm-eval --workdir workdirs/quality --curve

Cost, measured on 2 CPU cores: 65 minutes for 2,000 steps of 32×128 tokens (8.2M tokens, each seen once)
with other work sharing the cores, about 50 alone, of which ~3 minutes read and tokenise the corpus;
then 26 minutes of evaluation (the NSP probe and the held-out relation loss at all 8 kept checkpoints,
and the teacher and the three undistilled baselines). Results: README, "Quality against compute".

The student starts from the teacher's first 3 layers: on this budget the probe's best undistilled baseline
is those layers, so distillation has to add to them rather than catch up from random weights.
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"   # resolves to the packaged copy offline
  c.student.update(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536,
                   init="teacher_first")
  c.loss.update(version="v2", relation_heads=12, teacher_layer=-1)
  c.data.update(source="pydocs", max_len=128)
  c.batch_size = 32
  c.steps = 2000
  c.log_every = 25
  c.checkpoint_every = 250
  c.keep_every = 250          # keep them all: minilm-eval --curve evaluates each
  c.optim.update(lr=3e-4, warmup_steps=100)
  return c
