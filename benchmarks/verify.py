"""What checkpoint verification costs: sha256 of every file vs only reading it, same process, same files.

    python benchmarks/verify.py                  # the small recipe's checkpoint and a ~125M-parameter one
    python benchmarks/verify.py --repeats 5

Every reader (`generate`, `finetune.init_from`, `--resume`) checks each file of a checkpoint against the manifest
in trainer_state.json before using it: the size always, the sha256 unless --no-verify-checksums. The baseline is
reading the same bytes without hashing (page cache warm, as right after training), so the ratio is the price of
the hash itself. The ~125M-parameter checkpoint is stood in for by files of its sizes (fp32 weights, and for a
training checkpoint AdamW's two moments besides): hashing time does not depend on the bytes. Each number is the
best of --repeats runs (the machine may be shared).
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's `tokenize` (imported by inspect, numpy, ...)
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm2cli.checkpoint import save_model_files, verify_checkpoint, write_state_file  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_all(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


def small_checkpoint(directory: Path) -> Path:
    """The small recipe's model, saved as training saves it, plus an optimizer-sized file (two moments)."""
    import torch

    from lm2cli import build_model, load_recipe
    from lm2cli.data.tokenizer import train_tokenizer

    recipe = load_recipe(REPO / "recipes" / "small.toml")
    tok = train_tokenizer([f"Mary went to the kitchen {i}. John took the apple {i % 13}." for i in range(3000)],
                          model_type="bpe", vocab_size=recipe.tokenizer.vocab_size, byte_fallback=True,
                          character_coverage=1.0, sample_sentences=10_000, answer_token="<ans>", extra_symbols=[],
                          seed=0)
    model = build_model(recipe, tok.vocab_size)
    ckpt = directory / "small"
    save_model_files(ckpt, model, recipe, tok)
    n = sum(p.numel() for p in model.parameters())
    write_random(ckpt / "optimizer.safetensors", 8 * n)
    write_state_file(ckpt, {})
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return ckpt


def write_random(path: Path, n_bytes: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(n_bytes >> 20):
            f.write(block)
        f.write(block[: n_bytes & ((1 << 20) - 1)])


def big_checkpoint(directory: Path, params: int) -> Path:
    ckpt = directory / "big"
    ckpt.mkdir()
    write_random(ckpt / "model.safetensors", 4 * params)
    write_random(ckpt / "optimizer.safetensors", 8 * params)
    (ckpt / "recipe.toml").write_text("# stand-in\n")
    (ckpt / "tokenizer.model").write_bytes(b"stand-in")
    write_state_file(ckpt, {})
    return ckpt


def report(name: str, ckpt: Path, repeats: int) -> None:
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    weights = (ckpt / "model.safetensors").stat().st_size
    read_all(ckpt)  # warm the page cache
    t_read = best_of(repeats, lambda: read_all(ckpt))
    t_size = best_of(repeats, lambda: verify_checkpoint(ckpt, checksums=False))
    t_sha = best_of(repeats, lambda: verify_checkpoint(ckpt, checksums=True))
    mb = size / 1e6
    print(f"{name}: {mb:,.1f} MB in all ({weights / 1e6:,.1f} MB of weights)")
    print(f"  read only (baseline)     {t_read:8.3f} s  {mb / t_read:8,.0f} MB/s")
    print(f"  verify, sizes only       {t_size:8.3f} s")
    print(f"  verify, sizes + sha256   {t_sha:8.3f} s  {mb / t_sha:8,.0f} MB/s  = {t_sha / t_read:.1f}x reading; "
          f"inference (weights only) ~{t_sha * weights / size:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--params", type=float, default=125e6, help="parameters of the large stand-in")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lm2-verify-bench-") as tmp:
        tmp = Path(tmp)
        report("small recipe (training checkpoint)", small_checkpoint(tmp), args.repeats)
        report(f"{args.params / 1e6:.0f}M parameters (training checkpoint)", big_checkpoint(tmp, int(args.params)),
               args.repeats)


if __name__ == "__main__":
    main()
