"""The student: its shape from the teacher's, its initialisation (random, or teacher layers: every k-th,
the first n, a list, or the best subset chosen before training), the teacher layer it learns from, and
which of its parameters the objective cannot reach (frozen)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax

from minilm_jax.families import encoder_for

def teacher_layer_index(teacher_layer: int, num_layers: int) -> int:
  """`loss.teacher_layer` is 1-based as in the papers (21 of 24 for BERT-large) or negative from the
  end (-1 = last). Returns the 0-based index."""
  if 1 <= teacher_layer <= num_layers:
    return teacher_layer - 1
  if -num_layers <= teacher_layer <= -1:
    return num_layers + teacher_layer
  raise ValueError(f"loss.teacher_layer {teacher_layer} is out of range for a {num_layers}-layer "
                   f"teacher: use 1..{num_layers}, or -1 for the last")


def student_config(cfg, teacher):
  """The teacher's family, vocabulary and positions (and for ModernBERT its attention pattern's rhythm),
  with the student's depth, widths and dropout (config.resized)."""
  s = cfg.student
  return teacher.resized(s.num_layers, s.hidden_size, s.num_heads, s.intermediate_size, s.dropout)


# student.init: "random" (the papers), "teacher" (every k-th teacher layer from the first), "teacher_first"
# (the first n), "best" (the subset evaluation.subsets chooses on the training corpus before training),
# or LAYERS + "I,J,...": those teacher layers, 0-based, increasing.
STUDENT_INITS = ("random", "teacher", "teacher_first", "best")
LAYERS = "layers:"


def every_kth(teacher_layers: int, student_layers: int) -> Dict[int, List[int]]:
  """{offset: layers}: every k-th teacher layer (k = L // n, 0-based) from each offset 0..k-1."""
  k = teacher_layers // student_layers
  return {o: [o + i * k for i in range(student_layers)] for o in range(k)}


def check_init(init: str, student_layers: int, teacher_layers: Optional[int] = None) -> None:
  """student.init as one-line ValueErrors: an unknown name, or a LAYERS list that is not integers, not
  one per student layer, not increasing or (given the teacher's depth) out of its range."""
  if init in STUDENT_INITS:
    return
  if not init.startswith(LAYERS):
    raise ValueError(f"student.init {init!r}: use one of {', '.join(STUDENT_INITS)}, or {LAYERS}I,J,... "
                     "(those teacher layers, 0-based)")
  try:
    layers = [int(x) for x in init[len(LAYERS):].split(",")]
  except ValueError:
    raise ValueError(f"student.init {init!r}: give the teacher layers as 0-based integers joined by commas, "
                     f"e.g. {LAYERS}1,3,5") from None
  if len(layers) != student_layers:
    raise ValueError(f"student.init {init!r}: {len(layers)} teacher layers for a {student_layers}-layer "
                     "student (student.num_layers): give one per student layer")
  if any(b <= a for a, b in zip(layers, layers[1:])):
    raise ValueError(f"student.init {init!r}: the layers must increase (each teacher layer once, in the "
                     "teacher's order)")
  bad = [x for x in layers if x < 0 or (teacher_layers is not None and x >= teacher_layers)]
  if bad:
    top = f"0..{teacher_layers - 1}" if teacher_layers is not None else "0 or more"
    raise ValueError(f"student.init {init!r}: teacher layer {bad[0]} is out of range (0-based: {top})")


def teacher_init_layers(init: str, teacher_layers: int, student_layers: int,
                        chosen: Optional[Sequence[int]] = None) -> list:
  """Teacher layer indices (0-based) a "teacher", "teacher_first", LAYERS or "best" init copies into
  student layers 0..n-1; "best" needs `chosen`, the layers evaluation.subsets chose before training."""
  if student_layers > teacher_layers:
    raise ValueError(f"student.init={init!r} needs a student no deeper than the teacher "
                     f"({student_layers} > {teacher_layers} layers)")
  check_init(init, student_layers, teacher_layers)
  if init == "best":
    if chosen is None:
      raise ValueError("student.init 'best' is chosen on the training corpus before training "
                       "(evaluation.subsets.choose_for_training): pass the layers it chose")
    check_init(LAYERS + ",".join(map(str, chosen)), student_layers, teacher_layers)
    return list(chosen)
  if init.startswith(LAYERS):
    return [int(x) for x in init[len(LAYERS):].split(",")]
  if init == "teacher_first":
    return list(range(student_layers))
  return every_kth(teacher_layers, student_layers)[0]  # every k-th layer, starting from the first


