"""Training-step throughput: forward + backward + AdamW tokens/s, the models timed in one process.

    python benchmarks/train_step.py [--steps 5] [--rounds 3] [--device cpu|cuda] [--batch 8] [--seq 1024]
    python benchmarks/train_step.py --recipe recipes/gpu-125m.toml --device cuda [--precision-steps 50]

Default mode: (a) Hugging Face transformers LlamaForCausalLM, (b) lm2 vanilla, (c) lm2 LM2 (64 slots, S = 128,
memory in all blocks), (d) lm2 RMT — at d = 256, 4 layers, 4 heads, vocab 4096, seq 1024, batch 8 by default.
Models are timed in interleaved rounds (a b c d a b c d ...) so that a noisy neighbour hurts all of them alike;
the best round of each counts. MFU is reported against an fp32 (or bf16 on CUDA) matmul peak measured in the
same run. Targets (issue 3): b/a >= 1.0, c/b >= 0.75.

Compare mode (`--recipe A.toml --recipe B.toml ...`, e.g. `--recipe recipes/babilong/{lm2,rmt,vanilla,
vanilla-window}.toml --seq 1024 --seq 4096`): each recipe's model as written, trained as `lm2 pretrain` would,
in interleaved rounds at each sequence length; prints tokens/s and the ratio to the first recipe.

Recipe mode (one `--recipe`): the recipe's LM2 and its vanilla twin, each trained as `lm2 pretrain` would on this
device: bf16 autocast on CUDA (the memory bank in float32), lm2's AdamW groups (the fused kernel on CUDA),
torch.compile when train.compile (the first, compiling steps are not timed), activation checkpointing when the
recipe asks. Prints tokens/s, MFU against the bf16 matmul peak measured in this run (and against the GPU's
datasheet peak when known), the LM2/vanilla step ratio and the peak GPU memory of each. `--precision-steps N`
also trains the LM2 N steps in bf16 autocast and in fp32 from the same initialisation on the same batches
and reports how far the two loss curves are apart. `--json PATH` writes the results as one JSON object.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py (named by the issue that asked for it) would shadow the standard library's `tokenize`
# module for every script in this folder: drop the folder from the import path before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lm2cli import build_model, load_recipe  # noqa: E402


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lm2_model(arch: str, args):
    recipe = load_recipe(None, [
        f"model.arch={arch}", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
        f"model.n_heads={args.heads}", f"model.vocab_size={args.vocab}", "model.tie_embeddings=false",
        f"memory.slots={args.slots}", f"memory.segment_len={args.segment}", f"memory.heads={args.heads}",
        "memory.layers=all", f"memory.slots={args.slots if arch == 'lm2' else args.rmt_tokens}"])
    return build_model(recipe)


def hf_model(args, ffn_hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=ffn_hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


class Runner:
    """One model with its optimizer; `step()` is one forward + backward + AdamW update on a fixed batch."""

    def __init__(self, name, model, is_hf, args, device, autocast_dtype):
        self.name, self.is_hf, self.device = name, is_hf, device
        self.model = model.to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen).to(device)
        self.autocast_dtype = autocast_dtype
        self.best = float("inf")

    def step(self) -> None:
        inp, tgt = self.x[:, :-1], self.x[:, 1:]
        with torch.autocast(self.device.split(":")[0], dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            # lm2 as `lm2 pretrain` calls it: the final state is not needed (memory.carry = false)
            logits = self.model(inp).logits if self.is_hf else self.model(inp, keep_state=False)[0]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def time_round(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        seconds = (time.perf_counter() - t0) / steps
        self.best = min(self.best, seconds)
        return seconds


# ------------------------------------------------------------------------------------------ recipe mode


def recipe_runner(name: str, recipe, device: str, batch: int, seq: int, compile: bool):
    """A step exactly as `lm2 pretrain` runs it: the loop's loss, lm2's optimizer groups, autocast, compile."""
    from lm2cli.training.loop import loss_sum
    from lm2cli.training.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(recipe).to(device).train()
    model.set_activation_checkpointing(recipe.train.activation_checkpointing)
    opt, _ = build_optimizer(model, recipe.train, model.is_memory_param, torch.device(device).type)
    if compile:
        model.compile_blocks()  # as `lm2 pretrain` does with train.compile
    run = model
    bf16 = bf16_autocast(recipe, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, recipe.model.vocab_size, (batch, seq + 1), generator=gen).to(device)

    class RecipeRunner(Runner):
        def __init__(self):
            self.name, self.is_hf, self.device, self.model, self.opt, self.best = name, False, device, model, opt, 1e9
            self.peak_mb = 0.0

        def step(self) -> None:
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                logits, _ = run(x[:, :-1], keep_state=False)
            (loss_sum(logits, x[:, 1:]) / x[:, 1:].numel()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return RecipeRunner()


def bf16_autocast(recipe, device: str) -> bool:
    """The loop's rule (lm2cli.training.runtime): train.dtype = auto means bf16 autocast on CUDA, fp32 on CPU."""
    return recipe.train.dtype == "bf16" or (recipe.train.dtype == "auto" and device.startswith("cuda"))


