"""Training-step throughput of the one loop's options, as ratios against a baseline measured in this process.

    python benchmarks/train_loop.py                       # recipes/small.toml's model and batch
    python benchmarks/train_loop.py --steps 8 --repeats 3 --compile

Every variant runs the same step as `lm2 pretrain` (forward with autocast as configured, token cross-entropy,
backward, clipping, AdamW) on the same random token batch, `--steps` timed steps after 2 warm-up steps; each
number is the best of `--repeats` rounds, and the rounds visit the variants in turn so that a change of load
on a shared machine hits them all alike. Variants change one thing against the
baseline (the recipe as shipped, torch's default thread count):

    threads=1           torch.set_num_threads(1)
    grad_accum=2        half the batch, two micro-batches (same tokens per optimizer step)
    act_ckpt            train.activation_checkpointing = true
    bptt=1              memory.bptt = 1 (backpropagate through the last segment's write only)
    vanilla             model.arch = "vanilla" (no memory: what the memory costs)
    bf16                train.dtype = "bf16" (autocast on CPU)
    compile             train.compile = true (with --compile; first compilation not timed)

It also times one checkpoint save (safetensors, sha256 manifest, fsync, rename) in units of steps.
"""

from __future__ import annotations

import os
import sys

# benchmarks/ holds a tokenize.py: drop this folder from the import path so that it does not shadow the
# standard library's `tokenize` (imported by inspect, which numpy and torch use).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import lm2cli.training  # noqa: E402,F401  (first: sets lm2's OMP_WAIT_POLICY default before torch loads OpenMP)
from lm2cli.model import build_model  # noqa: E402
from lm2cli.recipe import load_recipe  # noqa: E402
from lm2cli.training.loop import loss_sum  # noqa: E402
from lm2cli.training.optim import build_optimizer  # noqa: E402


def make_step(recipe, vocab: int, batch, accum: int, bf16: bool, compile_: bool):
    torch.manual_seed(0)
    model = build_model(recipe, vocab)
    model.set_activation_checkpointing(recipe.train.activation_checkpointing)
    model.train()
    opt, _ = build_optimizer(model, recipe.train, model.is_memory_param)
    run = torch.compile(model) if compile_ else model
    params = list(model.parameters())
    x, y = batch
    micro = x.shape[0] // accum

    def step():
        for m in range(accum):
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                logits, _ = run(x[m * micro:(m + 1) * micro])
            (loss_sum(logits, y[m * micro:(m + 1) * micro]) / y.numel()).backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "small.toml"))
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: tokenizer.vocab_size)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    args = ap.parse_args()

    base = load_recipe(args.recipe)
    vocab = args.vocab or base.model.vocab_size or base.tokenizer.vocab_size
    t = base.train
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (t.batch_size, t.seq_len + 1), generator=g)
    batch = (rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
    tokens = t.batch_size * t.seq_len
    default_threads = torch.get_num_threads()
    variants = [("baseline", [], {}), ("threads=1", [], {"threads": 1}),
                ("grad_accum=2", [], {"accum": 2}), ("act_ckpt", ["train.activation_checkpointing=true"], {}),
                ("bptt=1", ["memory.bptt=1"], {}), ("vanilla", ["model.arch=vanilla"], {}),
                ("bf16", [], {"bf16": True})]
    if args.compile:
        variants.append(("compile", [], {"compile": True}))
    print(f"recipe {args.recipe}: {t.batch_size} x {t.seq_len} tokens per step, vocab {vocab}, "
          f"torch {torch.__version__}, {default_threads} threads by default, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY')}; "
          f"best of {args.repeats} rounds x {args.steps} steps")
    built = []
    for name, overrides, opts in variants:
        recipe = load_recipe(args.recipe, overrides)
        torch.set_num_threads(opts.get("threads", default_threads))
        step, model, opt = make_step(recipe, vocab, batch, opts.get("accum", 1), opts.get("bf16", False),
                                     opts.get("compile", False))
        for _ in range(2):  # warm-up (and compilation)
            step()
        built.append((name, opts.get("threads", default_threads), step))
        if name == "baseline":
            save_time = time_save(model, opt, recipe)
    best = {name: float("inf") for name, _, _ in built}
    for _ in range(args.repeats):
        for name, threads, step in built:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / args.steps)
    torch.set_num_threads(default_threads)
    baseline = best["baseline"]
    for name, sec in best.items():
        print(f"{name:>14}: {sec * 1000:8.1f} ms/step {tokens / sec:9,.0f} tok/s   x{baseline / sec:5.2f} vs baseline")
    print(f"checkpoint save: {save_time * 1000:.0f} ms = {save_time / baseline:.1f} baseline steps")


def time_save(model, opt, recipe) -> float:
    """One atomic checkpoint of this model and optimizer, as the loop writes it."""
    from safetensors.torch import save_model

    from lm2cli.training import checkpoints as ck

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        tensors, info = ck.capture_rng(0)
        ck.save_checkpoint(Path(d), 1, lambda p: save_model(model, str(p / "model.safetensors")),
                           {"step": 1, "rng": {"rank0": info}}, opt.state_dict(), tensors)
        return time.perf_counter() - t0


if __name__ == "__main__":
    main()
