"""minilm-eval's functions, for scripts written against this module: they live in the package
minilm_jax.evaluation, one module per concern (protocol, stats, tasks, probes, finetune, runs, suite,
report, commands; see its docstring), with sentence splitting and the held-out text in corpus.py and the
plots in plots.py. New code imports those modules; this one only re-exports their public names."""

from minilm_jax.corpus import heldout_docs, sentences  # noqa: F401
from minilm_jax.evaluation.commands import evaluate_curve, evaluate_run  # noqa: F401
from minilm_jax.evaluation.finetune import Classifier, finetune  # noqa: F401
from minilm_jax.evaluation.probes import (  # noqa: F401
    ProbeText, agreement, embed, heldout_relation_loss, linear_probe, pair_cosines, probe_text, retrieval)
from minilm_jax.evaluation.protocol import (  # noqa: F401
    DEFAULT_PROTOCOL, Protocol, Task, made_with, settings_of, split_dev)
from minilm_jax.evaluation.report import (  # noqa: F401
    LABELS, comparisons, last_epoch_everywhere, write_table)
from minilm_jax.evaluation.runs import (  # noqa: F401
    BASELINE_NAMES, baseline_inits, check_out, checkpoint_student, models_of_runs, open_checkpoints,
    read_run, run_teacher_dir, student_name)
from minilm_jax.evaluation.stats import (  # noqa: F401
    bootstrap_se, cosines, paired_difference, rankdata, reciprocal_ranks, score, spearman)
from minilm_jax.evaluation.suite import Suite, encode_speed, make_suite, quality  # noqa: F401
from minilm_jax.evaluation.tasks import (  # noqa: F401
    GLUE, file_task, glue_task, load_task, nsp_pairs, nsp_task, package_task)

Bench, make_bench = Suite, make_suite  # their names before the package (Bench collided with bench.py)
