"""minilm-eval's commands on tiny trained runs: the table of one or several runs with baselines, read-only,
and the curve; runs read remotely, with their teacher elsewhere, chains, ModernBERT, and one-line errors."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from minilm_jax import remote
from minilm_jax.evaluation import commands, protocol, runs, subsets
from evaluation_helpers import TINY, eval_cli, site, snapshot, train_run  # noqa: F401 (site: a fixture)


def test_evaluate_run_table_read_only_and_curve(tiny_teacher, tiny_corpus, tmp_path, site):
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "run"))
  tmp = os.path.join(w, "checkpoints", "7.orbax-checkpoint-tmp-123")  # another process's save in flight
  os.makedirs(tmp)
  before = snapshot(w)
  results = commands.evaluate_run(w, protocol=TINY, baselines=False, package_roots=site, log=lambda m: None)
  assert os.path.isdir(tmp) and snapshot(w) == before  # nothing but eval/ written or removed
  assert set(results) == {"teacher", "student: run"}
  for name, row in results.items():
    for m in ("retrieval_mrr", "agreement", "package_linear", "nsp", "package"):
      assert 0 <= row[m]["value"] <= 1 and ("spread" in row[m] or row[m]["se"] >= 0), (name, m)
    for m in ("nsp", "package"):
      assert len(row[m]["seeds"]) == 2 and {"lr", "epoch", "dev", "test"} <= set(row[m]["seeds"][0])
  assert results["teacher"]["agreement"]["value"] == 1.0 and results["teacher"]["agreement"]["se"] == 0.0
  loss = results["student: run"]["heldout_relation_loss"]
  assert np.isfinite(loss["value"]) and loss["value"] > 0 and loss["se"] > 0
  for name in ("results.json", "results.md", "results.png"):
    assert os.path.isfile(os.path.join(w, "eval", name))
  text = open(os.path.join(w, "eval", "results.md")).read()
  table, differences = text.split("\n\nDifferences, paired")
  table = table.splitlines()
  assert "(± sd, 2 seeds)" in table[0] and "(± SE)" in table[0]
  for line in table[2:]:  # every number has its ± next to it
    cells = [c.strip() for c in line.strip("|").split("|")[2:]]
    assert all(c == "" or " ± " in c for c in cells), line
  saved = json.load(open(os.path.join(w, "eval", "results.json")))
  assert saved["settings"]["protocol"]["seeds"] == 2 and len(saved["package_labels"]) == 12
  # The student against the teacher, paired over the same items, for every metric both have.
  d = saved["differences"]["student: run − teacher"]
  assert set(d) == {"retrieval_mrr", "agreement", "package_linear", "nsp", "package"}
  for m, v in d.items():
    assert v["value"] == pytest.approx(results["student: run"][m]["value"] - results["teacher"][m]["value"])
    assert v["se"] >= 0 and (v["se"] == 0 or v["z"] == pytest.approx(v["value"] / v["se"])), m
  row = next(line for line in differences.splitlines() if line.startswith("| student: run − teacher |"))
  assert all(re.fullmatch(r"[+-]\d\.\d+ ± \d\.\d+ \([+-]\d+\.\d SE\)", c.strip())
             for c in row.strip("|").split("|")[1:]), row

  with pytest.raises(ValueError, match="same settings"):
    commands.evaluate_curve(w, protocol=protocol.Protocol(), package_roots=site, log=lambda m: None)
  curve = commands.evaluate_curve(w, protocol=TINY, package_roots=site, log=lambda m: None)
  assert sorted(curve) == [2, 4] and curve[2]["tokens"] == 2 * 8 * 32  # the kept checkpoints
  assert os.path.isdir(tmp)
  # The last checkpoint holds the exported student's params: the same scores as in the table.
  final = results["student: run"]
  for m in ("heldout_relation_loss", "retrieval_mrr", "agreement", "package_linear"):
    assert curve[4][m]["value"] == pytest.approx(final[m]["value"], rel=1e-5), m
  assert curve[2]["heldout_relation_loss"]["value"] != pytest.approx(loss["value"], rel=1e-6)
  assert "nsp" not in curve[4]  # the curve fine-tunes only when asked
  for name in ("curve.json", "curve.png"):
    assert os.path.isfile(os.path.join(w, "eval", name))


def test_evaluate_run_on_a_text_of_one_document(tiny_teacher, tiny_corpus, tmp_path, site):
  # One document (lines, no blank line: the nsp probe hung on it), as JSON Lines under another field.
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "run"))
  words = "alpha beta gamma delta omega kappa sigma theta".split()
  rng = np.random.default_rng(0)

  def one_doc(path, n):
    path.write_text(json.dumps({"content": "\n".join(
        f"Line {i} says {' '.join(rng.choice(words, 5))}." for i in range(n))}) + "\n")
    return str(path)

  text = one_doc(tmp_path / "one.jsonl", 120)
  results = commands.evaluate_run(w, str(tmp_path / "out"), text=text, text_field="content",
                                  protocol=dataclasses.replace(TINY, seeds=1), baselines=False,
                                  package_roots=site, log=lambda m: None)
  for row in results.values():
    assert row["nsp"]["n"] == 32 and row["nsp"]["n_train"] == 40 and 0 <= row["nsp"]["value"] <= 1
  saved = json.load(open(tmp_path / "out" / "results.json"))
  assert saved["settings"]["text_field"] == "content"
  # Too little text for the probe (halves of 10 and 11 sentences, few of them 9 apart) is one line, before
  # any model is evaluated or site-packages parsed; the CLI's --text-field is what reads the text.
  short = one_doc(tmp_path / "short.jsonl", 21)
  r = eval_cli("--workdir", w, "--text", short, "--out", str(tmp_path / "out2"))
  assert r.returncode == 2 and "no text field 'text'" in r.stderr
  r = eval_cli("--workdir", w, "--text", short, "--text-field", "content", "--out", str(tmp_path / "out2"))
  assert r.returncode == 2 and r.stderr.strip() == (
      "minilm-eval: error: the held-out text gives 2 next-sentence pairs from its first half and 6 from "
      "its second; the nsp probe needs at least 20 in each (more text, or --no-finetune to skip it)")
  assert not os.path.exists(tmp_path / "out2")


def test_several_runs_in_one_table_with_one_set_of_baselines(tiny_teacher, tiny_corpus, tmp_path, site,
                                                             monkeypatch):
  a = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "a"))
  b = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "b"), seed=1,
                **{"optim.lr": 1e-3, "student.init": "layers:1"})
  with pytest.raises(ValueError, match="--out"):
    commands.evaluate_run([a, b], protocol=TINY, finetune_too=False, package_roots=site)
  out = str(tmp_path / "both")
  pairs = tmp_path / "pairs.jsonl"   # an STS file: one pair longer than the tiny teacher's 64 positions
  rng = np.random.default_rng(0)
  words = "alpha beta gamma delta omega kappa".split()
  pairs.write_text("".join(json.dumps({"s1": " ".join(rng.choice(words, 4)), "s2": " ".join(rng.choice(words, 4)),
                                       "sim": float(i % 5)}) + "\n" for i in range(29)) +
                   json.dumps({"s1": "long " * 40, "s2": "short one", "sim": 2.5}) + "\n")
  seen = {}   # what the best-subset chooser is given, and the test probe
  choose, make_suite = subsets.choose, commands.make_suite
  monkeypatch.setattr(subsets, "choose", lambda *a: seen.setdefault("dev", a[4]) and choose(*a))
  search = subsets.search   # the best subset is teacher layer 1, which student b started from
  monkeypatch.setattr(subsets, "search", lambda *a, **k: ((1,), *search(*a, **k)[1:]))
  monkeypatch.setattr(commands, "make_suite", lambda *a: seen.setdefault("suite", make_suite(*a)))
  results = commands.evaluate_run([a, b], out, protocol=TINY, finetune_too=False, package_roots=site,
                                  log=lambda m: None, sts=[f"{pairs}:s1,s2,sim"])
  # 1 of the teacher's 2 layers: every 2nd layer from layer 0 is the first, from layer 1 another model;
  # the best subset (forced to layer 1 above) is that baseline's params, scored once.
  assert list(results) == ["teacher", "student: a", "student: b", "baseline: random init",
                           "baseline: first teacher layers", "baseline: every k-th teacher layer from layer 1",
                           "baseline: best layer subset"]
  best = results["baseline: best layer subset"]
  # the untrained baseline made of layer 1, not student b, trained from it
  assert best["same_as"] == "baseline: every k-th teacher layer from layer 1"
  assert best["teacher_layers"] == results[best["same_as"]]["teacher_layers"] == [1]
  assert results["student: b"]["teacher_layers"] == [1]
  assert best["retrieval_mrr"] == results[best["same_as"]]["retrieval_mrr"]
  assert "teacher_layers" not in results["student: a"]   # a random init
  assert len(seen["dev"].query_N) == 60 and not set(seen["dev"].sentences) & set(seen["suite"].probe.sentences)
  assert results["student: a"]["heldout_relation_loss"] != results["student: b"]["heldout_relation_loss"]
  assert all("nsp" not in row for row in results.values())
  table, differences = open(os.path.join(out, "results.md")).read().split("\n\nDifferences, paired")
  assert table.count("baseline: random init") == 1 and "student: a" in table and "student: b" in table
  assert "| student: a − student: b |" in differences and "| student: b − student: a |" in differences
  assert not os.path.exists(os.path.join(a, "eval"))
  # The STS probe: both correlations in every row, paired differences, and the cut pair said.
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["settings"]["sts"] == [f"{pairs}:s1,s2,sim"]
  for name, row in results.items():
    for stat in ("spearman", "pearson"):
      r = row[f"sts:pairs.jsonl:{stat}"]
      assert -1 <= r["value"] <= 1 and r["se"] > 0 and r["n"] == 30 and r["truncated"] == 1, (name, stat)
  assert set(saved["differences"]["student: a − teacher"]) >= {"sts:pairs.jsonl:spearman", "sts:pairs.jsonl:pearson"}
  assert "pairs.jsonl: 1 of 30 pairs (cut to 64 tokens)" in table
  assert f"| baseline: best layer subset (teacher layers {best['teacher_layers'][0]}) |" in table
  assert saved["best_subset"]["layers"] == best["teacher_layers"] and saved["best_subset"]["how"] == "every subset"
  assert f"The best layer subset, teacher layers {best['teacher_layers'][0]} (the same model as" in table
  assert "| student: a − baseline: best layer subset |" in differences
  c = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "c"), **{"student.hidden_size": 32})
  with pytest.raises(ValueError, match="another student shape.*hidden_size"):
    commands.evaluate_run([a, c], out, protocol=TINY, finetune_too=False, package_roots=site)


def test_a_remote_run_is_read_in_place_and_its_results_go_to_the_local_mirror(tiny_teacher, tiny_corpus,
                                                                              tmp_path, site, monkeypatch):
  """A gs:// workdir (a local folder stands in for the bucket, as in test_train): minilm-eval reads its
  checkpoints and student where they are and writes nothing to it."""
  from minilm_jax import workdir as wd
  monkeypatch.setattr(wd, "is_remote", lambda path: True)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  bucket = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "bucket"))
  before = snapshot(bucket)
  results = commands.evaluate_run(bucket, protocol=TINY, finetune_too=False, baselines=False,
                                  package_roots=site, log=lambda m: None)
  assert set(results) == {"teacher", "student: bucket"} and snapshot(bucket) == before
  assert not os.path.exists(os.path.join(bucket, "eval"))
  assert wd.eval_dir(bucket).startswith(str(tmp_path / "home"))
  assert os.path.isfile(os.path.join(wd.eval_dir(bucket), "results.md"))


def test_a_run_whose_teacher_is_elsewhere_here(tiny_teacher, tiny_corpus, tmp_path, site, monkeypatch):
  """A run distilled on another machine records its teacher's path there. minilm-eval then takes the
  run's config.teacher as resolved here (a hub id's packaged copy at another site-packages, say), or
  --teacher; either is checked against the recorded sha256, and nothing is written on an error."""
  import shutil
  there, here = tmp_path / "there" / "teacher", tmp_path / "here" / "teacher"
  shutil.copytree(tiny_teacher, there)
  monkeypatch.setitem(remote.PACKAGED, "org/tiny", "no_such_module")
  monkeypatch.setattr(remote, "packaged_teacher_path", lambda: str(there))
  w = train_run("org/tiny", tiny_corpus, str(tmp_path / "run"))
  shutil.move(there, here)  # the teacher's packaged copy lives elsewhere on this machine

  def not_installed():
    raise FileNotFoundError("the packaged teacher is not installed")
  monkeypatch.setattr(remote, "packaged_teacher_path", not_installed)
  run = lambda **kw: commands.evaluate_run(w, str(tmp_path / "out"), protocol=TINY, finetune_too=False,
                                           baselines=False, package_roots=site, log=lambda m: None, **kw)
  with pytest.raises(FileNotFoundError, match=f"teacher at {there}, which is not on this machine, and its "
                     "config's teacher 'org/tiny' is not found here either .*give its folder with --teacher"):
    run()
  assert not os.path.exists(tmp_path / "out")
  monkeypatch.setattr(remote, "packaged_teacher_path", lambda: str(here))
  results = run()
  assert set(results) == {"teacher", "student: run"}
  assert json.load(open(tmp_path / "out" / "results.json"))["teacher"] == str(here)

  # --teacher names it directly; a folder with other weights or another tokenizer is refused.
  other, tok = tmp_path / "other", tmp_path / "tok"
  shutil.copytree(here, other)
  config = json.load(open(other / "config.json"))
  json.dump({**config, "layer_norm_eps": 1e-6}, open(other / "config.json", "w"))
  shutil.copytree(here, tok)
  with open(tok / "tokenizer_config.json", "a") as f:
    f.write("\n")
  shutil.rmtree(tmp_path / "out")
  for folder, what in ((other, "config or weights"), (tok, "tokenizer")):
    with pytest.raises(ValueError, match=f"{folder} is not the teacher {w} was distilled from: its {what} "
                       "differ"):
      run(teacher=str(folder))
    assert not os.path.exists(tmp_path / "out")
  r = eval_cli("--workdir", w, "--teacher", str(tmp_path / "nowhere"), "--no-finetune", "--out",
               str(tmp_path / "out"))
  assert r.returncode == 2 and r.stderr.strip() == f"minilm-eval: error: {tmp_path / 'nowhere'}: no such folder"
  again = run(teacher=str(here))["student: run"]
  for m in ("retrieval_mrr", "agreement", "package_linear", "heldout_relation_loss"):
    assert again[m] == results["student: run"][m], m


def test_a_chain_is_evaluated_with_its_assistant_also_after_the_run_moved(tiny_teacher, tiny_corpus,
                                                                          tmp_path, site):
  """A teaching-assistant chain's table has the assistant's row; the assistant is read from the run's own
  assistant/ folder (checked against the sha256 the student stage recorded), so a moved run still reads."""
  import shutil
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "chain"),
                **{"assistant.enabled": True, "assistant.steps": 2})
  moved = str(tmp_path / "moved")
  shutil.move(w, moved)
  results = commands.evaluate_run(moved, str(tmp_path / "out"), protocol=TINY, finetune_too=False,
                                  baselines=False, package_roots=site, log=lambda m: None)
  assert list(results) == ["teacher", "assistant", "student: moved"]
  assert (results["assistant"]["layers"], results["assistant"]["hidden"]) == (2, 16)
  assert results["teacher"]["hidden"] == 32 and results["teacher"]["agreement"]["value"] == 1.0


def test_minilm_eval_one_line_errors(tmp_path, tmp_path_factory):
  r = eval_cli("--workdir", str(tmp_path))
  assert r.returncode == 2
  assert r.stderr.strip() == f"minilm-eval: error: {tmp_path}: no checkpoint; is this a minilm-distill workdir?"
  assert os.listdir(tmp_path) == []  # nothing created
  r = eval_cli("--workdir", str(tmp_path), "--out", str(tmp_path / "checkpoints"))
  assert r.returncode == 2 and r.stderr.strip().startswith(
      f"minilm-eval: error: --out {tmp_path / 'checkpoints'} is inside the run {tmp_path}, which "
      "minilm-eval only reads")
  assert os.listdir(tmp_path) == []
  runs.check_out(str(tmp_path / "eval" / "v2"), [str(tmp_path)])  # its own eval/ is fine
  runs.check_out(str(tmp_path.parent / "elsewhere"), [str(tmp_path)])
  r = eval_cli("--workdir", str(tmp_path), "--lr", "-1")
  assert r.returncode == 2 and r.stderr.strip() == (
      "minilm-eval: error: --lr -1.0: learning rates must be positive and finite")
  empty = tmp_path_factory.mktemp("sts") / "e.csv"
  empty.write_text("a,b,s\n")   # --sts reaches the loader, before any run is read
  r = eval_cli("--workdir", str(tmp_path), "--sts", f"{empty}:a,b,s")
  assert r.returncode == 2 and r.stderr.strip() == (
      f"minilm-eval: error: STS file {empty}: no pairs (an empty file, or a header line only)")
  assert os.listdir(tmp_path) == []
  r = eval_cli("--workdir", str(tmp_path), "--workdir", str(tmp_path / "b"))
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "minilm-eval: error: several runs: give --out DIR for the shared table"]


def test_a_modernbert_run_is_evaluated_with_its_baselines(tiny_modernbert, tiny_corpus, tmp_path, site):
  w = train_run(tiny_modernbert, tiny_corpus, str(tmp_path / "mb"), **{"student.num_layers": 2})
  results = commands.evaluate_run(w, protocol=TINY, finetune_too=False, package_roots=site,
                                  log=lambda m: None)
  assert set(results) == {"teacher", "student: mb", "baseline: random init",
                          "baseline: first teacher layers", "baseline: every k-th teacher layer",
                          "baseline: every k-th teacher layer from layer 1", "baseline: best layer subset"}
  for name, row in results.items():
    assert 0 <= row["retrieval_mrr"]["value"] <= 1, name
  # The baselines are the student's architecture without distillation, so their relation loss differs.
  losses_ = {n: r["heldout_relation_loss"]["value"] for n, r in results.items()
             if n not in ("teacher", "baseline: best layer subset")}
  assert len(set(losses_.values())) == 5 and all(np.isfinite(v) for v in losses_.values())
  # 2 of 4 ModernBERT layers: every one of the 6 subsets scored, the best sliced like the others.
  best = json.load(open(os.path.join(w, "eval", "results.json")))["best_subset"]
  assert len(best["scored"]) == 6 and results["baseline: best layer subset"]["teacher_layers"] == best["layers"]
