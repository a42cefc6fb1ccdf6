"""Where the training step's time goes: each part jitted and timed on its own (fp32, this machine).

  python benchmarks/step_parts.py

Shapes: the packaged 6×384 teacher, the default 3×384 student, batch 32 × 128, MiniLMv2 with 12
relation heads, a quarter of the rows half padded (the benchmark's target shape). Parts overlap: the
"student forward + backward + loss" line includes the student forward and the loss.
"""

import json
import time

import jax
import optax

from minilm_jax import bench, config, hf, losses, objective, optimizer, sharding, train
from minilm_jax.model import encoder_for


def timeit(f, *args, n=5):
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  return 1e3 * (time.perf_counter() - t) / n


def main():
  cfg = config.default_config()
  cfg.teacher = hf.packaged_teacher_path()
  s = train.setup(cfg)
  b = sharding.put_batch(s.mesh, bench.make_batch(32, 128, s.teacher_config.vocab_size, 0.25))
  ids, mask = b["input_ids"], b["attention_mask"]
  state = s.init_state()
  teacher, student = encoder_for(s.teacher_config), encoder_for(s.student_config)
  loss = lambda t, x: losses.minilm_v2_loss(t, x, mask, cfg.loss.relation_heads)
  t_fwd = jax.jit(lambda p: teacher.apply({"params": p}, ids, mask, stop_at_capture=True).qkv)
  s_fwd = jax.jit(lambda p: student.apply({"params": p}, ids, mask, stop_at_capture=True).qkv)
  tq, sq = t_fwd(s.teacher_params), s_fwd(state.params)
  distill = objective.distill_loss_fn(cfg, teacher, student, s.teacher_layer)
  s_grad = jax.jit(jax.grad(lambda p, k: distill(p, s.teacher_params, b, k)))
  s_grad_nodrop = jax.jit(jax.grad(lambda p: distill(p, s.teacher_params, b)))
  grads = s_grad(state.params, jax.random.key(0))
  tx = optimizer.make_optimizer(cfg, state.params, s.student_config)
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
  parts = {
      "teacher forward (to its last Q/K/V)": timeit(t_fwd, s.teacher_params),
      "student forward (to its last Q/K/V)": timeit(s_fwd, state.params),
      "loss forward": timeit(jax.jit(loss), tq, sq),
      "loss forward + backward": timeit(jax.jit(jax.grad(loss, argnums=1)), tq, sq),
      "teacher + student forward + backward + loss, dropout": timeit(s_grad, state.params,
                                                                     jax.random.key(0)),
      "same without dropout": timeit(s_grad_nodrop, state.params),
      "AdamW update": timeit(update, grads, state.opt_state, state.params),
  }
  for name, ms in parts.items():
    print(json.dumps({"part": name, "ms": round(ms, 1)}))


if __name__ == "__main__":
  main()
