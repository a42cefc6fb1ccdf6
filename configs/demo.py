"""Demo: the packaged all-MiniLM-L6-v2 (6×384) distilled into a 3×384 student on the embedded
standard-library corpus, with the MiniLMv2 relation loss plus the sentence-embedding term. Offline.

  make demo          # = minilm-distill --config configs/demo.py --workdir workdirs/demo
  minilm-eval --workdir workdirs/demo --no-finetune

Cost, measured alone on this project's 2-core CPU machine: 3.5-6 minutes (45-80 s to choose the start,
then 120 steps of 32×128 tokens at 1.3-2.3 s a step, plus ~20 s of tokenising and compiling: 209-223 s
on the AMD EPYC of the start study, 344 s on an Intel Xeon); the evaluation 4-6 more (it also chooses
the best layer subset for its baseline). The student starts
from the best subset of the teacher's layers (student.init="best": all 20 choices of 3 of its 6 layers
scored on a dev sample of the training corpus before the first step; it picks 0, 4, 5), the start study's winner
(docs/results.md, "Which start"): ahead of every undistilled student of its shape, the best layer
subset included, on retrieval (+2.3 SE) and agreement (+13.1 SE), with a held-out relation loss 34% of
the best subset's; other texts, seeds and the margins: docs/results.md, "The demo". The corpus is a
small demo corpus (~425k tokens of Python documentation), not a pretraining corpus.
The start before 2026-12-06, every 2nd layer (0, 2, 4): --config.student.init=teacher
Target: v5e-4 (minilm-compile --config configs/demo.py --target v5e-4; its figures: docs/compile.md)
"""

from minilm_jax.config import default_config


def get_config():
  c = default_config()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"   # resolves to the packaged copy offline
  c.student.update(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536, init="best")
  c.loss.update(version="v2", relation_heads=12, teacher_layer=-1, terms="relations,embedding")
  c.data.update(source="stdlib", max_len=128)
  c.batch_size = 32
  c.steps = 120
  c.log_every = 10
  c.checkpoint_every = 40
  c.optim.update(lr=3e-4, warmup_steps=12)
  return c
