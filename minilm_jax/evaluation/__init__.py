"""Evaluation users can trust: zero-shot probes, a labelled task made from the corpus, and fine-tuning
with a dev split and several seeds, for the students of one or several runs next to one set of
undistilled baselines. Every number comes with its standard error or its spread over seeds.

  minilm-eval --workdir A [--workdir B ...] [--out DIR] [--text SOURCE [--text-field F]] [--seeds 3]
              [--no-finetune] [--task glue:sst2] [--task FILE.csv:text_a,text_b,label]
              [--sts glue:stsb] [--sts FILE.tsv:text_a,text_b,score]
              [--lr 1e-4 --lr 3e-4] [--epochs 3]
              [--site-packages DIR] [--no-baselines] [--curve [--curve-finetune]]

The protocol (which models, the probes, fine-tuning, the paired differences, what OUT holds, the cost)
is written out once, in docs/evaluation.md; protocol.Protocol holds every setting that changes a number.
Checkpoints are opened read-only: evaluation writes nothing but OUT.

One module per concern, each importing only those before it:
  protocol  Protocol, Task, Pairs, split_dev, the settings a table records
  stats     numpy only: ranks, Spearman, Pearson, bootstrap, paired differences, task metrics
  tasks     nsp, package, task files, GLUE; STS pair files and sets   (protocol; corpus)
  probes    embeddings, retrieval, agreement, STS, linear probe, held-out relation loss   (stats; corpus)
  finetune  the fine-tuning protocol                             (protocol, stats)
  runs      runs and checkpoints, read-only; the models of a table
  suite     what every model is scored on, prepared once, and one model's row   (tasks, probes, finetune)
  report    the metric registry, the table, the differences, the plots           (stats; plots)
  commands  minilm-eval's table of runs and curve of one run     (all of the above)
The package imports none of them: each loads alone.
"""
