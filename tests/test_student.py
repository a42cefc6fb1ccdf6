"""The student's teacher layer index (1-based as in the papers, or negative from the end)."""

import pytest

from minilm_jax import student


def test_teacher_layer_index():
  assert student.teacher_layer_index(-1, 12) == 11
  assert student.teacher_layer_index(21, 24) == 20
  assert student.teacher_layer_index(1, 6) == 0
  for bad in (0, 7, -7):
    with pytest.raises(ValueError, match=f"loss.teacher_layer {bad} is out of range for a 6-layer"):
      student.teacher_layer_index(bad, 6)
