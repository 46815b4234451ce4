"""`lm2 tokenize RECIPE`: train (or reuse) the tokenizer and write train/val token shards to data.dir.

Steps, each visible on the terminal:

1. fingerprint the recipe's [data] + [tokenizer] sections and the sources; unchanged -> "up to date", exit;
2. train SentencePiece on the first `tokenizer.sample_sentences` lines of the corpus (or load tokenizer.path);
3. encode every document as BOS tokens EOS in `data.workers` processes, in order, with a progress bar;
4. commit: tokenizer.model, {train,val}.{bin,idx}, recipe.toml, and meta.json last. meta.json is removed
   before a rebuild starts, so a directory with a meta.json is always complete.

Documents go to the validation split by a seeded hash of their position in the corpus (never by worker or
chunk), so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lm2cli.errors import Lm2Error

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _echo(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------- worker side

_worker_tokenizer = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer
    from lm2cli.data.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.from_bytes(model_bytes)


def encode_documents(tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """All `texts` framed as BOS tokens EOS and concatenated, their lengths, and their character count."""
    encoded = tokenizer.encode_numpy(texts)
    lengths = np.fromiter((len(e) + 2 for e in encoded), dtype=np.int64, count=len(encoded))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for ids in encoded:
        out[pos] = tokenizer.bos_id
        out[pos + 1:pos + 1 + len(ids)] = ids
        out[pos + 1 + len(ids)] = tokenizer.eos_id
        pos += len(ids) + 2
    return out, lengths, sum(len(t) for t in texts)


def _encode_item(args: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    from lm2cli.data.corpus import materialize

    item, dtype = args
    return encode_documents(_worker_tokenizer, materialize(item), dtype)


def _materialize_item(item: tuple) -> list[str]:
    from lm2cli.data.corpus import materialize

    return materialize(item)


# ---------------------------------------------------------------------------------------- main side


def resolve_workers(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


def start_method() -> str:
    """How worker processes start. Workers only rely on what `initializer` passes them (spawn-safe), so any
    method works; fork is preferred where it exists because it skips re-importing Python, numpy and
    sentencepiece in every worker (about 0.3 CPU-seconds each), but only while this process runs a single
    thread: forking a multi-threaded process can deadlock the child. LM2_MP_START overrides the choice."""
    import multiprocessing as mp
    import threading

    forced = os.environ.get("LM2_MP_START")
    if forced:
        if forced not in mp.get_all_start_methods():
            raise Lm2Error(f"LM2_MP_START = '{forced}': expected one of {', '.join(mp.get_all_start_methods())}")
        return forced
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return "fork"
    return "spawn"


class WorkerPool:
    """An ordered `map` over `workers` processes that keeps only a few items in flight (Pool.imap would read
    the whole input ahead and hold it in memory). With workers <= 1 everything runs in this process.

    Start it before creating threads (e.g. a tqdm bar, whose monitor is a thread) so fork stays usable.
    """

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers, self.initializer, self.initargs = workers, initializer, initargs
        self.pool = None

    def __enter__(self) -> WorkerPool:
        if self.workers <= 1:
            if self.initializer is not None:
                self.initializer(*self.initargs)
        else:
            import multiprocessing as mp

            ctx = mp.get_context(start_method())
            self.pool = ctx.Pool(self.workers, initializer=self.initializer, initargs=self.initargs)
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()  # results are all collected on success; on error nothing is worth waiting for
            self.pool.join()

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        if self.pool is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def ordered_map(fn: Callable, items: Iterable, workers: int, initializer=None, initargs=()) -> Iterator:
    """`map(fn, items)` in `workers` processes, in order (see WorkerPool)."""
    with WorkerPool(workers, initializer, initargs) as pool:
        yield from pool.map(fn, items)


def validation_mask(seed: int, start: int, count: int, fraction: float) -> np.ndarray:
    """True for the documents start..start+count-1 that belong to the validation split (splitmix64 hash)."""
    with np.errstate(over="ignore"):
        x = (np.arange(start, start + count, dtype=np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) & _MASK64
        x = x * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _training_lines(corpus, workers: int, limit: int) -> Iterator[str]:
    from lm2cli.data.corpus import work_items
    from lm2cli.data.tokenizer import training_sentences

    n = 0
    for texts in ordered_map(_materialize_item, work_items(corpus), workers):
        for line in training_sentences(texts):
            yield line
            n += 1
            if n >= limit:
                return


def build_tokenizer(recipe, corpus, workers: int):
    from lm2cli.data.tokenizer import Tokenizer, train_tokenizer

    t = recipe.tokenizer
    if t.path:
        tok = Tokenizer.load(t.path, answer_token=t.answer_token)
        if tok.piece_to_id(t.answer_token) in (tok.unk_id, None):
            raise Lm2Error(f"tokenizer.path = '{t.path}' has no '{t.answer_token}' piece; set "
                           f"tokenizer.answer_token to a piece of that vocabulary, or leave tokenizer.path "
                           f"empty to train one")
        _echo(f"tokenizer: reusing {t.path} (vocabulary {tok.vocab_size})")
        return tok
    _echo(f"tokenizer: training SentencePiece {t.type}, vocabulary {t.vocab_size}, on up to "
          f"{t.sample_sentences:,} lines")
    started = time.time()
    tok = train_tokenizer(_training_lines(corpus, workers, t.sample_sentences), model_type=t.type,
                          vocab_size=t.vocab_size, byte_fallback=t.byte_fallback,
                          character_coverage=t.character_coverage, sample_sentences=t.sample_sentences,
                          answer_token=t.answer_token, extra_symbols=list(t.extra_symbols),
                          seed=recipe.data.seed)
    _echo(f"tokenizer: trained in {time.time() - started:.1f}s")
    return tok


def _progress(total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="encoding", disable=None, dynamic_ncols=True, smoothing=0.1)


def write_shards(recipe, corpus, tokenizer, out_dir: Path, workers: int) -> tuple[dict, dict[str, Any]]:
    """Encode the corpus into train/val ShardWriters, not yet committed. Returns (writers, stats)."""
    from lm2cli.data.corpus import BuiltinCorpus, work_items
    from lm2cli.data.shards import ShardWriter, token_dtype

    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out_dir, split, dtype) for split in ("train", "val")}
    n_docs = n_chars = 0
    held_back: np.ndarray | None = None  # the latest train document, in case val would end up empty
    total = corpus.n_documents if isinstance(corpus, BuiltinCorpus) else None
    items = ((item, dtype) for item in work_items(corpus))
    try:
        with WorkerPool(workers, _init_worker, (tokenizer.to_bytes(),)) as pool, _progress(total) as bar:
            for tokens, lengths, chars in pool.map(_encode_item, items):
                is_val = validation_mask(recipe.data.seed, n_docs, len(lengths), recipe.data.val_fraction)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for k in range(len(lengths)):
                    doc = tokens[offsets[k]:offsets[k + 1]]
                    if is_val[k]:
                        writers["val"].add(doc)
                    else:
                        if held_back is not None:
                            writers["train"].add(held_back)
                        held_back = doc
                n_docs += len(lengths)
                n_chars += chars
                bar.update(len(lengths))
        if n_docs < 2:
            raise Lm2Error(f"the corpus has {n_docs} document(s); lm2 needs at least 2 (one for validation)"
                           + (": with data.text_unit = \"file\" each .txt file is one document"
                              if recipe.data.source == "files" else ""))
        if held_back is not None:
            # A small corpus can hash no document into val: then the last document is held out instead.
            writers["val" if writers["val"].n_documents == 0 else "train"].add(held_back)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    stats = {"documents": n_docs, "characters": n_chars,
             "chars_per_token": round(n_chars / max(1, sum(w.n_tokens - 2 * w.n_documents
                                                           for w in writers.values())), 3)}
    return writers, stats


def up_to_date(out_dir: Path, fingerprint: str) -> bool:
    from lm2cli.data.shards import TokenShards

    if not (out_dir / "meta.json").is_file():
        return False
    try:
        shards = TokenShards(out_dir)
        if shards.meta.get("fingerprint") != fingerprint:
            return False
        for split in ("train", "val"):  # complete and intact, not merely described
            shards.split(split)
            shards.doc_offsets(split)
        shards.tokenizer()
    except Lm2Error:
        return False
    return True


def tokenize_command(recipe, force: bool = False) -> Path:
    """Build (or confirm) the shards for `recipe` in recipe.data.dir; returns that directory."""
    from lm2cli.data.corpus import corpus_for
    from lm2cli.data.fingerprint import describe_changes, fingerprint_inputs, fingerprint_of
    from lm2cli.data.shards import TokenShards, build_meta
    from lm2cli.fileio import atomic_write_json, atomic_write_text, remove_stale_temp_files
    from lm2cli.outdir import DATA, check_output_dir

    out_dir = check_output_dir(recipe.data.dir, "data.dir", DATA)
    leftovers = remove_stale_temp_files(out_dir)
    if leftovers:
        _echo(f"{out_dir}: removed {len(leftovers)} temporary file(s) an interrupted run left: {', '.join(leftovers)}")
    inputs = fingerprint_inputs(recipe)
    fingerprint = fingerprint_of(inputs)
    if not force and up_to_date(out_dir, fingerprint):
        _echo(f"{out_dir}: up to date (fingerprint {fingerprint[:12]}); nothing to do (--force rebuilds)")
        return out_dir
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        try:
            old = TokenShards(out_dir).meta.get("fingerprint_inputs", {})
            reason = "--force" if force else f"{describe_changes(old, inputs)} changed"
        except Lm2Error:
            reason = "the previous build is unreadable"
        _echo(f"{out_dir}: rebuilding ({reason})")
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    workers = resolve_workers(recipe.data.workers)
    corpus = corpus_for(recipe)
    skipped_bytes = corpus.check_encoding()
    for path, count in skipped_bytes.items():
        _echo(f"warning: {path}: skipped {count} undecodable byte(s) (data.on_decode_error = \"skip\")")
    tokenizer = build_tokenizer(recipe, corpus, workers)
    writers, stats = write_shards(recipe, corpus, tokenizer, out_dir, workers)
    stats["skipped_bytes"] = skipped_bytes
    stats["seconds"] = round(time.time() - started, 2)
    stats["workers"] = workers

    # Commit. The old meta.json goes first, so until the new one lands the directory never looks complete; the
    # resolved recipe next, so that at every moment of the commit the directory is recognisably lm2's.
    meta_path.unlink(missing_ok=True)
    atomic_write_text(out_dir / "recipe.toml", recipe.to_toml())
    for w in writers.values():
        w.commit()
    tokenizer.save(out_dir / "tokenizer.model")
    meta = build_meta(tokenizer, writers, inputs, corpus.describe(), stats)
    atomic_write_json(meta_path, meta)
    tr, va = writers["train"], writers["val"]
    _echo(f"{out_dir}: train {tr.n_tokens:,} tokens ({tr.n_documents:,} docs), val {va.n_tokens:,} tokens "
          f"({va.n_documents:,} docs); vocabulary {tokenizer.vocab_size} ({meta['dtype']}), "
          f"{stats['chars_per_token']} chars/token, {stats['seconds']}s with {workers} worker(s)")
    return out_dir
