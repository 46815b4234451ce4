"""Evaluation: `lm2 eval` and the pieces it is made of, one module per kind of evaluation.

    babilong.py         the BABILong task x length grid (finetune-em, prompt-compat, prompt-strict)
    metrics.py          exact match, upstream's label-set metric (and its strict version), Wilson intervals
    retrieval.py        the BM25 retrieval baseline (extra "retrieval")
    perplexity.py       perplexity, bits per byte and loss against context position
    multiple_choice.py  MMLU-layout multiple choice by log-likelihood
    harness.py          an lm-evaluation-harness model class over an lm2 checkpoint (extra "harness")
    decode.py           batched greedy decoding and continuation scoring through the model state
    report.py           results.json / .csv / .md, predictions.jsonl, plots (extra "plot")
    models.py           the models under evaluation: resolved and verified checkpoints, loaded one at a time
    command.py          the command: settings, checks, the run, Ctrl-C

Checkpoints, example assembly and the batch scorer come from the shared layer (lm2cli.checkpoint,
lm2cli.data.examples, lm2cli.scoring); like every command that reads a trained model, this package never
imports lm2cli.training (docs/internals.md, tests/test_structure.py).
"""

import os

# Idle OpenMP threads sleep instead of spinning, as in training (docs/performance.md, "Compute threads on a
# shared CPU"): set before torch loads; an OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def eval_command(*args, **kwargs):
    # Imported lazily: `lm2 --help` must not pay for torch.
    from lm2cli.evaluation.command import eval_command as command

    return command(*args, **kwargs)
