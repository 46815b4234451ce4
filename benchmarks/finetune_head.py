"""Fine-tuning step time with the LM head over every position against over the target positions only.

    python benchmarks/finetune_head.py [--recipe R.toml ...] [--batch 8] [--seq 1024] [--answers 3] [--rounds 3]

A fine-tuning row has a few answer tokens with a loss; the training step asks the model for the logits of those
positions only (`model(..., logits_at=targets != IGNORE)`, lm2cli/training/loop.py). This times one forward +
backward of a batch of `--seq`-token rows with `--answers` target positions each, both ways, for each recipe's
model (default: the one-backbone BABILong recipes), in interleaved rounds (the best round counts), on one CPU
thread unless --threads; prints seconds per step and the ratio full / targets only (> 1: the saving). Both ways
give the same loss and gradients (tests/model/test_long_inputs.py).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/tokenize.py would shadow the standard library's tokenize module

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lm2cli import build_model, load_recipe  # noqa: E402
from lm2cli.scoring import IGNORE, loss_sum  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [REPO / "recipes/babilong/one-backbone" / f"{m}.toml" for m in ("lm2-delta", "vanilla-window", "rmt")]


def step_seconds(model, inputs, targets, packed: bool, steps: int) -> float:
    at = targets != IGNORE if packed else None
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        logits, _ = model(inputs, None, keep_state=False, logits_at=at)
        loss_sum(logits, targets).backward()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, action="append")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--answers", type=int, default=3, help="target positions per row (an answer and EOS: 2-3)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(4, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -args.answers:] = torch.randint(4, args.vocab, (args.batch, args.answers), generator=g)
    print(f"batch {args.batch} x {args.seq} tokens, {args.answers} target positions per row, vocabulary "
          f"{args.vocab}, {args.threads} thread(s); best of {args.rounds} rounds of {args.steps} steps")
    for path in args.recipe or DEFAULT:
        recipe = load_recipe(path, [f"model.vocab_size={args.vocab}"])
        torch.manual_seed(0)
        model = build_model(recipe)
        step_seconds(model, inputs, targets, True, 1)  # warm-up: allocation and lazy initialisation
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.rounds):
            for packed in (False, True):
                best[packed] = min(best[packed], step_seconds(model, inputs, targets, packed, args.steps))
        tokens = args.batch * args.seq
        print(f"{path.stem:16s} every position {best[False]:.3f} s ({tokens / best[False]:,.0f} tok/s) | targets "
              f"only {best[True]:.3f} s ({tokens / best[True]:,.0f} tok/s) | full / targets-only "
              f"{best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
