"""Cost of long samples with a finite attention window: per-token time must not grow with the length.

    python benchmarks/long_context.py            # the issue's targets; --quick for a short smoke run
    python benchmarks/long_context.py --forward 1024,8192 --train 1024,16384 --rounds 3

The model of recipes/small.toml (d 128, 4 blocks, window 128, memory segment 64, vocab 2048), fp32, random
weights and tokens (speed does not depend on them). Two measurements:

1. No-grad forward, one call over T tokens (as evaluation scores a sample): microseconds per token at each
   length, and for reference the same tokens fed in 256-token chunks through the state (the generator's
   prefill), whose cost per token is flat by construction.
2. Training step (forward, token cross-entropy, backward, AdamW; the final state dropped, as `lm2 pretrain`
   does) at each length, with the same number of tokens per step for every length (batch = tokens / length),
   so that a 16k sample is compared with sixteen 1k samples; and at batch 1 (the same rows, longer).

Every configuration runs in its own process (its peak RSS is its own); the parent visits the
configurations round-robin `--rounds` times, so load on a shared machine hits them alike, and keeps each
configuration's best round. Ratios against the shortest length are printed: the targets are training
tokens/s at 16k within 1.3x of 1k, and the forward at 8k no slower per token than at 1k.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's `tokenize` for every script in this folder.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL = REPO / "recipes" / "small.toml"
VOCAB = 2048


def small_model(arch: str):
    import torch

    from lm2cli.model import build_model
    from lm2cli.recipe import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(SMALL, [f"model.arch={arch}", f"model.vocab_size={VOCAB}"])
    return build_model(recipe), recipe


def tokens(batch: int, length: int):
    import torch

    return torch.randint(5, VOCAB, (batch, length + 1), generator=torch.Generator().manual_seed(0))


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `start`. CPU time is the steadier clock on a shared machine: waiting for a core
    does not count (cache and memory-bandwidth contention still do)."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def forward_seconds(model, x, chunk: int) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        t0 = clocks()
        if chunk:
            state = None
            for i in range(0, x.shape[1], chunk):
                _, state = model(x[:, i:i + chunk], state)
        else:
            model(x)
        return since(t0)


def train_step_fn(model, recipe, x):
    import torch

    from lm2cli.training.loop import loss_sum
    from lm2cli.training.optim import build_optimizer

    model.train()
    opt, _ = build_optimizer(model, recipe.train, model.is_memory_param)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> tuple[float, float]:
        t0 = clocks()
        logits, _ = model(inputs, keep_state=False)
        (loss_sum(logits, targets) / targets.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return since(t0)

    torch.manual_seed(0)
    return step


def worker(kind: str, length: int, batch: int, reps: int, arch: str) -> None:
    """One configuration in this fresh process: warm-up, `reps` timed runs, print the best as JSON."""
    model, recipe = small_model(arch)
    x = tokens(batch, length)
    if kind == "train":
        run = train_step_fn(model, recipe, x)
    else:
        model.eval()
        chunk = 256 if kind == "chunked" else 0
        run = lambda: forward_seconds(model, x[:, :-1], chunk)  # noqa: E731
    run()  # warm-up: allocator, lazy kernels
    times = [run() for _ in range(reps)]
    wall, cpu = min(t[0] for t in times), min(t[1] for t in times)
    n = batch * length
    print(json.dumps({"kind": kind, "length": length, "batch": batch, "seconds": wall, "cpu_seconds": cpu,
                      "us_per_token": 1e6 * wall / n, "cpu_us_per_token": 1e6 * cpu / n, "tokens_per_s": n / wall,
                      "cpu_tokens_per_s": n / cpu,
                      "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_worker(kind: str, length: int, batch: int, reps: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(length), str(batch), str(reps), "--arch", args.arch,
           "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"kind": kind, "length": length, "batch": batch, "error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(configs: list[tuple[str, int, int]], reps: int, args) -> dict:
    """Each configuration's best round, by wall and by CPU time separately."""
    best: dict[tuple, dict] = {}
    for r in range(args.rounds):
        for cfg in configs:
            row = run_worker(*cfg, reps, args)
            print(f"  round {r + 1}: {describe(row)}", flush=True)
            old = best.get(cfg)
            if old is None or "error" in old:
                best[cfg] = row
            elif "error" not in row:
                for clock in ("", "cpu_"):
                    if row[f"{clock}us_per_token"] < old[f"{clock}us_per_token"]:
                        for key in (f"{clock}us_per_token", f"{clock}tokens_per_s"):
                            old[key] = row[key]
                old["rss_peak_mb"] = max(old["rss_peak_mb"], row["rss_peak_mb"])
    return best


def describe(row: dict) -> str:
    head = f"{row['kind']:<8} {row['length']:>6} tokens x batch {row['batch']:<2}"
    if "error" in row:
        return f"{head}  failed: {row['error']}"
    return (f"{head}  {row['us_per_token']:7.1f} us/token ({row['cpu_us_per_token']:6.1f} CPU)  "
            f"{row['tokens_per_s']:7.0f} tok/s ({row['cpu_tokens_per_s']:6.0f} CPU)  "
            f"peak RSS {row['rss_peak_mb']:6.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forward", default="1024,2048,4096,8192", help="lengths of the no-grad forward")
    ap.add_argument("--train", default="1024,16384", help="lengths of the training step")
    ap.add_argument("--step-tokens", type=int, default=16384, help="tokens per training step (batch = this / length)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared CPU)")
    ap.add_argument("--arch", default="lm2", choices=["lm2", "vanilla", "rmt"])
    ap.add_argument("--quick", action="store_true", help="short lengths, one round (smoke run)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        kind, length, batch, reps = args.worker
        return worker(kind, int(length), int(batch), int(reps), args.arch)
    if args.quick:
        args.forward, args.train, args.step_tokens, args.rounds = "512,2048", "512,2048", 2048, 1
    fwd = [int(n) for n in args.forward.split(",") if n]
    trn = [int(n) for n in args.train.split(",") if n]
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.arch} of recipes/small.toml; best of "
          f"{args.rounds} rounds")

    configs = [(kind, n, 1) for n in fwd for kind in ("forward", "chunked")]
    configs += [("train", n, max(1, args.step_tokens // n)) for n in trn]
    configs += [("train", n, 1) for n in trn if max(1, args.step_tokens // n) != 1]
    best = measure(configs, 1 if args.quick else 3, args)

    print("\nsummary (best round of each)")
    for row in best.values():
        print("  " + describe(row))
    ok = {k: v for k, v in best.items() if "error" not in v}

    def ratio(label: str, a: dict | None, b: dict | None, key: str, target: str) -> None:
        if a and b:
            print(f"{label}: {b[key] / a[key]:.2f} wall, {b['cpu_' + key] / a['cpu_' + key]:.2f} CPU{target}")

    ratio(f"forward time per token {fwd[-1]} / {fwd[0]}", ok.get(("forward", fwd[0], 1)),
          ok.get(("forward", fwd[-1], 1)), "us_per_token", " (target <= 1.0 at the noise level)")
    step_batch = max(1, args.step_tokens // trn[0])
    ratio(f"training tokens/s {trn[0]} (batch {step_batch}) / {trn[-1]} (batch 1)", ok.get(("train", trn[-1], 1)),
          ok.get(("train", trn[0], step_batch)), "tokens_per_s", " (target <= 1.3)")
    ratio(f"training tokens/s {trn[0]} / {trn[-1]}, both batch 1", ok.get(("train", trn[-1], 1)),
          ok.get(("train", trn[0], 1)), "tokens_per_s", "")

if __name__ == "__main__":
    main()
