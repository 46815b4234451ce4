"""Generation speed of lm2, measured against Hugging Face in the same process.

    python benchmarks/generate.py                     # CPU, recipes/small.toml; --quick for a short smoke run
    python benchmarks/generate.py --device cuda --recipe recipes/gpu-125m.toml --prefill 8192,131072

1. Decode and prefill tokens/s at batch 1 for the recipe's model (lm2 and its vanilla twin), against
   `transformers.LlamaForCausalLM.generate` (random weights, the same width, depth, heads, FFN and vocabulary;
   greedy; the same number of new tokens; use_cache=True, and on CUDA a static cache). lm2 runs twice: eager,
   and with `--compile`'s static-shape step (its one-time compilation is timed and reported apart). For lm2,
   whose memory adds parameters, also against a deeper HF Llama with the same parameter count ("a Llama of
   the same size"). Both sides are timed the same way: prefill = a call that generates 1 token; decode rate =
   (N - 1) / (time for N tokens - time for 1 token). Runs alternate between the sides and the best repetition
   of each counts, so load on the machine hits them alike.
2. Batch-8 decode tokens/s (greedy, equal-length prompts): lm2 eager, lm2 compiled, HF generate.
3. Prefill time per token with a finite attention window at a short and a long prompt (small recipe: window
   128, memory segment 64). On CPU each length runs in its own subprocess so its peak RSS (ru_maxrss) is its
   own; median of 3 processes, each the median of repeated prefills totalling 32K tokens. On CUDA, in this
   process, with the peak of allocated GPU memory per length.

Weights are random: speed does not depend on their values. Our side runs the full `Generator` path (sampling,
incremental detokenization, stop-string matching); Hugging Face returns ids only.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py (named by the issue that asked for it) would shadow the standard library's `tokenize`
# module for every script in this folder: drop the folder from the import path before anything imports it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm2cli.generation.generator import Generator  # noqa: E402
from lm2cli.generation.sampling import SamplingParams  # noqa: E402
from lm2cli.recipe import load_recipe  # noqa: E402

SMALL = REPO / "recipes" / "small.toml"


# ------------------------------------------------------------------------------------------- fixtures


def synthetic_tokenizer(vocab_size: int):
    """A real lm2 SentencePiece tokenizer with exactly `vocab_size` pieces, trained on pseudo-words."""
    from lm2cli.data.tokenizer import train_tokenizer

    rnd = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = ["".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 4))) for _ in range(6000)]
    sentences = [" ".join(rnd.choice(words) for _ in range(12)) + "." for _ in range(20000)]
    return train_tokenizer(sentences, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
                           character_coverage=1.0, sample_sentences=20000, answer_token="<ans>",
                           extra_symbols=[], seed=0)


class IdTokenizer:
    """Stands in for a SentencePiece tokenizer of a large vocabulary (a synthetic one cannot have 32K pieces):
    every id decodes to a short word, so the generator's incremental detokenization still does real work."""

    bos_id, eos_id, pad_id = 1, 2, 3

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return "".join(f" w{i}" for i in ids)


def bench_tokenizer(vocab_size: int):
    return synthetic_tokenizer(vocab_size) if vocab_size <= 4096 else IdTokenizer(vocab_size)


def lm2_generator(recipe, tokenizer, device: str = "cpu", compile: bool = False):
    from lm2cli.model import build_model

    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size).to(device).eval()
    return Generator(model, tokenizer, recipe, device=device, compile=compile), model


def hf_llama_like(model, n_layers: int | None = None):
    """A Hugging Face Llama with our backbone's shapes (attention window aside: HF Llama has none).

    `n_layers` deepens it, e.g. to match the parameter count of an lm2 model whose memory adds parameters.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.d_model, intermediate_size=a.ffn_hidden,
                         num_hidden_layers=n_layers or a.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
                         tie_word_embeddings=a.tie_embeddings, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).to(model.tok_emb.weight.device).eval()
    if hf.device.type == "cuda":
        hf = hf.to(torch.bfloat16)  # lm2 decodes under bf16 autocast on CUDA
    hf.generation_config.pad_token_id = 3
    return hf


def params_count(model) -> float:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6


# --------------------------------------------------------------------------------------- part 1: speed


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ours(gen: Generator, prompt: list[int], new: int) -> tuple[float, float]:
    """(wall, CPU) seconds to generate `new` tokens after `prompt`."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new, min_new_tokens=new)
    wall, cpu = clocks()
    result = gen.generate(prompt, params)
    assert result.new_tokens == new
    return time.perf_counter() - wall, time.process_time() - cpu


