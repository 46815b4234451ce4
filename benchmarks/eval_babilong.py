"""BABILong decoding speed of `lm2 eval` (finetune-em), batched against one sample at a time, same process.

    python benchmarks/eval_babilong.py [--checkpoint runs/small-ft] [--data data/babilong] [--quick]

For every length, the same prompts (qa1-qa5, the first N samples of each file, assembled as fine-tuning
assembles them) are decoded greedily twice with the same model:
  batched   lm2cli.evaluation.decode.StateRunner (eval.batch_size rows, equal-length rows decoded together)
  baseline  a plain loop over lm2 generate's Generator, one prompt at a time (greedy, max_new_tokens 10);
            with --baseline every-position: the same batched runner, its prefill computing the LM head at every
            position instead of the last one only (what it did before `logits_at`)
The two must produce identical answers (checked); samples/s and their ratio are printed per length and for
the whole grid. The passes alternate every task so that load on a shared machine hits both alike.

Without a checkpoint a randomly initialised model of recipes/small.toml is used: it never emits EOS, so every
sample decodes all 10 tokens (a fine-tuned model stops after 2-4), which favours neither side much.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's `tokenize`: drop this folder from the path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_NEW_TOKENS = 10


def load(checkpoint: str | None, device: torch.device):
    from lm2cli.data.tokenizer import Tokenizer
    from lm2cli.recipe import load_recipe

    if checkpoint:
        from lm2cli.checkpoint import load_for_inference

        model, tokenizer, recipe = load_for_inference(checkpoint, device=device)
        return model, tokenizer, recipe, checkpoint
    from lm2cli.model import build_model

    recipe = load_recipe(REPO / "recipes" / "small.toml")
    tokenizer = Tokenizer.load(Path(recipe.data.dir) / "tokenizer.model")
    torch.manual_seed(0)
    model = build_model(recipe, tokenizer.vocab_size).to(device).eval()
    return model, tokenizer, recipe, "random small.toml model"


def prompts_at(data: str, tasks: list[str], length: str, samples: int, tokenizer) -> list[list[int]]:
    from lm2cli.data.babilong import load_babilong
    from lm2cli.evaluation.babilong import prompt_ids

    return [prompt_ids(tokenizer, t, row, "finetune-em", []) for t in tasks
            for row in load_babilong(data, length, t)[:samples]]


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def batched(runner, prompts, eos) -> tuple[list[list[int]], float]:
    t0 = now(runner.device)
    out = runner.greedy(prompts, MAX_NEW_TOKENS, eos)
    return out, now(runner.device) - t0


def one_at_a_time(generator, prompts, eos) -> tuple[list[list[int]], float]:
    from lm2cli.generation import SamplingParams

    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    t0 = now(generator.device)
    out = [[t for t in generator.generate(p, params).token_ids if t != eos] for p in prompts]
    return out, now(generator.device) - t0


def main() -> None:
    from lm2cli.evaluation.decode import StateRunner
    from lm2cli.generation import Generator

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_ckpt = "runs/small-ft" if Path("runs/small-ft").exists() else None
    ap.add_argument("--checkpoint", default=default_ckpt, help="run or checkpoint (default runs/small-ft if present)")
    ap.add_argument("--data", default="data/babilong", help="BABILong directory (lm2 babilong recipes/small.toml)")
    ap.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5")
    ap.add_argument("--lengths", default="0k,1k,2k,4k")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 = what lm2 eval and lm2 generate choose for small models)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on both sides)")
    ap.add_argument("--quick", action="store_true", help="5 samples per task and length")
    ap.add_argument("--baseline", choices=["one-by-one", "every-position"], default="one-by-one",
                    help="what the batched runner is compared with (see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    samples = 5 if args.quick else args.samples
    device = torch.device(args.device)
    model, tokenizer, recipe, what = load(args.checkpoint, device)
    tasks, lengths = args.tasks.split(","), args.lengths.split(",")
    runner = StateRunner(model, recipe.memory.segment_len, device, batch_size=args.batch_size,
                         autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    generator = Generator(model, tokenizer, recipe, device=device)
    generator.warm_up()
    class EveryPosition(StateRunner):  # the LM head at every prefill position, as before logits_at
        def forward(self, ids, state, last_only=False):
            return super().forward(ids, state)

    every_position = EveryPosition(model, recipe.memory.segment_len, device, batch_size=args.batch_size,
                                   autocast_dtype=runner.autocast_dtype)
    print(f"model: {what} ({recipe.model.arch}, d={recipe.model.d_model}, window {recipe.attention.window}, "
          f"segment {recipe.memory.segment_len}); {device}, {torch.get_num_threads()} CPU threads; batch_size "
          f"{args.batch_size}; {len(tasks)} tasks x {samples} samples per length; load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'length':>6} {'samples':>7} {'batched/s':>10} {args.baseline + '/s':>16} {'ratio':>6}")
    total = {"n": 0, "batched": 0.0, "single": 0.0, "differ": 0}
    for length in lengths:
        n, t_batched, t_single = 0, 0.0, 0.0
        for task in tasks:  # the two sides alternate every task, so a change of load hits both alike
            prompts = prompts_at(args.data, [task], length, samples, tokenizer)
            got, seconds = batched(runner, prompts, tokenizer.eos_id)
            t_batched += seconds
            if args.baseline == "every-position":
                want, seconds = batched(every_position, prompts, tokenizer.eos_id)
            else:
                want, seconds = one_at_a_time(generator, prompts, tokenizer.eos_id)
            t_single += seconds
            differ = sum(a != b for a, b in zip(got, want, strict=True))
            if differ and device.type == "cpu":  # fp32 on CPU: batching must not change a single answer
                raise SystemExit(f"{task} {length}: {differ} of {len(prompts)} answers differ between batched "
                                 f"and {args.baseline}")
            total["differ"] += differ  # bf16 on GPU: other batch shapes round differently, near-ties may flip
            n += len(prompts)
        total["n"] += n
        total["batched"] += t_batched
        total["single"] += t_single
        print(f"{length:>6} {n:>7} {n / t_batched:>10.2f} {n / t_single:>16.2f} {t_single / t_batched:>5.2f}x")
    print(f"{'all':>6} {total['n']:>7} {total['n'] / total['batched']:>10.2f} {total['n'] / total['single']:>16.2f} "
          f"{total['single'] / total['batched']:>5.2f}x   ({total['differ']} answers differ; load "
          f"{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
