"""Evaluation users can trust: zero-shot probes, a labelled task made from the corpus, and fine-tuning
with a dev split and several seeds, for the students of one or several runs next to one set of
undistilled baselines. Every number comes with its standard error or its spread over seeds.

  minilm-eval --workdir A [--workdir B ...] [--out DIR] [--text SOURCE [--text-field F]] [--seeds 3]
              [--no-finetune] [--task glue:sst2] [--task FILE.csv:text_a,text_b,label]
              [--lr 1e-4 --lr 3e-4] [--epochs 3]
              [--site-packages DIR] [--no-baselines] [--curve [--curve-finetune]]

Models: the teacher, the assistant (a chain), each run's student, and the student's architecture without
distillation (random init, the first n teacher layers, every k-th teacher layer where that is not the
first n). Every model embeds
sentences the same way: its encoder, then the teacher's sentence-transformers pooling (mean when the
teacher is a plain BERT folder). Probes, on held-out text (the stdlib corpus's held-out split, or all of
--text) that no run trained on when it trained on the demo corpora's train split:
- retrieval: each query sentence (up to `queries`, 1,000, that have a successor in their document) ranks all the
  queries' successors by cosine; the mean reciprocal rank of its own successor (ties count half), SE over
  queries;
- agreement: Spearman correlation between the model's and the teacher's cosines over `pairs` (2,000) sentence pairs
  (half adjacent, half random), SE by bootstrap over pairs;
- held-out relation loss: the MiniLM relation loss (relations only, whatever the run trained with)
  against the teacher, SE over batches;
- package: which of 16 top-level installed packages a held-out docstring (by the content-hash rule that
  holds it out of `pydocs` training) comes from, balanced classes, split 60/20/20. Scored by a linear probe
  on frozen embeddings (L2 chosen on dev; binomial SE) and by fine-tuning;
- nsp: next-sentence prediction on the held-out text, by fine-tuning (trained on the first half of its
  documents, tested on the second; a text of one document is halved at its middle sentence).
Fine-tuning (encoder + the same pooling + linear head): for each lr, max(epochs) epochs with the schedule
over that length, dev scored after each epoch; the (lr, epoch) with the best dev score is kept and its
test score reported, so test is read once per seed and never chosen on. Repeated for `seeds` seeds: mean,
spread (sd over seeds) and SE (sd/sqrt(seeds)).

Cost measured on this machine's 2 shared CPU cores (another run training beside it): see
protocol.DEFAULT_PROTOCOL's comment.

Differences: each student against every other model, and the teacher against each baseline, paired over
the same items (queries, pairs, docstrings, test pairs), with the SE of the difference
(stats.paired_difference): what "ahead by k standard errors" is read from.

Writes OUT/results.json (every raw number: per-item scores and predictions, per-seed scores, chosen
lr/epoch, dev grids, the differences), results.md (the table, then the differences) and results.png;
with --curve also curve.json and curve.png (the student of every kept checkpoint).
Checkpoints are opened read-only: evaluation writes nothing but OUT.

One module per concern, each importing only those before it:
  protocol  Protocol, Task, split_dev, the settings a table records
  stats     numpy only: ranks, Spearman, bootstrap, paired differences, task metrics
  tasks     nsp, package, task files, GLUE                      (protocol; corpus)
  probes    embeddings, retrieval, agreement, linear probe, held-out relation loss   (stats; corpus)
  finetune  the fine-tuning protocol                             (protocol, stats)
  runs      runs and checkpoints, read-only; the models of a table
  suite     what every model is scored on, prepared once, and one model's row   (tasks, probes, finetune)
  report    the metric registry, the table, the differences, the plots           (stats; plots)
  commands  minilm-eval's table of runs and curve of one run     (all of the above)
The package imports none of them: each loads alone.
"""
