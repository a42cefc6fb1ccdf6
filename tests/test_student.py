"""The student's teacher layer index (1-based as in the papers, or negative from the end), and students
made of chosen teacher layers."""

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