def hf_generate_kwargs(hf) -> dict:
    # On CUDA, HF's fastest decoding: a preallocated static cache (which transformers also compiles).
    return {"cache_implementation": "static"} if hf.device.type == "cuda" else {}


@torch.inference_mode()
def time_hf(hf, prompts: list[list[int]], new: int) -> tuple[float, float]:
    ids = torch.tensor(prompts, device=hf.device)
    sync()
    wall, cpu = clocks()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, use_cache=True, **hf_generate_kwargs(hf))
    sync()
    assert out.shape[1] == len(prompts[0]) + new
    return time.perf_counter() - wall, time.process_time() - cpu


def compare_sides(label: str, sides: dict, n_prompt: int, new: int, reps: int, batch: int = 1) -> dict:
    """Interleaved timing of `sides` (name -> run(n_tokens) -> (wall, CPU)); prints tok/s and ratios to "hf".

    Returns {(clock, side): (prefill tok/s, decode tok/s)}, decode counting all rows of the batch."""
    for run in sides.values():  # warm-up: first calls pay for lazy initialisation
        run(2)
    t1 = {k: [] for k in sides}
    tn = {k: [] for k in sides}
    for _ in range(reps):
        for name, run in sides.items():
            t1[name].append(run(1))
            tn[name].append(run(new))
    out = {}
    for clock, i in (("wall", 0), ("cpu", 1)):
        for name in sides:
            first, full = min(t[i] for t in t1[name]), min(t[i] for t in tn[name])
            out[clock, name] = (batch * n_prompt / first, batch * (new - 1) / max(full - first, 1e-9))
        hf = out[clock, "hf"]
        for name in sides:
            if name == "hf":
                continue
            ours = out[clock, name]
            print(f"{label + ' ' + name:<34} {clock:>4}: prefill {ours[0]:>8.0f} vs HF {hf[0]:>8.0f} tok/s "
                  f"({ours[0] / hf[0]:.2f}x)   decode {ours[1]:>6.0f} vs HF {hf[1]:>6.0f} tok/s "
                  f"({ours[1] / hf[1]:.2f}x)", flush=True)
    return out


def compare_speed(label: str, gens: dict, hf, prompt: list[int], new: int, reps: int) -> dict:
    sides = {name: (lambda n, g=g: time_ours(g, prompt, n)) for name, g in gens.items()}
    sides["hf"] = lambda n: time_hf(hf, [prompt], n)
    return compare_sides(label, sides, len(prompt), new, reps)


def warm_compiled(gen: Generator) -> float:
    """Compile the static-shape step (and its segment boundary); returns the seconds it took."""
    t0 = time.perf_counter()
    gen.warm_up()
    sync()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------- part 2: batch decode


def raw_decode_side(model, prompts: torch.Tensor, decoder=None, warm: bool = False):
    """run(n) -> (wall, CPU) seconds for prefill + greedy decoding of n tokens at the batch of `prompts`, through
    the eager state or a StaticDecoder (the model-level loop: the Generator decodes one prompt at a time)."""
    from lm2cli.generation.generator import PREFILL_CHUNK_TOKENS

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if prompts.is_cuda else contextlib.nullcontext()

    @torch.inference_mode()
    def run(n: int) -> tuple[float, float]:
        sync()
        wall, cpu = clocks()
        with autocast:
            state, chunk = None, PREFILL_CHUNK_TOKENS
            for i in range(0, prompts.shape[1], chunk):
                logits, state = model(prompts[:, i:i + chunk], state)
            token = logits[:, -1].argmax(-1, keepdim=True)
            if decoder is not None:
                decoder.load(state)
            with decoder.warmed_up() if warm else contextlib.nullcontext():
                for _ in range(n - 1):
                    if decoder is not None:
                        token = decoder.decode(token).argmax(-1, keepdim=True)
                    else:
                        logits, state = model(token, state)
                        token = logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    return run


