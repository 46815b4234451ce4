"""BABILong haystack: sentence splitting and the sentence sampler over haystack text (babilong.md §3.4).

Sources: the built-in filler prose (a stream per side, so train and test haystacks differ), local .txt files
(e.g. a PG19 copy or ../shared/books), or a Hugging Face dataset. The sampler draws a random chunk, splits it
into sentences, drops the first and last (they may be cut), and hands out sentences in their original order,
carrying leftovers over to the next sample.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm2cli.errors import Lm2Error

MIN_SENTENCE_TOKENS = 10
CHARS_PER_BUDGET_TOKEN = 10  # a chunk of budget * 10 characters, as upstream
MIN_CHUNK_CHARS = 4000

# A sentence ends at . ! or ? (optionally followed by closing quotes or brackets) and whitespace...
_BOUNDARY = re.compile(r"[.!?][\"'\u2019\u201d)\]]*\s+")
# ...unless the word before the period is one of these abbreviations or a single initial.
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "rev", "col", "gen", "capt", "lt", "sgt",
                 "mt", "vs", "etc", "vol", "ch", "fig", "e.g", "i.e", "cf", "esq", "messrs", "mme", "mlle"}


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter with an abbreviation guard; internal whitespace collapsed to single spaces."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.start() + 1
        if text[m.end():m.end() + 1].islower():  # '"Is it?" asked Ann.' continues the sentence
            continue
        if text[end - 1] == ".":
            word = re.search(r"([\w.]+)\.$", text[start:end])
            if word and (word.group(1).lower() in ABBREVIATIONS or len(word.group(1)) == 1):
                continue
        piece = " ".join(text[start:m.end()].split())
        if piece:
            sentences.append(piece)
        start = m.end()
    tail = " ".join(text[start:].split())
    if tail:
        sentences.append(tail)
    return sentences


# ------------------------------------------------------------------------------------------- sources


@dataclass
class BuiltinHaystack:
    """Filler prose of one side (train or test) of the generator: an endless, seeded text."""

    side: str
    seed: int

    def chunk(self, rng: random.Random, n_chars: int) -> str:
        from lm2cli.data.filler import filler_document

        index = rng.randrange(1 << 30)
        parts, size = [], 0
        while size < n_chars:
            doc = filler_document(self.side, self.seed, index)
            parts.append(doc)
            size += len(doc) + 2
            index += 1
        return "\n\n".join(parts)

    def describe(self) -> dict[str, Any]:
        from lm2cli.data.filler import FILLER_VERSION

        return {"kind": "synthetic", "name": f"lm2 filler v{FILLER_VERSION} ({self.side} side)", "files": [],
                "seed": self.seed}


def text_file_problem(path: Path, probe: int = 1 << 16) -> str | None:
    """Why the start of `path` is not UTF-8 text (a NUL byte, an undecodable byte), or None. Chunks are cut at
    random offsets and decoded leniently, so a binary file would otherwise become garbage haystack silently."""
    import codecs

    with open(path, "rb") as f:
        head = f.read(probe)
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at offset {nul}"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < probe)
    except UnicodeDecodeError as e:
        return f"byte {e.start} is not UTF-8"
    return None


@dataclass
class FileHaystack:
    """Plain-text books: a random book, then a random offset in it."""

    files: list[Path]
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.sizes = [p.stat().st_size for p in self.files]
        for path in self.files:
            problem = text_file_problem(path)
            if problem:
                raise Lm2Error(f"babilong.haystack: {path} is not plain text ({problem}); haystack books must be "
                               f"UTF-8 text files")

    def chunk(self, rng: random.Random, n_chars: int) -> str:
        k = rng.randrange(len(self.files))
        n_bytes = int(n_chars * 1.1) + 16
        start = rng.randrange(max(1, self.sizes[k] - n_bytes))
        with open(self.files[k], "rb") as f:
            f.seek(start)
            data = f.read(n_bytes)
        return data.decode("utf-8", errors="ignore")  # cut characters sit in the dropped edge sentences

    def describe(self) -> dict[str, Any]:
        from lm2cli.data.fingerprint import files_signature

        signatures = files_signature(self.files)
        return {"kind": "books", "name": ", ".join(p.name for p in self.files[:5])
                + (f" and {len(self.files) - 5} more" if len(self.files) > 5 else ""),
                "files": [str(p) for p in self.files],
                "sha256": {s["path"]: s.get("sha256", f"size {s['size']}") for s in signatures}}


@dataclass
class HubHaystack:
    """Documents of a Hugging Face dataset (e.g. deepmind/pg19), streamed in a seeded shuffled order."""

    name: str
    split: str
    text_field: str
    seed: int
    _stream: Any = None

    def chunk(self, rng: random.Random, n_chars: int) -> str:
        from lm2cli.data.corpus import _text_of

        if self._stream is None:
            from lm2cli.data.corpus import load_hub_dataset

            ds = load_hub_dataset(self.name, split=self.split, streaming=True, key="babilong.haystack",
                                  alternative='use babilong.haystack = "builtin" or local .txt files')
            self._stream = iter(ds.shuffle(seed=self.seed, buffer_size=64))
        for _ in range(1000):
            try:
                row = next(self._stream)
            except StopIteration:
                raise Lm2Error(f"babilong.haystack = '{self.name}': ran out of documents") from None
            for text in _text_of(row, self.text_field, f"{self.name} ({self.split})"):
                if len(text) > MIN_CHUNK_CHARS:
                    start = rng.randrange(max(1, len(text) - n_chars))
                    return text[start:start + n_chars]
        raise Lm2Error(f"babilong.haystack = '{self.name}': its documents are too short to serve as haystack")

    def describe(self) -> dict[str, Any]:
        return {"kind": "hub", "name": self.name, "split": self.split, "files": []}


def haystack_for(spec: str, side: str, seed: int, text_field: str = "text"):
    """"builtin", a .txt file / directory / glob, or a hub dataset name ("owner/name")."""
    from lm2cli.data.files import resolve_files

    if spec == "builtin":
        return BuiltinHaystack(side, seed)
    looks_local = any(c in spec for c in "*?[") or Path(spec).exists() or spec.endswith(".txt")
    if looks_local:
        return FileHaystack(resolve_files([spec], key="babilong.haystack", suffixes=(".txt",)))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return HubHaystack(spec, "train" if side == "train" else "test", text_field, seed)
    raise Lm2Error(f"babilong.haystack = '{spec}' not found: expected \"builtin\", .txt files (a file, directory "
                   f"or glob) or a hub dataset name such as deepmind/pg19")


# ------------------------------------------------------------------------------------------- sampler


# Every person of bAbI v1.2 (tasks 1-20, counted in the real files): a novel's own Mary or John is a
# distractor that no bAbI story has, and `babilong.haystack_skip_names` keeps such sentences out.
BABI_PEOPLE = ("Mary", "John", "Daniel", "Sandra", "Bill", "Fred", "Jeff", "Julie", "Lily", "Julius", "Greg",
               "Brian", "Bernhard", "Emily", "Gertrude", "Jessica", "Winona", "Jason", "Antoine", "Yann", "Sumit")
_PEOPLE = re.compile(r"\b(?:" + "|".join(BABI_PEOPLE) + r")\b")


def names_a_babi_person(sentence: str) -> bool:
    return _PEOPLE.search(sentence) is not None


class SentenceSampler:
    """Hands out haystack sentences (as token lists) in text order, `sample(budget)` at a time; with
    `skip_names`, never one that names a bAbI person (counted in `skipped_for_names`)."""

    def __init__(self, source, tokenizer, rng: random.Random, max_sentence_tokens: int = 0,
                 skip_names: bool = False):
        self.source, self.tok, self.rng = source, tokenizer, rng
        self.max_sentence_tokens = max_sentence_tokens
        self.skip_names = skip_names
        self.skipped_for_names = 0
        self.queue: deque[list[int]] = deque()

    def _refill(self, budget: int) -> None:
        for _ in range(50):
            text = self.source.chunk(self.rng, max(MIN_CHUNK_CHARS, budget * CHARS_PER_BUDGET_TOKEN))
            sentences = split_sentences(text)[1:-1]  # the edges may be partial sentences
            if self.skip_names:
                kept = [x for x in sentences if not names_a_babi_person(x)]
                self.skipped_for_names += len(sentences) - len(kept)
                sentences = kept
            if not sentences:
                continue
            for ids in self.tok.encode_batch(sentences):
                if len(ids) < MIN_SENTENCE_TOKENS:
                    continue
                if self.max_sentence_tokens and len(ids) > self.max_sentence_tokens:
                    continue
                self.queue.append(ids)
            if self.queue:
                return
        raise Lm2Error("the haystack yields no usable sentences (each needs at least "
                       f"{MIN_SENTENCE_TOKENS} tokens); use longer text")

    def sample(self, budget: int) -> list[list[int]]:
        """Sentences totalling exactly `budget` tokens; the last one is truncated to fit."""
        out: list[list[int]] = []
        total = 0
        while total < budget:
            if not self.queue:
                self._refill(budget - total)
            ids = self.queue.popleft()
            if total + len(ids) > budget:
                ids = ids[:budget - total]
            out.append(ids)
            total += len(ids)
        return out
