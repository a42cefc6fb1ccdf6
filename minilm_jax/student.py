"""The student: its shape from the teacher's, its initialisation (random, or teacher layers), the teacher
layer it learns from, and which of its parameters the objective cannot reach (frozen)."""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax

from minilm_jax.model import BertConfig, BertEncoder

def teacher_layer_index(teacher_layer: int, num_layers: int) -> int:
  """`loss.teacher_layer` is 1-based as in the papers (21 of 24 for BERT-large) or negative from the
  end (-1 = last). Returns the 0-based index."""
  if 1 <= teacher_layer <= num_layers:
    return teacher_layer - 1
  if -num_layers <= teacher_layer <= -1:
    return num_layers + teacher_layer
  raise ValueError(f"loss.teacher_layer {teacher_layer} is out of range for a {num_layers}-layer "
                   f"teacher: use 1..{num_layers}, or -1 for the last")


def student_config(cfg, teacher: BertConfig) -> BertConfig:
  """The teacher's vocabulary, positions and type vocabulary, with the student's depth and width."""
  s = cfg.student
  return dataclasses.replace(
      teacher, num_hidden_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
      intermediate_size=s.intermediate_size, hidden_dropout_prob=s.dropout,
      attention_probs_dropout_prob=s.dropout)


def teacher_init_layers(init: str, teacher_layers: int, student_layers: int) -> list:
  """Teacher layer indices a "teacher"/"teacher_first" init copies into student layers 0..n-1."""
  if student_layers > teacher_layers:
    raise ValueError(f"student.init={init!r} needs a student no deeper than the teacher "
                     f"({student_layers} > {teacher_layers} layers)")
  if init == "teacher_first":
    return list(range(student_layers))
  k = teacher_layers // student_layers  # every k-th layer, starting from the first
  return [i * k for i in range(student_layers)]


def init_student(cfg, scfg: BertConfig, teacher_params: Any, teacher_layers: int, rng) -> Any:
  """Random init (the paper), or teacher layers sliced to the student's width (first rows/columns)."""
  params = BertEncoder(scfg).init_params(rng)
  if cfg.student.init == "random":
    return params
  layers = teacher_init_layers(cfg.student.init, teacher_layers, scfg.num_hidden_layers)
  cut = lambda t, s: t[tuple(slice(0, n) for n in s.shape)].astype(s.dtype)
  out = jax.tree.map(cut, {k: v for k, v in teacher_params.items() if k != "encoder"},
                     {k: v for k, v in params.items() if k != "encoder"})
  out["encoder"] = {"layer": {str(i): jax.tree.map(cut, teacher_params["encoder"]["layer"][str(t)],
                                                   params["encoder"]["layer"][str(i)])
                              for i, t in enumerate(layers)}}
  return out


def path_names(path) -> Tuple[str, ...]:
  """A pytree path as its key names: ("encoder", "layer", "0", ...)."""
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def frozen_labels(params: Any, num_layers: int, reaches_output: bool = False) -> Any:
  """"freeze" for the student's last-layer parameters the loss cannot reach, "train" elsewhere.
  With `reaches_output` (a term on the student's output, see objective.reaches_output) every parameter
  gets a gradient, so none is frozen."""
  last = str(num_layers - 1)
  def label(path, _):
    n = path_names(path)
    unreachable = n[:3] == ("encoder", "layer", last) and n[3:5] != ("attention", "self")
    return "freeze" if unreachable and not reaches_output else "train"
  return jax.tree_util.tree_map_with_path(label, params)
