"""The pretraining corpus: a stream of documents from the built-in generator, local files or the hub.

The corpus is cut into *work items* that a worker process turns into documents (`materialize`). For the
built-in corpus an item is just a range of document numbers, so workers generate their own text and nothing
large crosses process boundaries; for files and hub datasets the main process reads the records and an item
carries about a megabyte of text. Items come out in a fixed order, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm2cli.errors import Lm2Error

BUILTIN_ITEM_DOCS = 200  # documents per built-in work item
# Bump when the same recipe would give other built-in documents (2: stories on one line, optional repeats).
BUILTIN_LAYOUT_VERSION = 2
TEXT_ITEM_CHARS = 1 << 20  # characters per work item of file or hub text


@dataclass(frozen=True)
class BuiltinCorpus:
    """bAbI-world stories (train side of the generator), two stories then one filler document, repeating.

    With `repeat` > 0 that share of documents (chosen by a seeded hash of the document number) is followed by
    a newline and a verbatim copy of itself: the copy is predictable only by finding the same text earlier and
    reading what came next, which grows the induction (copy) heads that answering "Where is Mary?" needs.
    """

    tasks: tuple[str, ...]
    stories: int
    filler: bool
    seed: int
    repeat: float = 0.0

    @property
    def n_filler(self) -> int:
        return self.stories // 2 if self.filler else 0

    @property
    def n_documents(self) -> int:
        return self.stories + self.n_filler

    def check_encoding(self) -> dict[str, int]:
        return {}  # generated text is always valid

    def document(self, index: int) -> str:
        text = self._original(index)
        return f"{text}\n{text}" if self.repeated(index) else text

    def repeated(self, index: int) -> bool:
        if self.repeat <= 0:
            return False
        digest = hashlib.sha256(f"lm2-corpus-repeat/{self.seed}/{index}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.repeat * 2**64

    def _original(self, index: int) -> str:
        from lm2cli.data.babi import render_plain
        from lm2cli.data.filler import filler_document
        from lm2cli.data.stories import generate_story

        if self.filler and index < 3 * self.n_filler:
            group, pos = divmod(index, 3)
            if pos == 2:
                return filler_document("train", self.seed, group)
            story = 2 * group + pos
        else:
            story = index - self.n_filler
        task = self.tasks[story % len(self.tasks)]
        return render_plain(generate_story(task, "train", self.seed, story // len(self.tasks)))

    def describe(self) -> dict[str, Any]:
        from lm2cli.data.filler import FILLER_VERSION

        return {"kind": "builtin", "generator": "lm2 bAbI-world qa1-qa10 (train side)", "tasks": list(self.tasks),
                "stories": self.stories, "filler_documents": self.n_filler, "filler_version": FILLER_VERSION,
                "seed": self.seed, "layout": "story, story, filler, repeating; a story is one line",
                "repeat": self.repeat, "layout_version": BUILTIN_LAYOUT_VERSION}


def corpus_for(recipe) -> BuiltinCorpus | FileCorpus | HubCorpus:
    d = recipe.data
    if d.source == "builtin":
        return BuiltinCorpus(tuple(d.builtin_tasks), d.builtin_stories, d.builtin_filler, d.seed, d.builtin_repeat)
    if d.source == "files":
        from lm2cli.data.files import resolve_files

        return FileCorpus(tuple(resolve_files(d.files)), d.text_field, d.text_unit, d.on_decode_error)
    if not d.hub_name:
        raise Lm2Error('data.source = "hub" needs data.hub_name, e.g. "HuggingFaceFW/fineweb-edu"')
    return HubCorpus(d.hub_name, d.hub_config, d.hub_split, d.hub_revision, d.hub_streaming, d.hub_max_docs,
                     d.text_field)


def work_items(corpus) -> Iterator[tuple]:
    """("docs", corpus, start, stop) for the built-in corpus; ("texts", [str, ...]) otherwise."""
    if isinstance(corpus, BuiltinCorpus):
        for start in range(0, corpus.n_documents, BUILTIN_ITEM_DOCS):
            yield ("docs", corpus, start, min(start + BUILTIN_ITEM_DOCS, corpus.n_documents))
        return
    batch: list[str] = []
    size = 0
    for text in corpus.documents():
        batch.append(text)
        size += len(text)
        if size >= TEXT_ITEM_CHARS:
            yield ("texts", batch)
            batch, size = [], 0
    if batch:
        yield ("texts", batch)


def materialize(item: tuple) -> list[str]:
    if item[0] == "docs":
        _, corpus, start, stop = item
        return [corpus.document(i) for i in range(start, stop)]
    return item[1]


# ------------------------------------------------------------------------------------------- local files


def _quiet_datasets():
    """Import `datasets` with its progress bars and the hub client's retry chatter off: lm2 reports one line."""
    import logging

    import datasets

    # Above CRITICAL: datasets logs read failures at ERROR level ("Failed to load JSON from file ..."), which would
    # print ahead of our own one-line message about the same failure.
    datasets.utils.logging.set_verbosity(logging.CRITICAL + 1)
    datasets.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity(logging.CRITICAL + 1)
    except ImportError:  # pragma: no cover - datasets always brings huggingface_hub
        pass
    return datasets


