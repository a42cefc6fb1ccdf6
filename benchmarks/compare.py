"""Our jitted step against the PyTorch peers (eager, and torch.compile), side by side in one run.

  python benchmarks/compare.py [--rounds 2] [--steps 10] [--out FILE.jsonl] [-- extra args for both]

Defaults: the packaged all-MiniLM-L6-v2 teacher (6×384) → 3×384 student (12 heads, FFN 1536), batch 32,
seq 128, MiniLMv2 with 12 relation heads, a quarter of the rows half padded, fp32. The three run
alternately in separate processes (so none inherits another's thread pools), `--rounds` times, and
the best of each is compared: this machine's speed drifts by tens of percent between minutes.
`--no-compile` leaves the torch.compile peer out; `--one-device` adds our step on one XLA:CPU device
(ours otherwise splits the host as the trainer does: parallel.cpu_devices, minilm_jax/xla_flags.py). `--out` writes every round's JSON line and the summary
(with the date, the commit and the command) to a file: docs/results/compare.jsonl holds the one that
docs/make_tables.py turns into the peers table.
"""

import argparse
import json
import os
import sys

import record

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--teacher", default="")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--no-compile", action="store_true")
  p.add_argument("--one-device", action="store_true",
                 help="also run our step on one XLA:CPU device (--cpu-devices 1), as it ran before the "
                      "trainer split a CPU host into one device per core")
  p.add_argument("--out", help="write every round and the summary here (JSON lines)")
  args, extra = p.parse_known_args()
  prov = record.provenance("benchmarks/compare.py")
  extra = [a for a in extra if a != "--"]
  if not args.teacher:
    from minilm_jax import hf
    args.teacher = hf.packaged_teacher_path()
  shape = ["--teacher", args.teacher, "--student-layers", "3", "--student-hidden", "384",
           "--student-heads", "12", "--student-intermediate", "1536", "--batch", "32", "--seq", "128",
           "--relation-heads", "12", "--steps", str(args.steps), "--padded-fraction", "0.25", *extra]
  bench = [sys.executable, "-m", "minilm_jax.bench", "--loss", "v2", *shape]
  peer = [sys.executable, os.path.join(HERE, "torch_peer.py"), *shape]
  commands = {"torch_eager": peer} if args.no_compile else {"torch_eager": peer,
                                                            "torch_compile": [*peer, "--compile"]}
  if args.one_device:
    commands = {"minilm_jax_one_device": [*bench, "--cpu-devices", "1"], **commands}
  peers = {name: [] for name in commands}
  ours, lines = [], []

  def note(impl, r, round_):
    lines.append({**r, "impl": impl, "round": round_})  # ours says "minilm_jax" on either device count
    print(json.dumps(r), flush=True)

  for i in range(args.rounds):
    ours.append(record.run_json(bench))
    note("minilm_jax", ours[-1], i)
    for name, runs in peers.items():
      runs.append(record.run_json(commands[name]))
      note(name, runs[-1], i)
  best_ours = max(ours, key=lambda r: r["tokens_per_s"])
  peak = max(r["peak_flops_per_s"] for r in ours)
  mfu = lambda r: r["model_flops_per_step"] * r["tokens_per_s"] / (32 * 128) / peak
  summary = {"minilm_jax_tokens_per_s": best_ours["tokens_per_s"], "minilm_jax_mfu": mfu(best_ours),
             "peak_flops_per_s": peak}
  for name, runs in peers.items():
    best = max(runs, key=lambda r: r["tokens_per_s"])
    summary.update({f"{name}_tokens_per_s": best["tokens_per_s"], f"{name}_mfu": mfu(best),
                    f"speedup_over_{name}": best_ours["tokens_per_s"] / best["tokens_per_s"]})
  print(json.dumps(summary))
  if args.out:
    summary = {"impl": "summary", **prov, **summary}
    record.write_jsonl(args.out, lines + [summary])


if __name__ == "__main__":
  main()