def batch_decode(model, hf, prompt_len: int, new: int, reps: int, batch: int, compile: bool) -> dict:
    from lm2cli.model.static import StaticDecoder, compile_options

    device = model.tok_emb.weight.device
    rnd = random.Random(2)
    rows = [[1] + [rnd.randrange(5, model.args.vocab_size) for _ in range(prompt_len - 1)] for _ in range(batch)]
    prompts = torch.tensor(rows, device=device)
    sides = {"eager": raw_decode_side(model, prompts)}
    if compile:
        decoder = StaticDecoder(model, batch, compile=True, **compile_options(device))
        t0 = time.perf_counter()
        raw_decode_side(model, prompts, decoder)(model.args.segment_len + 2)  # compiles through a boundary
        print(f"batch {batch}: compiling the static-shape step took {time.perf_counter() - t0:.1f} s", flush=True)
        sides["compiled"] = raw_decode_side(model, prompts, decoder, warm=True)
    sides["hf"] = lambda n: time_hf(hf, rows, n)
    return compare_sides(f"batch {batch}", sides, prompt_len, new, reps, batch)


# ------------------------------------------------------------------------------ part 2: long prefill


def prefill_worker(n_tokens: int, arch: str, recipe_path: str) -> None:
    """Run in a fresh process: prefill n_tokens (after a warm-up) and report time per token and peak RSS.

    Short prompts are prefilled several times (32K tokens in all) and the median taken, so a 1K prefill is
    not judged on a single 0.1 s run while the 32K one averages over 3 s of machine noise.
    """
    recipe = load_recipe(recipe_path, [f"model.arch={arch}", "model.vocab_size=2048"])
    from lm2cli.model import build_model

    torch.manual_seed(0)
    model = build_model(recipe).eval()
    gen = Generator(model, _NoTokenizer(), recipe, device="cpu")
    rnd = random.Random(0)
    gen.prefill([1] + [rnd.randrange(5, 2048) for _ in range(1023)])  # warm-up, same for every length
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prompt = [1] + [rnd.randrange(5, 2048) for _ in range(n_tokens - 1)]
    walls, cpus = [], []
    for _ in range(max(1, 32768 // n_tokens)):
        wall, cpu = clocks()
        gen.prefill(prompt)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    wall, cpu = sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"tokens": n_tokens, "seconds": wall, "us_per_token": 1e6 * wall / n_tokens,
                      "cpu_us_per_token": 1e6 * cpu / n_tokens, "rss_before_mb": rss_before / 1024,
                      "rss_peak_mb": rss_peak / 1024}))


class _NoTokenizer:
    """Prefill needs no text; this stands in where the Generator expects a tokenizer."""

    bos_id, eos_id = 1, 2