def load_dataset(*args, **kwargs):
    """`datasets.load_dataset` that never runs a dataset's own Python loading script: datasets 2.x ran
    hub scripts by default, so a hub name or a directory holding a script would choose what code runs."""
    return _quiet_datasets().load_dataset(*args, trust_remote_code=False, **kwargs)


@dataclass(frozen=True)
class FileCorpus:
    files: tuple[Path, ...]
    text_field: str
    text_unit: str
    on_decode_error: str

    def check_encoding(self) -> dict[str, int]:
        """Undecodable bytes per text file: fails on the first one, or counts them with `skip`."""
        from lm2cli.data.files import count_bad_utf8, first_bad_offset

        skipped = {}
        for path in self.files:
            if path.suffix.lower() == ".parquet":
                continue  # Arrow validates UTF-8 when the file is written
            offset = first_bad_offset(path)
            if offset is None:
                continue
            if self.on_decode_error == "fail" or path.suffix.lower() != ".txt":
                hint = ('set data.on_decode_error = "skip" to drop such bytes'
                        if path.suffix.lower() == ".txt" else "skipping applies to .txt files only; fix the file")
                raise Lm2Error(f"{path}: byte {offset} is not valid UTF-8; {hint}")
            skipped[str(path)] = count_bad_utf8(path)
        return skipped

    def documents(self) -> Iterator[str]:
        for path in self.files:
            suffix = path.suffix.lower()
            if suffix == ".txt":
                yield from self._text_documents(path)
            else:
                yield from self._record_documents(path, "parquet" if suffix == ".parquet" else "json")

    def _text_documents(self, path: Path) -> Iterator[str]:
        errors = "ignore" if self.on_decode_error == "skip" else "strict"
        sample_by = {"file": "document", "paragraph": "paragraph", "line": "line"}[self.text_unit]
        ds = load_dataset("text", data_files=[str(path)], split="train", streaming=True,
                                   sample_by=sample_by, encoding_errors=errors)
        for row in ds:
            text = row["text"].strip("\n")
            if text.strip():
                yield text

    def _record_documents(self, path: Path, builder: str) -> Iterator[str]:
        try:
            ds = load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
            for n, row in enumerate(ds):
                yield from _text_of(row, self.text_field, f"{path} record {n + 1}")
        except Lm2Error:
            raise
        except Exception as e:  # the builders raise many types (ArrowInvalid, JSONDecodeError, ...)
            raise Lm2Error(f"{path}: cannot read it as {builder} ({_first_line(e)})") from None

    def describe(self) -> dict[str, Any]:
        return {"kind": "files", "files": [str(p) for p in self.files], "text_field": self.text_field,
                "text_unit": self.text_unit}


def _text_of(row: dict, field: str, where: str) -> Iterator[str]:
    if field not in row:
        raise Lm2Error(f"{where}: no field '{field}' (fields: {', '.join(map(str, row))}); set data.text_field")
    value = row[field]
    if value is None:
        return
    if not isinstance(value, str):
        raise Lm2Error(f"{where}: field '{field}' holds {type(value).__name__}, not text; set data.text_field")
    if value.strip():
        yield value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------- hub datasets


@dataclass(frozen=True)
class HubCorpus:
    name: str
    config: str
    split: str
    revision: str
    streaming: bool
    max_docs: int
    text_field: str

    def check_encoding(self) -> dict[str, int]:
        return {}

    def documents(self) -> Iterator[str]:
        ds = load_hub_dataset(self.name, self.config or None, split=self.split, streaming=self.streaming,
                              revision=self.revision or None, key="data.hub_name")
        n = 0
        rows = iter(ds)
        for i in itertools.count():
            try:  # streaming reads the network here, so failures surface here too
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:
                if is_network_error(e):
                    raise Lm2Error(f"data.hub_name = '{self.name}': lost the Hugging Face hub while reading "
                                   f"row {i + 1} ({_first_line(e)})") from None
                raise
            for text in _text_of(row, self.text_field, f"{self.name} row {i + 1}"):
                yield text
                n += 1
            if self.max_docs and n >= self.max_docs:
                return

    def describe(self) -> dict[str, Any]:
        return {"kind": "hub", "name": self.name, "config": self.config, "split": self.split,
                "revision": self.revision or "latest", "streaming": self.streaming, "max_docs": self.max_docs,
                "text_field": self.text_field}


_NETWORK_HINTS = ("connection", "offline", "resolve", "timed out", "timeout", "network", "couldn't reach",
                  "max retries", "name or service", "temporary failure", "unreachable", "ssl")


def is_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, (ConnectionError, TimeoutError)) or any(h in text for h in _NETWORK_HINTS)


def load_hub_dataset(name: str, *args, key: str, alternative: str = "", **kwargs):
    """`datasets.load_dataset(name, ...)` with its failures turned into one line naming `key`."""
    try:
        return load_dataset(name, *args, **kwargs)
    except Exception as e:
        reason = _first_line(e)
        if is_network_error(e):
            also = f"; {alternative}" if alternative else ""
            raise Lm2Error(f"{key} = '{name}': the Hugging Face hub cannot be reached (offline or no network: "
                           f"{reason}){also}") from None
        raise Lm2Error(f"{key} = '{name}': cannot load it from the Hugging Face hub ({reason})") from None