def patterned_batch(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Tokens with structure to learn (each token a fixed function of the previous one, 10% noise), so a loss
    curve over a few dozen steps goes somewhere and two precisions can be compared along it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(batch, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(1, seq + 1):
        x[:, t] = (x[:, t - 1] * 7 + 3) % vocab
    noise = torch.rand(batch, seq + 1, generator=gen) < 0.1
    return torch.where(noise, torch.randint(0, vocab, (batch, seq + 1), generator=gen), x)


def loss_curve(recipe, device: str, batch: int, seq: int, steps: int, bf16: bool) -> list[float]:
    from lm2cli.training.loop import loss_sum
    from lm2cli.training.optim import build_optimizer, lr_at, set_lr

    torch.manual_seed(0)
    model = build_model(recipe).to(device).train()
    opt, _ = build_optimizer(model, recipe.train, model.is_memory_param, torch.device(device).type)
    losses = []
    for step in range(steps):
        set_lr(opt, lr_at(step, lr=recipe.train.lr, min_lr=recipe.train.min_lr, warmup_steps=min(10, steps // 5),
                          total_steps=steps))
        x = patterned_batch(recipe.model.vocab_size, batch, seq, seed=step).to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(x[:, :-1], keep_state=False)
        loss = loss_sum(logits, x[:, 1:]) / x[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# Relative distance allowed between the bf16-autocast and the fp32 loss at every step of the precision check:
# bf16 keeps 8 bits of mantissa (0.4% per rounding); the two runs drift apart as their weights do.
PRECISION_TOLERANCE = 0.02


def precision_check(recipe, device: str, batch: int, seq: int, steps: int) -> dict:
    fp32 = loss_curve(recipe, device, batch, seq, steps, bf16=False)
    bf16 = loss_curve(recipe, device, batch, seq, steps, bf16=True)
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16, strict=True)]
    worst = max(range(steps), key=lambda i: rel[i])
    print(f"precision: {steps} steps, loss fp32 {fp32[0]:.3f} -> {fp32[-1]:.3f}, bf16 {bf16[0]:.3f} -> {bf16[-1]:.3f}; "
          f"largest relative difference {rel[worst]:.4f} at step {worst + 1} (tolerance {PRECISION_TOLERANCE})")
    return {"precision_steps": steps, "loss_fp32": fp32, "loss_bf16": bf16, "precision_max_rel_diff": rel[worst],
            "precision_ok": rel[worst] <= PRECISION_TOLERANCE}


def recipe_mode(args) -> dict:
    from lm2cli.recipe import load_recipe
    from lm2cli.training.runtime import PEAK_BF16_FLOPS

    device = args.device
    vocab = args.vocab or load_recipe(args.recipe).model.vocab_size or load_recipe(args.recipe).tokenizer.vocab_size
    recipe = load_recipe(args.recipe, [f"model.vocab_size={vocab}", *args.set])
    vanilla = load_recipe(args.recipe, [f"model.vocab_size={vocab}", *args.set, "model.arch=vanilla"])
    batch, seq = args.batch or recipe.train.batch_size, args.seq or recipe.train.seq_len
    compile = recipe.train.compile and not args.no_compile
    bf16 = bf16_autocast(recipe, device)
    print(f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}) "
          f"torch={torch.__version__} compute={'bf16 autocast' if bf16 else 'fp32'} compile={compile} "
          f"activation_checkpointing={recipe.train.activation_checkpointing}")
    print(f"recipe {args.recipe}: batch {batch} x seq {seq}, d {recipe.model.d_model}, {recipe.model.n_layers} blocks, "
          f"window {recipe.attention.window}, segment {recipe.memory.segment_len}")
    runners = [recipe_runner("lm2 LM2", recipe, device, batch, seq, compile),
               recipe_runner("lm2 vanilla", vanilla, device, batch, seq, compile)]
    for r in runners:  # warm-up: compilation (two steps: the second may recompile once), allocator, optimizer
        r.step()
        r.step()
    for _ in range(args.rounds):
        for r in runners:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            r.time_round(args.steps)
            if device.startswith("cuda"):
                r.peak_mb = max(r.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
    peak = matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32, n=8192 if device.startswith("cuda")
                             else 2048)
    sheet = None
    if bf16 and device.startswith("cuda"):  # the first matching name: the table lists specific models first
        sheet = next((f for k, f in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    print(f"matmul peak measured ({'bf16' if bf16 else 'fp32'}): {peak / 1e12:.1f} TFLOP/s"
          + (f"; datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))
    print(f"{'model':14s} {'params':>8s} {'tokens/s':>10s} {'s/step':>8s} {'MFU':>6s} {'peak mem':>10s}")
    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "batch": batch, "seq": seq,
           "compile": compile, "bf16": bf16, "matmul_peak_tflops": peak / 1e12}
    for r in runners:
        rate = batch * seq / r.best
        mfu = r.model.flops_per_token(seq) * rate / peak
        key = r.name.split()[-1].lower()
        out[f"{key}_tokens_per_s"], out[f"{key}_mfu"], out[f"{key}_peak_mb"] = rate, mfu, r.peak_mb
        out[f"{key}_params_m"] = r.model.param_report()["total"] / 1e6
        if sheet:
            out[f"{key}_mfu_datasheet"] = r.model.flops_per_token(seq) * rate / sheet
        print(f"{r.name:14s} {out[f'{key}_params_m']:7.1f}M {rate:10.0f} {r.best:8.3f} {100 * mfu:5.1f}% "
              f"{r.peak_mb:8.0f} MB")
    out["lm2_vanilla_step_ratio"] = out["lm2_tokens_per_s"] / out["vanilla_tokens_per_s"]
    print(f"ratio LM2 / vanilla tokens/s: {out['lm2_vanilla_step_ratio']:.2f}")
    if args.precision_steps:
        out.update(precision_check(recipe, device, args.precision_batch or batch, seq, args.precision_steps))
    return out


def compare_mode(args) -> dict:
    """Each recipe's own model, timed in interleaved rounds at every --seq; ratios against the first recipe."""
    from lm2cli.recipe import load_recipe

    device = args.device
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    out = {"device": device, "threads": torch.get_num_threads(), "runs": []}
    for seq in args.seqs:
        runners = []
        for path in args.recipe:
            first = load_recipe(path)
            vocab = args.vocab or first.model.vocab_size or first.tokenizer.vocab_size
            recipe = load_recipe(path, [f"model.vocab_size={vocab}", *args.set])
            batch = args.batch or recipe.train.batch_size
            runners.append((path, batch, recipe_runner(Path(path).stem, recipe, device, batch, seq, False)))
        for _, _, r in runners:
            r.step()
        for _ in range(args.rounds):
            for _, _, r in runners:
                r.time_round(args.steps)
        base = None
        print(f"seq {seq}: {'recipe':38s} {'params':>8s} {'batch':>5s} {'tokens/s':>10s} {'s/step':>8s} {'ratio':>6s}")
        for path, batch, r in runners:
            rate = batch * seq / r.best
            base = base or rate
            params = r.model.param_report()["total"]
            print(f"         {path:38s} {params / 1e6:7.2f}M {batch:5d} {rate:10.0f} {r.best:8.3f} {rate / base:6.2f}")
            out["runs"].append({"recipe": path, "seq": seq, "batch": batch, "params": params, "tokens_per_s": rate})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, action="append", dest="seqs",
                   help="sequence length (default 1024; compare mode: repeatable)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--rmt-tokens", type=int, default=16)
    p.add_argument("--only", default="a,b,c,d", help="subset of models to run, e.g. b,c")
    p.add_argument("--recipe", action="append", default=[],
                   help="recipe mode: this recipe's LM2 and vanilla twin, trained as lm2 pretrain does; "
                        "repeated: compare mode, each recipe's own model")
    p.add_argument("--no-compile", action="store_true", help="recipe mode: do not compile even if train.compile")
    p.add_argument("--precision-steps", type=int, default=0, help="recipe mode: bf16 vs fp32 loss curves, N steps")
    p.add_argument("--precision-batch", type=int, default=0, help="recipe mode: batch of the precision check")
    p.add_argument("--json", help="write the results of recipe mode to this file")
    p.add_argument("--set", action="append", default=[], help="recipe mode: override a recipe key (repeatable)")
    args = p.parse_args()
    args.seq = args.seqs[0] if args.seqs else 1024
    args.seqs = args.seqs or [1024]
    if args.recipe:  # the recipe's sizes unless given
        args.batch = args.batch if "--batch" in sys.argv else 0
        args.vocab = args.vocab if "--vocab" in sys.argv else 0
        args.seq = args.seq if "--seq" in sys.argv else 0
        if len(args.recipe) > 1:
            result = compare_mode(args)
        else:
            args.recipe = args.recipe[0]
            result = recipe_mode(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result) + "\n")
        return

    torch.manual_seed(0)
    device = args.device
    autocast_dtype = torch.bfloat16 if device.startswith("cuda") else None
    peak_dtype = torch.bfloat16 if autocast_dtype is not None else torch.float32
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"compute={'bf16 autocast' if autocast_dtype else 'fp32'}")
    print(f"config: d={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch}; LM2 slots={args.slots} S={args.segment}; RMT tokens={args.rmt_tokens}")

    vanilla = lm2_model("vanilla", args)
    wanted = set(args.only.split(","))
    runners = []
    if "a" in wanted:
        runners.append(Runner("a HF LlamaForCausalLM", hf_model(args, vanilla.args.ffn_hidden), True, args, device,
                              autocast_dtype))
    if "b" in wanted:
        runners.append(Runner("b lm2 vanilla", vanilla, False, args, device, autocast_dtype))
    if "c" in wanted:
        runners.append(Runner("c lm2 LM2", lm2_model("lm2", args), False, args, device, autocast_dtype))
    if "d" in wanted:
        runners.append(Runner("d lm2 RMT", lm2_model("rmt", args), False, args, device, autocast_dtype))

    for r in runners:  # warm-up: allocator, kernels, optimizer state
        r.step()
    for _ in range(args.rounds):
        for r in runners:
            r.time_round(args.steps)
    peak = matmul_peak_flops(device, peak_dtype)
    tokens = args.batch * args.seq
    print(f"matmul peak ({peak_dtype}): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':24s} {'tokens/s':>10s} {'s/step':>8s} {'MFU':>6s}")
    rates = {}
    for r in runners:
        rate = tokens / r.best
        rates[r.name[0]] = rate
        model = r.model if not r.is_hf else vanilla  # same shapes: use lm2's FLOPs estimate for HF too
        mfu = model.flops_per_token(args.seq) * rate / peak
        print(f"{r.name:24s} {rate:10.0f} {r.best:8.3f} {100 * mfu:5.1f}%")
    if {"a", "b"} <= rates.keys():
        print(f"ratio b/a (lm2 vanilla vs HF Llama): {rates['b'] / rates['a']:.2f}  (target >= 1.0)")
    if {"b", "c"} <= rates.keys():
        print(f"ratio c/b (LM2 vs vanilla):          {rates['c'] / rates['b']:.2f}  (target >= 0.75)")
    if {"b", "d"} <= rates.keys():
        print(f"ratio d/b (RMT vs vanilla):          {rates['d'] / rates['b']:.2f}")


if __name__ == "__main__":
    main()
