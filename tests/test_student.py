"""The student's teacher layer index (1-based as in the papers, or negative from the end), and students
made of chosen teacher layers."""

import re

import jax
import numpy as np
import pytest

from minilm_jax import hf, student


def test_teacher_layer_index():
  assert student.teacher_layer_index(-1, 12) == 11
  assert student.teacher_layer_index(21, 24) == 20
  assert student.teacher_layer_index(1, 6) == 0
  for bad in (0, 7, -7):
    with pytest.raises(ValueError, match=f"loss.teacher_layer {bad} is out of range for a 6-layer"):
      student.teacher_layer_index(bad, 6)


def test_copy_teacher_layers_in_any_order_sliced(tiny_teacher):
  tcfg, tp = hf.load_pretrained(tiny_teacher)
  scfg = tcfg.resized(2, 16, 2, 32, 0.0)
  sp = student.copy_teacher_layers(scfg, tp, [1, 0], jax.random.key(0))
  t_layer = tp["encoder"]["layer"]
  for i, t in enumerate([1, 0]):
    np.testing.assert_array_equal(sp["encoder"]["layer"][str(i)]["attention"]["self"]["query"]["kernel"],
                                  t_layer[str(t)]["attention"]["self"]["query"]["kernel"][:16, :16])
    np.testing.assert_array_equal(sp["encoder"]["layer"][str(i)]["output"]["dense"]["bias"],
                                  t_layer[str(t)]["output"]["dense"]["bias"][:16])
  np.testing.assert_array_equal(sp["embeddings"]["word_embeddings"]["embedding"],
                                tp["embeddings"]["word_embeddings"]["embedding"][:, :16])
  with pytest.raises(ValueError, match="3 teacher layers for a 2-layer student"):
    student.copy_teacher_layers(scfg, tp, [0, 1, 2], jax.random.key(0))
  with pytest.raises(ValueError, match=f"the teacher has no layer {tcfg.num_hidden_layers}"):
    student.copy_teacher_layers(scfg, tp, [0, tcfg.num_hidden_layers], jax.random.key(0))


def test_every_kth_layer_from_each_offset():
  assert student.every_kth(6, 3) == {0: [0, 2, 4], 1: [1, 3, 5]}
  assert student.every_kth(24, 6) == {o: [o, o + 4, o + 8, o + 12, o + 16, o + 20] for o in range(4)}
  assert student.every_kth(6, 4) == {0: [0, 1, 2, 3]}   # k = 1: one offset
  assert student.teacher_init_layers("teacher", 24, 6) == [0, 4, 8, 12, 16, 20]


def test_init_from_a_list_of_teacher_layers_or_the_chosen_best():
  assert student.teacher_init_layers("layers:1,3,5", 6, 3) == [1, 3, 5]
  assert student.teacher_init_layers("best", 6, 3, chosen=(0, 3, 5)) == [0, 3, 5]
  with pytest.raises(ValueError, match=r"^student.init 'best' is chosen on the training corpus"):
    student.teacher_init_layers("best", 6, 3)
  with pytest.raises(ValueError, match=r"^student.init 'layers:0,3,9': teacher layer 9 is out of range \(0-based: 0..5\)$"):
    student.teacher_init_layers("best", 6, 3, chosen=(0, 3, 9))
  for init, message in (("layers:1,3", "2 teacher layers for a 3-layer student (student.num_layers)"),
                        ("layers:1,5,3", "the layers must increase"), ("layers:1,1,3", "the layers must increase"),
                        ("layers:0,2,6", "teacher layer 6 is out of range (0-based: 0..5)"),
                        ("layers:-1,2,4", "teacher layer -1 is out of range"),
                        ("layers:1,three,5", "give the teacher layers as 0-based integers"),
                        ("layers1,3,5", "use one of random, teacher, teacher_first, best, or layers:I,J,...")):
    with pytest.raises(ValueError, match=f"^student.init {init!r}: " + re.escape(message)):
      student.teacher_init_layers(init, 6, 3)


def test_init_student_copies_the_listed_layers(tiny_teacher):
  import ml_collections
  tcfg, tp = hf.load_pretrained(tiny_teacher)
  cfg = ml_collections.ConfigDict({"student": {"init": "layers:1"}})
  sp = student.init_student(cfg, tcfg.resized(1, 16, 2, 32, 0.0), tp, tcfg.num_hidden_layers, jax.random.key(0))
  np.testing.assert_array_equal(sp["encoder"]["layer"]["0"]["attention"]["self"]["key"]["kernel"],
                                tp["encoder"]["layer"]["1"]["attention"]["self"]["key"]["kernel"][:16, :16])


def test_a_modernbert_layer_copied_where_its_norms_differ(tiny_modernbert):
  """ModernBERT's layer 0 has no attention norm: teacher layer 1 copied there leaves its norm out, and
  teacher layer 0 copied higher up keeps the student's own (every offset of every k-th needs this)."""
  tcfg, tp = hf.load_pretrained(tiny_modernbert)
  scfg = tcfg.resized(2, tcfg.hidden_size, tcfg.num_attention_heads, tcfg.intermediate_size, 0.0)
  layer = lambda p, i: p[scfg.LAYERS[0]][str(i)] if len(scfg.LAYERS) == 1 else p[scfg.LAYERS[0]][scfg.LAYERS[1]][str(i)]
  for layers in ([1, 3], [2, 0]):
    sp = student.copy_teacher_layers(scfg, tp, layers, jax.random.key(0))
    assert "attn_norm" not in layer(sp, 0) and "attn_norm" in layer(sp, 1)
    for i, t in enumerate(layers):
      for got, want in zip(jax.tree.leaves(layer(sp, i)["attn"]), jax.tree.leaves(layer(tp, t)["attn"])):
        np.testing.assert_array_equal(got, want)
