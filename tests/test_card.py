"""The exported student's model card."""

from minilm_jax import card
from minilm_jax.train import default_config


def _cfg(**loss):
  c = default_config()
  c.teacher = "sentence-transformers/all-MiniLM-L6-v2"
  c.loss.update(**loss)
  c.batch_size, c.data.max_len = 32, 128
  return c.to_dict()


STUDENT = {"num_hidden_layers": 3, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536}


def test_card_says_what_the_student_is():
  text = card.model_card(_cfg(terms="relations,hidden", term_weights=(1.0, 0.5), version="v2",
                              relation_heads=12, teacher_layer=-1), STUDENT, 120, True)
  assert text.startswith("---\nlibrary_name: sentence-transformers\n")
  assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in text
  assert "# A 3×384 student of sentence-transformers/all-MiniLM-L6-v2" in text
  assert "1·relations + 0.5·hidden (MiniLM v2 relations at teacher layer -1, 12 relation heads)" in text
  assert "120 steps of 32×128 tokens (491,520 tokens)" in text
  assert "SentenceTransformer(PATH)" in text and "Not evaluated yet" in text


def test_card_without_relations_a_local_teacher_and_an_evaluation(tmp_path):
  c = _cfg(terms="hidden")
  c["teacher"] = "/models/my-teacher"
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "results.md").write_text("| model | MRR |\n|---|---|\n| student | 0.2 ± 0.01 |\n")
  text = card.model_card(c, STUDENT, 10, False, card.eval_table(str(tmp_path / "eval")))
  assert "base_model" not in text and "library_name: transformers" in text
  assert "| objective | 1·hidden |" in text and "MiniLM" not in text.split("| objective |")[1].split("\n")[0]
  assert "| student | 0.2 ± 0.01 |" in text and "Not evaluated yet" not in text
  assert card.eval_table(str(tmp_path / "none" / "eval")) is None


def test_write_card_replaces_atomically(tmp_path):
  card.write_card(str(tmp_path), "one")
  card.write_card(str(tmp_path), "two")
  assert (tmp_path / "README.md").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == [
      "README.md"]
