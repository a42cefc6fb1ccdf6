"""Every config in configs/ loads, and its loss/student settings are valid for the teacher it names."""

import glob
import importlib.util
import os

import pytest

from minilm_jax import config, student
from minilm_jax.model import BertConfig
from minilm_jax.modernbert import ModernBertConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The architectures of the hub teachers the recipes name (no download needed to check them).
TEACHERS = {
    "sentence-transformers/all-MiniLM-L6-v2": BertConfig(hidden_size=384, num_hidden_layers=6,
                                                         intermediate_size=1536),
    "bert-base-uncased": BertConfig(),
    "bert-large-uncased": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096),
    "roberta-large": BertConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                num_attention_heads=16, intermediate_size=4096,
                                max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                model_type="roberta"),
    "answerdotai/ModernBERT-base": ModernBertConfig(),  # its hub config (minilm_jax/teacher_configs)
}
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid_for_its_teacher(path):
  module = load(path)
  assert "minilm-distill --config configs/" in module.__doc__ and "Cost" in module.__doc__
  cfg = module.get_config()
  assert set(cfg.keys()) == set(config.default_config().keys())
  tcfg = TEACHERS[cfg.teacher]
  config.check_config(cfg, tcfg)
  layer = student.teacher_layer_index(cfg.loss.teacher_layer, tcfg.num_hidden_layers)
  if "large" in cfg.teacher:
    assert layer + 1 == {"bert-large-uncased": 21, "roberta-large": 19}[cfg.teacher]
  elif os.path.basename(path) == "quality.py":
    # beyond the papers, measured in docs/results.md: the relations of the layer the student starts at
    assert cfg.student.init == "teacher_first" and layer + 1 == cfg.student.num_layers
  else:
    assert layer == tcfg.num_hidden_layers - 1


def test_paper_recipes_are_all_there():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"demo.py", "v1_bert_base_6x768.py", "v1_bert_base_6x384.py", "v2_bert_base_6x384.py",
          "v2_bert_large_6x768.py", "v2_roberta_large_6x384.py", "ta_bert_base_6x384.py",
          "demo_ta.py"} <= names


def test_the_modernbert_base_config_reads_as_its_defaults():
  # The package's minilm_jax/teacher_configs/answerdotai--ModernBERT-base/config.json is that model's hub
  # config (transformers 4 keys): minilm-compile's teacher for the recipe, and the benchmark's random
  # teacher of that shape (docs/modernbert.md).
  from minilm_jax import hf
  folder = os.path.join(ROOT, "minilm_jax", "teacher_configs", "answerdotai--ModernBERT-base")
  assert hf.load_config(folder) == ModernBertConfig()


def test_every_recipe_names_its_target_and_its_compiled_figures_are_stored():
  # Each recipe says which accelerator it is meant for ("Target: NAME" in its docstring); docs/compile.md
  # holds its compiled figures there (benchmarks/compile_recipes.py), with the HBM margin the issue asks.
  import json
  import sys
  from minilm_jax import targets
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import compile_recipes
  stored = compile_recipes.load()
  for path in CONFIGS:
    name = os.path.basename(path)[:-3]
    target = targets.parse(compile_recipes.recipe_target(path))
    assert name in stored, f"{name}: run python benchmarks/compile_recipes.py --only {name}"
    r = stored[name]
    assert r["target"] == target.name and r["fits"] and r["hbm_spare"] >= 0.15, name
  page = open(os.path.join(ROOT, "docs", "compile.md")).read()
  assert compile_recipes.table(stored) in page  # the table is the stored JSON's, not typed by hand