def long_prefill(lengths: list[int], arch: str, reps: int, recipe_path: str) -> list[dict]:
    rows = []
    for n in lengths:
        runs = []
        for _ in range(reps):
            proc = subprocess.run([sys.executable, __file__, "--prefill-worker", str(n), "--arch", arch,
                                   "--recipe", recipe_path], capture_output=True, text=True, check=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        best = sorted(runs, key=lambda r: r["us_per_token"])[len(runs) // 2]  # the median process
        best["rss_peak_mb"] = max(r["rss_peak_mb"] for r in runs)
        rows.append(best)
        print(f"{arch} prefill {n:>6} tokens: {best['us_per_token']:7.1f} us/token ({best['cpu_us_per_token']:.1f} "
              f"CPU), {best['seconds']:6.2f} s, "
              f"peak RSS {best['rss_peak_mb']:6.0f} MB (before prefill {best['rss_before_mb']:.0f} MB)", flush=True)
    return rows


def cuda_prefill(gen: Generator, lengths: list[int]) -> list[dict]:
    """On the GPU, in this process: time per token and the peak of allocated GPU memory of each prefill."""
    rnd = random.Random(0)
    vocab = gen.model.args.vocab_size
    gen.prefill([1] + [rnd.randrange(5, vocab) for _ in range(4095)])  # warm-up
    rows = []
    for n in lengths:
        prompt = [1] + [rnd.randrange(5, vocab) for _ in range(n - 1)]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        _, state = gen.prefill(prompt)
        sync()
        seconds = time.perf_counter() - t0
        del state
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append({"tokens": n, "seconds": seconds, "us_per_token": 1e6 * seconds / n, "peak_mb": peak})
        print(f"prefill {n:>7} tokens: {1e6 * seconds / n:7.2f} us/token, {seconds:6.2f} s, peak GPU memory above the "
              f"weights {peak:8.1f} MiB", flush=True)
    return rows


# ------------------------------------------------------------------- part 3: where decode time goes


def per_call_us(fns: dict, calls: int = 100, rounds: int = 15) -> dict:
    """CPU microseconds of this process per call of each function: the best of `rounds` rounds, the functions
    interleaved within each round so that all of them see the same quiet and busy moments. CPU time, not wall
    time: on a shared machine, waiting for a core would swamp parts of a few microseconds."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.process_time()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.process_time() - t0) / calls * 1e6)
    return best


@torch.inference_mode()
def decode_profile(arch: str, tokenizer, prompt: list[int]) -> None:
    """Split one decode step (batch 1, one token, state after the prompt) into its parts, each timed alone
    in CPU time; "unattributed" is the whole step minus its timed parts (Python glue, state bookkeeping)."""
    from lm2cli.generation.detokenize import IncrementalDecoder
    from lm2cli.generation.sampling import choose_next, process_logits
    from lm2cli.model.model import attention_mask

    recipe = load_recipe(SMALL, [f"model.arch={arch}"])
    gen, model = lm2_generator(recipe, tokenizer)
    a = model.args
    logits, state = gen.prefill(prompt[:len(prompt) - len(prompt) % a.segment_len - 2])  # segment not full
    token = torch.tensor([[7]])
    h = model.tok_emb(token)
    pos, n_cached = state.pos, state.layers[0].k.shape[2]
    cos, sin = model._build_rope(pos, 1, h)
    mask, causal = attention_mask(pos, 1, n_cached, a.window, "cpu")
    params = SamplingParams(temperature=0.0)
    context = torch.tensor([prompt])
    detok = IncrementalDecoder(tokenizer.decode, prompt)
    fns = {
        "whole decode step": lambda: (model(token, state),
                                      int(choose_next(process_logits(logits, context, params), params, None)[0]),
                                      detok.push(100)),
        "embedding": lambda: model.tok_emb(token),
        "rope tables + mask": lambda: (model._rope_tables(pos, 1, h), attention_mask(pos, 1, n_cached, a.window,
                                                                                    "cpu")),
        "final norm + lm_head": lambda: model.lm_head(model.norm(h)).float(),
        "norms (2 per block)": lambda: [(b.norm1(h), b.norm2(h)) for b in model.blocks],
        "self-attention + KV cache": lambda: [b.attn(h, cos, sin, mask, causal, st.k, st.v)
                                              for b, st in zip(model.blocks, state.layers, strict=True)],
        "memory read (+ pending)": lambda: [b.memory(h, st.memory) for b, st in
                                            zip(model.blocks, state.layers, strict=True) if b.memory is not None],
        "SwiGLU FFN": lambda: [b.ffn(h) for b in model.blocks],
        "greedy choice": lambda: int(choose_next(process_logits(logits, context, params), params, None)[0]),
        "detokenize": lambda: detok.push(100),
    }
    us = per_call_us(fns)
    total = us.pop("whole decode step")
    us["unattributed (glue, bookkeeping)"] = total - sum(us.values())
    print(f"\n{arch}: one decode step {total:.0f} us CPU ({1e6 / total:.0f} tok/s)")
    for name, t in us.items():
        print(f"  {name:<34} {t:7.0f} us  {100 * t / total:5.1f}%")


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short prompts and few repetitions (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--recipe", default=str(SMALL), help="the model to measure (default recipes/small.toml)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable on shared CPUs)")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batch-decode measurement (0 = skip)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled static-shape side")
    ap.add_argument("--archs", default="lm2,vanilla", help="architectures to measure at batch 1")
    ap.add_argument("--no-same-size", action="store_true", help="skip the comparison with a same-size HF Llama")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per side (default 5, 2 with --quick)")
    ap.add_argument("--prefill", default="", help="prompt lengths of the long-prefill part (default 1024,32768)")
    ap.add_argument("--profile", action="store_true", help="only split one decode step into its parts")
    ap.add_argument("--json", help="also write the headline numbers to this file (one JSON object)")
    ap.add_argument("--prefill-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="lm2", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.prefill_worker:
        return prefill_worker(args.prefill_worker, args.arch, args.recipe)

    prompt_len, new, reps = (128, 32, 2) if args.quick else (512, 128, 5)
    reps = args.reps or reps
    lengths = [1024, 4096] if args.quick else [1024, 32768]
    if args.prefill:
        lengths = [int(n) for n in args.prefill.split(",")]
    compile = not args.no_compile
    device = args.device
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {where}; {args.recipe}; prompt {prompt_len} tokens, {new} new tokens, "
          f"best of {reps}")
    vocab = load_recipe(args.recipe).model.vocab_size or load_recipe(args.recipe).tokenizer.vocab_size
    tokenizer = bench_tokenizer(vocab)
    rnd = random.Random(1)
    prompt = [tokenizer.bos_id] + [rnd.randrange(5, tokenizer.vocab_size) for _ in range(prompt_len - 1)]
    if args.profile:
        for arch in ("lm2", "vanilla"):
            decode_profile(arch, tokenizer, prompt)
        return
    summary: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "recipe": args.recipe}
    for arch in args.archs.split(","):
        recipe = load_recipe(args.recipe, [f"model.arch={arch}"])
        gens = {"eager": lm2_generator(recipe, tokenizer, device)[0]}
        model = gens["eager"].model
        if compile:
            gens["compiled"] = Generator(model, tokenizer, recipe, device=device, compile=True)
            summary[f"{arch}_compile_s"] = warm_compiled(gens["compiled"])
            print(f"{arch}: compiling the static-shape step took {summary[f'{arch}_compile_s']:.1f} s", flush=True)
        hf = hf_llama_like(model)
        cache = " (static cache)" if device == "cuda" else ""
        print(f"{arch}: {params_count(model):.2f}M parameters (window {recipe.attention.window}, segment "
              f"{recipe.memory.segment_len}); HF Llama: {params_count(hf):.2f}M{cache}")
        rates = compare_speed(f"{arch} vs HF Llama", gens, hf, prompt, new, reps)
        best = max(gens, key=lambda g: rates["wall", g][1])
        print(f"{arch}: best decode side {best}: {rates['wall', best][1] / rates['wall', 'hf'][1]:.2f}x HF "
              f"(target >= {3.0 if device == 'cuda' else 2.5:.1f}x for lm2)", flush=True)
        for side in gens:
            summary[f"{arch}_{side}_decode_tok_s"] = rates["wall", side][1]
            summary[f"{arch}_{side}_decode_vs_hf"] = rates["wall", side][1] / rates["wall", "hf"][1]
        summary[f"{arch}_hf_decode_tok_s"] = rates["wall", "hf"][1]
        if arch == "lm2" and not args.no_same_size:  # the same backbone is the strict comparison; also one
            # Llama of the same size
            per_layer = (params_count(hf_llama_like(model, model.args.n_layers + 1)) - params_count(hf))
            layers = model.args.n_layers + round((params_count(model) - params_count(hf)) / per_layer)
            hf_same = hf_llama_like(model, layers)
            print(f"HF Llama with {layers} blocks: {params_count(hf_same):.2f}M parameters (same size as lm2)")
            compare_speed(f"{arch} vs HF same-size", gens, hf_same, prompt, new, reps)
            del hf_same
        if arch == "lm2" and args.batch:
            rates = batch_decode(model, hf, prompt_len, new, reps, args.batch, compile)
            for (clock, side), (_, decode) in rates.items():
                if clock == "wall":
                    summary[f"batch{args.batch}_{side}_decode_tok_s"] = decode

    if device == "cuda":
        print(f"\nprefill with a finite window on the GPU: {', '.join(map(str, lengths))} tokens")
        recipe = load_recipe(args.recipe)
        rows = cuda_prefill(lm2_generator(recipe, tokenizer, device)[0], lengths)
        per_token = rows[-1]["us_per_token"] / rows[0]["us_per_token"]
        print(f"lm2: time per token {lengths[-1]}/{lengths[0]} = {per_token:.2f}; "
              f"peak memory {rows[-1]['peak_mb']:.0f} vs {rows[0]['peak_mb']:.0f} MiB")
        summary["prefill"] = rows
        write_summary(args.json, summary)
        return
    print(f"\nprefill with a finite window, {lengths[0]} vs {lengths[-1]} tokens (fresh process each, median of 3)")
    for arch in ("lm2",):
        rows = long_prefill(lengths, arch, 1 if args.quick else 3, args.recipe)
        ratio = rows[-1]["us_per_token"] / rows[0]["us_per_token"]
        cpu_ratio = rows[-1]["cpu_us_per_token"] / rows[0]["cpu_us_per_token"]
        rss = rows[-1]["rss_peak_mb"] / rows[0]["rss_peak_mb"]
        print(f"{arch}: time per token {lengths[-1]}/{lengths[0]} = {ratio:.2f} wall, {cpu_ratio:.2f} CPU "
              f"(target <= 1.3); peak RSS ratio {rss:.2f}")
        summary["prefill"] = rows
    write_summary(args.json, summary)


def write_summary(path: str | None, summary: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(summary) + "\n")

if __name__ == "__main__":
    main()
