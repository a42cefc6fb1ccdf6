"""The model card (README.md) of an exported student: what the Hugging Face hub shows for the folder.

It says what the student is (teacher, shape, objective, training budget, data) and how to load it, and
carries the evaluation table when `minilm-eval` has written one for the run before the export. The trainer
writes it at export; rerunning the finished run's command exports again and so refreshes the card.
"""

import os
from typing import Optional

from minilm_jax import hf


def _is_hub_id(name: str) -> bool:
  return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "://" not in name


def model_card(cfg: dict, student_config: dict, steps: int, sentence_transformers: bool,
               eval_table: Optional[str] = None) -> str:
  """The card's Markdown. `cfg` is the run's config as a dict, `student_config` the student's HF config."""
  teacher, loss, data = cfg["teacher"], cfg["loss"], cfg["data"]
  terms = [t.strip() for t in loss["terms"].split(",") if t.strip()]
  weights = list(loss.get("term_weights") or ()) or [1.0] * len(terms)
  objective = " + ".join(f"{w:g}·{t}" for w, t in zip(weights, terms))
  if "relations" in terms:
    objective += (f" (MiniLM {loss['version']} relations at teacher layer {loss['teacher_layer']}"
                  + (f", {loss['relation_heads']} relation heads" if loss["version"] == "v2" else "") + ")")
  tokens = steps * cfg["batch_size"] * data["max_len"]  # batch_size is global: grad_accum splits it
  front = ["---", f"library_name: {'sentence-transformers' if sentence_transformers else 'transformers'}",
           f"pipeline_tag: {'sentence-similarity' if sentence_transformers else 'feature-extraction'}",
           "tags: [minilm, distillation, minilm_jax]"]
  if _is_hub_id(teacher):
    front.append(f"base_model: {teacher}")
  front.append("---")
  sc = student_config
  modern = sc.get("model_type") == "modernbert"
  shape = (f"{sc['num_hidden_layers']} layers, hidden {sc['hidden_size']}, {sc['num_attention_heads']} "
           f"heads, FFN {sc['intermediate_size']}")
  if modern:
    shape += (", ModernBERT: global attention in layers "
              f"{', '.join(str(i) for i, t in enumerate(sc['layer_types']) if t == 'full_attention')}, "
              f"±{sc['local_attention'] // 2}-token windows elsewhere")
  pooler = ("It loads as `ModernBertModel`, which has no pooler: use `last_hidden_state` or the sentence "
            "embedding." if modern else "The pooler is the identity (`pooler_output` = tanh of the [CLS] "
            "state): use `last_hidden_state` or the sentence embedding.")
  lines = front + [
      "", f"# A {sc['num_hidden_layers']}×{sc['hidden_size']} student of {teacher}", "",
      "Distilled with minilm_jax (MiniLM deep self-attention distillation in JAX).", "",
      "| | |", "|---|---|",
      f"| teacher | `{teacher}` |",
      f"| student | {shape} |",
      f"| initialisation | {cfg['student']['init']} |",
      f"| objective | {objective} |",
      f"| training | {steps} steps of {cfg['batch_size']}×{data['max_len']} tokens ({tokens:,} tokens), "
      f"lr {cfg['optim']['lr']:g} |",
      f"| data | `{data['source']}` |", "",
      "## Use", "",
  ]
  if sentence_transformers:
    lines += ["```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer(PATH)", "embeddings = model.encode([\"a sentence\", \"another\"])",
              "```", ""]
  lines += ["```python", "from transformers import AutoModel, AutoTokenizer",
            "model, tok = AutoModel.from_pretrained(PATH), AutoTokenizer.from_pretrained(PATH)",
            "out = model(**tok([\"a sentence\"], return_tensors=\"pt\")).last_hidden_state", "```", "",
            f"In Flax: `model, params = minilm_jax.load_student(PATH)`. {pooler}", "",
            "## Evaluation", ""]
  if eval_table:
    lines += ["From `minilm-eval` on this run (the teacher and the undistilled baselines of the same shape "
              "are in the table; ± is one standard error, or the spread over seeds):", "", eval_table.strip(), ""]
  else:
    lines += ["Not evaluated yet: run `minilm-eval --workdir WORKDIR`, then the training command again to "
              "put the table here.", ""]
  return "\n".join(lines)


def eval_table(eval_dir: str) -> Optional[str]:
  """The Markdown table `minilm-eval` wrote in `eval_dir` (workdir.eval_dir of the run), if it has run."""
  path = os.path.join(eval_dir, "results.md")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return f.read()


def write_card(student_dir: str, text: str) -> None:
  def write(p):
    with open(p, "w") as f:
      f.write(text)
  hf.write_atomically(os.path.join(student_dir, "README.md"), write)
