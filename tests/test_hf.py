"""Loading and saving Hugging Face folders: round trips, checkpoint variants, and every bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import hf
from minilm_jax.model import BertConfig, BertEncoder
from conftest import make_hf_model, random_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def flat(tree):
  return dict(hf.flatten(tree))


def assert_same_params(a, b):
  fa, fb = flat(a), flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def test_flax_to_pytorch_round_trip(tmp_path):
  config = BertConfig(vocab_size=77, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                      intermediate_size=72, max_position_embeddings=32, type_vocab_size=3)
  model = BertEncoder(config)
  params = model.init_params(jax.random.key(0))
  # Perturb LayerNorms and biases so a swapped weight/bias or gamma/beta would show.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
  hf.save_pretrained(str(tmp_path), config, params)
  tm, info = transformers.BertModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  ids, mask = random_batch(np.random.default_rng(0), 3, 9, 77)
  types = np.random.default_rng(1).integers(0, 3, ids.shape)
  with torch.no_grad():
    want = tm.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  valid = mask[..., None] > 0
  np.testing.assert_allclose(np.where(valid, got.last_hidden_state, 0), np.where(valid, want, 0),
                             atol=1e-4, rtol=0)
  config2, params2 = hf.load_pretrained(str(tmp_path))
  assert config2 == config
  assert_same_params(params, params2)


def test_real_teacher_round_trip_is_exact(real_teacher, tmp_path):
  config, params = hf.load_pretrained(real_teacher)
  hf.save_pretrained(str(tmp_path), config, params, tokenizer=real_teacher)
  assert os.path.isfile(tmp_path / "tokenizer.json") and os.path.isfile(tmp_path / "vocab.txt")
  config2, params2 = hf.load_pretrained(str(tmp_path))
  assert config2 == config
  assert_same_params(params, params2)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert tok("hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_export_loads_without_a_warning_and_its_pooler_is_the_identity(real_teacher, tmp_path, capfd):
  """A user reads "MISSING ... newly initialized" as a broken export: none in transformers or
  sentence-transformers; the pooler written in its place is tanh(h_[CLS]), not random."""
  st = pytest.importorskip("sentence_transformers")
  config, params = hf.load_pretrained(real_teacher)
  folder = str(tmp_path / "student")
  hf.export_student(folder, config, params, tokenizer=real_teacher)
  hf.export_sentence_transformers(folder, config, real_teacher, 128)
  capfd.readouterr()
  tm, info = transformers.BertModel.from_pretrained(folder, output_loading_info=True)
  st.SentenceTransformer(folder, device="cpu").encode(["no warning"])
  err = "".join(capfd.readouterr())
  assert not any(info.values()), info
  for word in ("MISSING", "newly initialized", "UNEXPECTED", "LOAD REPORT"):
    assert word not in err, err
  enc = transformers.AutoTokenizer.from_pretrained(folder)(["the pooler"], return_tensors="pt")
  with torch.no_grad():
    out = tm.eval()(**enc)
  np.testing.assert_allclose(out.pooler_output.numpy(), np.tanh(out.last_hidden_state[:, 0].numpy()),
                             atol=1e-6)


def test_hub_id_of_packaged_teacher_resolves_offline(real_teacher):
  assert hf.resolve("sentence-transformers/all-MiniLM-L6-v2") == real_teacher


def test_masked_lm_and_pretraining_checkpoints(tmp_path):
  cfg = transformers.BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
  torch.manual_seed(0)
  for i, cls in enumerate([transformers.BertForMaskedLM, transformers.BertForPreTraining]):
    folder = tmp_path / str(i)
    m = cls(cfg).eval()
    m.save_pretrained(folder)
    config, params = hf.load_pretrained(str(folder))
    np.testing.assert_array_equal(
        params["encoder"]["layer"]["1"]["attention"]["self"]["key"]["kernel"],
        m.bert.encoder.layer[1].attention.self.key.weight.detach().numpy().T)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
  tm = make_hf_model(tmp_path / "ref")
  _, ref = hf.load_pretrained(str(tmp_path / "ref"))
  tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  assert_same_params(ref, hf.load_pretrained(str(tmp_path / "sharded"))[1])
  os.makedirs(tmp_path / "bin")
  shutil.copy(tmp_path / "ref" / "config.json", tmp_path / "bin")
  torch.save(tm.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  assert_same_params(ref, hf.load_pretrained(str(tmp_path / "bin"))[1])


def test_old_gamma_beta_names(tmp_path):
  from safetensors.numpy import load_file, save_file
  make_hf_model(tmp_path)
  _, ref = hf.load_pretrained(str(tmp_path))
  sd = load_file(tmp_path / "model.safetensors")
  old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
         for k, v in sd.items()}
  assert any("gamma" in k for k in old)
  save_file({"bert." + k: v for k, v in old.items()}, tmp_path / "model.safetensors")
  assert_same_params(ref, hf.load_pretrained(str(tmp_path))[1])


# --- Bad input: each names the file and what is wrong, and never loads partially. ---

def test_missing_config(tmp_path):
  make_hf_model(tmp_path)
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_pretrained(str(tmp_path))


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such folder"):
    hf.load_pretrained(str(tmp_path / "nope"))


def test_unsupported_model_type(tmp_path):
  make_hf_model(tmp_path)
  d = json.loads((tmp_path / "config.json").read_text())
  d["model_type"] = "gpt2"
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
    hf.load_pretrained(str(tmp_path))


def test_shapes_disagree_with_config(tmp_path):
  make_hf_model(tmp_path)
  d = json.loads((tmp_path / "config.json").read_text())
  d["intermediate_size"] = 128
  (tmp_path / "config.json").write_text(json.dumps(d))
  with pytest.raises(ValueError, match=r"model.safetensors: tensor encoder.layer.0.intermediate.dense.(weight|bias) has "
                     r"shape \(100,( 48)?\), but config.json implies \(128,( 48)?\)"):
    hf.load_pretrained(str(tmp_path))


def test_missing_tensors(tmp_path):
  from safetensors.numpy import load_file, save_file
  make_hf_model(tmp_path)
  sd = load_file(tmp_path / "model.safetensors")
  del sd["encoder.layer.2.output.dense.weight"]
  save_file(sd, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"model.safetensors: 1 encoder tensors are missing: "
                     r"encoder/layer/2/output/dense/kernel"):
    hf.load_pretrained(str(tmp_path))


def test_truncated_weights(tmp_path):
  make_hf_model(tmp_path)
  p = tmp_path / "model.safetensors"
  p.write_bytes(p.read_bytes()[:5000])
  with pytest.raises(ValueError, match="model.safetensors: unreadable or truncated"):
    hf.load_pretrained(str(tmp_path))


def test_no_weights_file(tmp_path):
  make_hf_model(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.load_pretrained(str(tmp_path))


def test_save_rejects_params_of_another_config(tmp_path):
  config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  params = BertEncoder(config).init_params(jax.random.key(0))
  bigger = BertConfig(**{**config.to_dict(), "num_hidden_layers": 3})
  with pytest.raises(ValueError, match="params do not match the config"):
    hf.save_pretrained(str(tmp_path), bigger, params)