def _subtree(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _slice_to(path, t, s, fused):
  """The teacher's array `t` cut to the student's shape: the first rows/columns, and for a fused kernel
  (ModernBERT's Wqkv = [Q | K | V], Wi = [input | gate]) the first columns of each part."""
  parts = fused.get(path_names(path)[-2], 1) if len(path) > 1 else 1
  if parts > 1:
    t = t.reshape(*t.shape[:-1], parts, t.shape[-1] // parts)
    want = s.shape[:-1] + (parts, s.shape[-1] // parts)
    return t[tuple(slice(0, n) for n in want)].reshape(s.shape).astype(s.dtype)
  return t[tuple(slice(0, n) for n in s.shape)].astype(s.dtype)


def init_student(cfg, scfg, teacher_params: Any, teacher_layers: int, rng,
                 chosen: Optional[Sequence[int]] = None) -> Any:
  """Random init (the paper), or teacher layers sliced to the student's width (first rows/columns);
  `chosen`: the layers of a "best" init (teacher_init_layers)."""
  if cfg.student.init == "random":
    return encoder_for(scfg).init_params(rng)
  layers = teacher_init_layers(cfg.student.init, teacher_layers, scfg.num_hidden_layers, chosen)
  return copy_teacher_layers(scfg, teacher_params, layers, rng)


def copy_teacher_layers(scfg, teacher_params: Any, layers, rng) -> Any:
  """A student of config `scfg` whose layer i is teacher layer layers[i] (0-based; len(layers) ==
  scfg.num_hidden_layers), and whose embeddings are the teacher's, each sliced to the student's width.
  `rng` initialises what has no teacher counterpart."""
  if len(layers) != scfg.num_hidden_layers:
    raise ValueError(f"{len(layers)} teacher layers for a {scfg.num_hidden_layers}-layer student")
  have = _subtree(teacher_params, scfg.LAYERS)
  missing = [t for t in layers if str(t) not in have]
  if missing:
    raise ValueError(f"the teacher has no layer {missing[0]} (0-based; it has {len(have)})")
  params = encoder_for(scfg).init_params(rng)

  def cut(tree_t, tree_s, path=()):
    # The student's structure: a part the teacher layer lacks keeps its init, and a teacher part the
    # student layer lacks is left out (ModernBERT's layer 0 has no attn_norm: a later teacher layer
    # copied there loses its own, and teacher layer 0 copied higher up gets the init's norm).
    if not isinstance(tree_s, dict):
      return _slice_to(path, tree_t, tree_s, scfg.FUSED)
    return {k: cut(tree_t[k], v, path + (k,)) if k in tree_t else v for k, v in tree_s.items()}

  top = scfg.LAYERS[0]
  out = cut({k: v for k, v in teacher_params.items() if k != top},
            {k: v for k, v in params.items() if k != top})
  stacked = {str(i): cut(_subtree(teacher_params, scfg.LAYERS)[str(t)], _subtree(params, scfg.LAYERS)[str(i)])
             for i, t in enumerate(layers)}
  for k in reversed(scfg.LAYERS):
    stacked = {k: stacked}
  out.update(stacked)
  return out


def path_names(path) -> Tuple[str, ...]:
  """A pytree path as its key names: ("encoder", "layer", "0", ...)."""
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def frozen_labels(params: Any, scfg, reaches_output: bool = False) -> Any:
  """"freeze" for the student's parameters the relations cannot reach (its last layer above the Q/K/V
  projections, and what follows the layers: ModernBERT's final_norm), "train" elsewhere. With
  `reaches_output` (a term on the student's output, see objective.reaches_output) every parameter gets a
  gradient, so none is frozen. scfg: the student's config (its family says where things are)."""
  last = scfg.LAYERS + (str(scfg.num_hidden_layers - 1),)
  def label(path, _):
    n = path_names(path)
    in_last = n[:len(last)] == last and not any(n[len(last):len(last) + len(q)] == q
                                                for q in scfg.QKV_PARAMS)
    unreachable = in_last or n[0] in scfg.ABOVE_LAYERS
    return "freeze" if unreachable and not reaches_output else "train"
  return jax.tree_util.tree_map_with_path(label, params)
