"""evaluation.runs: the baselines of a student's shape, and a run's checkpoints read at any kept step."""

import jax
import numpy as np
import pytest

from minilm_jax import checkpoint, hf, objective
from minilm_jax.evaluation import runs
from evaluation_helpers import train_run


def test_every_kth_layer_from_each_offset_is_a_baseline_where_it_is_not_the_first_n_layers():
  every = "baseline: every k-th teacher layer"
  fixed = {"baseline: random init": None, "baseline: first teacher layers": [0, 1, 2]}
  assert runs.baseline_layers(6, 3) == {**fixed, every: [0, 2, 4], f"{every} from layer 1": [1, 3, 5]}
  assert list(runs.baseline_layers(24, 6))[2:] == [every] + [f"{every} from layer {o}" for o in (1, 2, 3)]
  assert runs.baseline_layers(24, 6)[f"{every} from layer 3"] == [3, 7, 11, 15, 19, 23]
  assert list(runs.baseline_layers(6, 4)) == list(fixed)   # k = 1: every layer from the first is the first 4
  assert list(runs.baseline_layers(12, 8)) == list(fixed)
  assert runs.baseline_layers(2, 1) == {**fixed, "baseline: first teacher layers": [0], f"{every} from layer 1": [1]}
  assert runs.baseline_inits(6, 3) == ["random", "teacher_first", "teacher"]   # scripts' older name


def test_checkpoint_student_reads_any_kept_step_with_the_run_s_own_shape(tiny_teacher, tiny_corpus, tmp_path):
  w = train_run(tiny_teacher, tiny_corpus, str(tmp_path / "deep"),
                **{"student.num_layers": 2, "loss.terms": "relations,hidden"})  # 16 wide: a projection
  encoder, exported = hf.load_student(w)
  config, last = runs.checkpoint_student(w, 4)
  assert config == encoder.config and config.num_hidden_layers == 2   # not the tiny default's 1 layer
  _, _, mngr, _ = runs.read_run(w)
  assert objective.PROJECTION in checkpoint.restore_params(mngr, 4) and objective.PROJECTION not in last
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
  assert flat(last).keys() == flat(exported).keys()
  for k, v in flat(last).items():
    np.testing.assert_array_equal(v, flat(exported)[k])
  _, early = runs.checkpoint_student(w, 2)                         # kept by keep_every
  assert any(not np.array_equal(e, flat(last)[k]) for k, e in flat(early).items())
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    runs.checkpoint_student(w, 3)
