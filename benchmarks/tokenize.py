"""Encoding throughput of `lm2 tokenize`: lm2's parallel path vs single-process SentencePiece, same run.

    python benchmarks/tokenize.py                 # ~20 MB of the built-in corpus (+ ../shared/books if present)
    python benchmarks/tokenize.py --mb 5 --workers 2 --repeats 3

Both paths encode the same documents with the same tokenizer into BOS tokens EOS arrays, and the benchmark
checks that their outputs are identical. The parallel path is the one `lm2 tokenize` uses
(lm2cli.data.prepare.ordered_map over spawned processes, ~1 MB work items); its time includes starting the
worker processes. Each measurement is the best of --repeats runs (the machine may be shared).
"""

from __future__ import annotations

import os
import sys

# This file is named tokenize.py: drop its folder from the import path so that it does not shadow the
# standard library's `tokenize` (imported by inspect, dataclasses, ...).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from lm2cli.data.corpus import TEXT_ITEM_CHARS, BuiltinCorpus  # noqa: E402
from lm2cli.data.prepare import _encode_item, _init_worker, encode_documents, ordered_map  # noqa: E402
from lm2cli.data.shards import token_dtype  # noqa: E402
from lm2cli.data.stories import TASKS  # noqa: E402
from lm2cli.data.tokenizer import train_tokenizer, training_sentences  # noqa: E402


def builtin_documents(megabytes: float) -> list[str]:
    corpus = BuiltinCorpus(tuple(TASKS), 10**7, True, 1234)
    docs, size, i = [], 0, 0
    while size < megabytes * 1e6:
        docs.append(corpus.document(i))
        size += len(docs[-1].encode("utf-8"))
        i += 1
    return docs


def book_documents(books: Path, megabytes: float) -> list[str]:
    paragraphs = [p.strip() for f in sorted(books.glob("*.txt"))
                  for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    docs, size = [], 0
    while size < megabytes * 1e6:  # the books are ~5 MB: repeat them to reach the size
        for p in paragraphs:
            docs.append(p)
            size += len(p.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    return docs


def items_of(docs: list[str]) -> list[tuple]:
    items, batch, size = [], [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= TEXT_ITEM_CHARS:
            items.append(("texts", batch))
            batch, size = [], 0
    if batch:
        items.append(("texts", batch))
    return items


def single_process(tok, docs, dtype) -> np.ndarray:
    tokens, _, _ = encode_documents(tok, docs, dtype)
    return tokens


def parallel(tok, docs, dtype, workers) -> np.ndarray:
    args = [(item, dtype) for item in items_of(docs)]
    parts = [tokens for tokens, _, _ in ordered_map(_encode_item, args, workers, _init_worker, (tok.to_bytes(),))]
    return np.concatenate(parts)


def best_time(fn, repeats: int):
    """Best wall time of `repeats` runs, with the CPU seconds (this process + its workers) of that run."""
    best, best_cpu, out = float("inf"), 0.0, None
    for _ in range(repeats):
        before, start = os.times(), time.perf_counter()
        out = fn()
        wall, after = time.perf_counter() - start, os.times()
        cpu = sum(after[i] - before[i] for i in range(4))  # user + system, self + children
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, out


def bench(name: str, docs: list[str], workers: int, repeats: int, vocab: int) -> float:
    tok = train_tokenizer(training_sentences(docs[:20000]), model_type="bpe", vocab_size=vocab, byte_fallback=True,
                          character_coverage=0.9995, sample_sentences=200_000, answer_token="<ans>",
                          extra_symbols=[], seed=1)
    dtype = token_dtype(tok.vocab_size)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    t_single, cpu_single, ref = best_time(lambda: single_process(tok, docs, dtype), repeats)
    t_parallel, cpu_parallel, out = best_time(lambda: parallel(tok, docs, dtype, workers), repeats)
    assert np.array_equal(ref, out), "the parallel path must produce exactly the single-process tokens"
    ratio = t_single / t_parallel
    print(f"{name:<8} {megabytes:5.1f} MB {len(ref) / 1e6:5.2f} M tokens | single-process sentencepiece "
          f"{megabytes / t_single:5.2f} MB/s | lm2 parallel, {workers} workers {megabytes / t_parallel:5.2f} MB/s "
          f"| speed-up x{ratio:.2f}")
    # CPU accounting explains the wall-clock ratio: the overhead of the parallel path, and how many cores each
    # path actually got (on a shared machine the parallel path may get no more than one).
    print(f"{'':<8} CPU-seconds {cpu_single:.2f} vs {cpu_parallel:.2f} (parallel overhead "
          f"{cpu_parallel / cpu_single - 1:+.0%}); cores obtained {cpu_single / t_single:.2f} vs "
          f"{cpu_parallel / t_parallel:.2f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="megabytes of text per corpus")
    ap.add_argument("--workers", type=int, default=0, help="worker processes; 0 = one per CPU core")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary (recipes/small.toml uses 2048)")
    args = ap.parse_args()
    workers = args.workers or os.cpu_count() or 1
    print(f"lm2 tokenize encoding benchmark: {os.cpu_count()} CPU cores, {workers} workers, best of "
          f"{args.repeats}, BPE vocabulary {args.vocab}, load average {os.getloadavg()[0]:.1f}")
    bench("builtin", builtin_documents(args.mb), workers, args.repeats, args.vocab)
    books = next((p / "shared" / "books" for p in REPO.parents if (p / "shared" / "books").is_dir()), None)
    if books is not None:
        bench("books", book_documents(books, args.mb), workers, args.repeats, args.vocab)
    else:
        print("books    skipped (../shared/books not found)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes compete for the same cores)")


if __name__ == "__main__":
    main()
