"""BABILong-style sets: bAbI facts hidden in haystack text, in the Hugging Face hub layout (babilong.md §3-4).

    lm2 babilong RECIPE                   -> <babilong.dir>/qaN/<length>.json + meta.json
    lm2 babilong RECIPE --babi-text DIR   -> generated stories as bAbI v1.2 text files
    load_babilong(source, length, task)   -> rows [{input, question, target}] from a directory or the hub

A sample is one bAbI question: its facts (every statement before it, in order), the question and the answer.
For a length L (in tokens of *our* tokenizer) the context budget is L - babilong.margin; the facts count
against it, haystack sentences fill the rest exactly (the last one truncated), and the facts go into gaps
drawn with replacement and sorted, so their order is kept and several may share a gap. 0k is the facts alone,
joined by single spaces.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

from lm2cli.errors import Lm2Error

FACTS_PER_BUDGET_TOKEN = 8  # upstream filter: at most budget // 8 rows (facts + question) per sample
TRAIN_REFERENCE_QUESTIONS = 10_000  # --babi-text sizes, like bAbI en-10k
TEST_REFERENCE_QUESTIONS = 1_000
POOL_QUESTIONS = 1_000  # questions generated per block of synthetic candidates
HUB_ALIASES = {"booydar/babilong": "RMT-team/babilong", "booydar/babilong-1k-samples": "RMT-team/babilong-1k-samples"}
ROW_KEYS = ("input", "question", "target")


def length_tokens(name: str) -> int:
    """"4k" -> 4000 ("k" is 1,000, as upstream); "1M" -> 1,000,000."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", name)
    if not m:
        raise Lm2Error(f"babilong length '{name}': expected e.g. 0k, 4k, 128k")
    scale = {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
    return int(m.group(1)) * scale


# ------------------------------------------------------------------------------------------- injection


def inject_facts(fact_ids: list[list[int]], sentences: list[list[int]], rng: random.Random,
                 window: tuple[float, float] = (0.0, 1.0)) -> tuple[list[int], list[int]]:
    """Place each fact before haystack sentence i (i = n: at the end), i drawn with replacement from the
    window and sorted, so the facts keep their order. Returns (tokens, gap position of each fact)."""
    positions = draw_gaps(len(fact_ids), len(sentences), rng, window)
    return assemble(fact_ids, sentences, positions)[0], positions


def draw_gaps(n_facts: int, n_sentences: int, rng: random.Random, window: tuple[float, float]) -> list[int]:
    lo, hi = math.ceil(window[0] * n_sentences), math.floor(window[1] * n_sentences)
    if lo > hi:
        raise Lm2Error(f"babilong.fact_window = [{window[0]}, {window[1]}] leaves no place for the facts among "
                       f"{n_sentences} haystack sentences; widen the window")
    return sorted(rng.randint(lo, hi) for _ in range(n_facts))


def assemble(fact_ids: list[list[int]], sentences: list[list[int]],
             positions: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokens with fact k before haystack sentence positions[k], and each fact's token range [start, end)."""
    tokens: list[int] = []
    ranges: list[tuple[int, int]] = []
    k = 0
    for i in range(len(sentences) + 1):
        while k < len(positions) and positions[k] == i:
            ranges.append((len(tokens), len(tokens) + len(fact_ids[k])))
            tokens.extend(fact_ids[k])
            k += 1
        if i < len(sentences):
            tokens.extend(sentences[i])
    return tokens, ranges


def fact_char_spans(tokens: list[int], ranges: list[tuple[int, int]], tokenizer) -> tuple[str, list[list[int]]]:
    """The row text (decoded tokens, stripped) and each fact's [start, end) character span in it. A fact's first
    piece carries the word-boundary space; the span starts after it, so text[start:end] is the fact itself."""
    decoded, offsets = tokenizer.decode_with_offsets(tokens)
    text = decoded.strip()
    shift = len(decoded) - len(decoded.lstrip())
    spans = []
    for start, end in ranges:
        first = offsets[start][0]
        while first < offsets[end - 1][1] and decoded[first].isspace():
            first += 1
        spans.append([first - shift, offsets[end - 1][1] - shift])
    return text, spans


def build_row(sample, length: int, margin: int, tokenizer, sampler, rng: random.Random,
              window: tuple[float, float] = (0.0, 1.0)) -> tuple[dict | None, str | None]:
    """One BABILong row for `sample` at `length` tokens, or (None, reason) when the sample is filtered out."""
    if length == 0:
        text = " ".join(sample.facts)
        starts = [sum(len(f) + 1 for f in sample.facts[:k]) for k in range(len(sample.facts))]
        spans = [[s, s + len(f)] for s, f in zip(starts, sample.facts, strict=True)]
        return _row(sample, text, tokenizer, [0] * len(sample.facts), 0, spans), None
    budget = length - margin
    if len(sample.facts) + 1 > budget // FACTS_PER_BUDGET_TOKEN:
        return None, "fact_filter"
    fact_ids = tokenizer.encode_batch(sample.facts)
    fact_tokens = sum(len(f) for f in fact_ids)
    if fact_tokens > budget:
        return None, "facts_over_budget"
    sentences = sampler.sample(budget - fact_tokens) if budget > fact_tokens else []
    positions = draw_gaps(len(fact_ids), len(sentences), rng, window)
    tokens, ranges = assemble(fact_ids, sentences, positions)
    assert len(tokens) == budget, (len(tokens), budget)  # the budget is hit exactly, by construction
    text, spans = fact_char_spans(tokens, ranges, tokenizer)
    return _row(sample, text, tokenizer, positions, len(sentences), spans), None


def _row(sample, text: str, tokenizer, positions: list[int], n_sentences: int, spans: list[list[int]]) -> dict:
    # fact_spans / support: where each fact sits in `input` and which facts the answer rests on (indices into
    # fact_spans), for `lm2 inspect-memory`; the loader drops them, like every key beyond input/question/target.
    return {"input": text, "question": sample.question, "target": sample.answer,
            "references": sample.references, "fact_positions": positions, "n_sentences": n_sentences,
            "fact_spans": spans, "support": list(sample.support_positions),
            "n_tokens": len(tokenizer.encode(text))}


# ------------------------------------------------------------------------------------------- sources


def babilong_tokenizer(recipe):
    """tokenizer.path if set, else the tokenizer `lm2 tokenize` wrote to data.dir."""
    from lm2cli.data.tokenizer import Tokenizer

    if recipe.tokenizer.path:
        return Tokenizer.load(recipe.tokenizer.path), recipe.tokenizer.path
    path = Path(recipe.data.dir) / "tokenizer.model"
    if not path.is_file():
        raise Lm2Error(f"no tokenizer to measure lengths with: {path} does not exist; run `lm2 tokenize RECIPE` "
                       f"first or set tokenizer.path")
    return Tokenizer.load(path), str(path)


def sample_stream(facts: str, task: str, split: str, seed: int) -> Iterator:
    """bAbI samples of one task in a seeded random order: synthetic stories (endless) or a bAbI file."""
    from lm2cli.data.babi import find_babi_file, read_babi_file, samples_of
    from lm2cli.data.stories import generate_stories

    rng = random.Random(f"lm2-babilong/{seed}/{task}/{split}/samples")
    if facts == "synthetic":
        start = 0
        while True:
            stories = list(generate_stories(task, split, seed, n_questions=POOL_QUESTIONS, start=start))
            start += len(stories)
            block = list(samples_of(stories))
            rng.shuffle(block)
            yield from block
    else:
        block = list(samples_of(read_babi_file(find_babi_file(facts, task, split), task)))
        rng.shuffle(block)
        yield from block


class SamplePool:
    """`sample_stream` drawn lazily once and replayed for every length (generating stories is the slow part)."""

    def __init__(self, stream: Iterator):
        self.stream, self.seen = stream, []

    def __iter__(self) -> Iterator:
        i = 0
        while True:
            if i == len(self.seen):
                try:
                    self.seen.append(next(self.stream))
                except StopIteration:
                    return
            yield self.seen[i]
            i += 1


def facts_description(facts: str, tasks: list[str], split: str) -> tuple[str, dict]:
    from lm2cli.data.babi import find_babi_file
    from lm2cli.data.fingerprint import files_signature
    from lm2cli.data.stories import GENERATOR_VERSION

    if facts == "synthetic":
        return "synthetic", {"generator_version": GENERATOR_VERSION}
    if not Path(facts).is_dir():
        raise Lm2Error(f'babilong.facts = \'{facts}\': expected "synthetic" or a bAbI v1.2 directory (e.g. en-10k/)')
    files = [find_babi_file(facts, t, split) for t in tasks]
    return f"babi-v1.2:{Path(facts).resolve()}", {"files": files_signature([f.resolve() for f in files])}


# ------------------------------------------------------------------------------------------- command


def _fingerprint(recipe, tokenizer, haystack_meta: dict, facts_meta: dict) -> str:
    import dataclasses

    section = dataclasses.asdict(recipe.babilong)
    section.pop("dir")
    if not section["haystack_skip_names"]:  # off, a set is what it was before the option: keep its fingerprint
        section.pop("haystack_skip_names")
    blob = json.dumps({"babilong": section, "tokenizer": tokenizer.sha256, "haystack": haystack_meta,
                       "facts": facts_meta, "format": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date(out_dir: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and all((out_dir / f).is_file() for f in meta.get("files", []))


def babilong_command(recipe, force: bool = False) -> Path:
    """Build the BABILong-style set described by recipe.babilong; returns the output directory."""
    from lm2cli import __version__
    from lm2cli.data.haystack import MIN_SENTENCE_TOKENS, SentenceSampler, haystack_for
    from lm2cli.fileio import atomic_write_json, atomic_write_text
    from lm2cli.outdir import BABILONG, check_output_dir

    b = recipe.babilong
    out_dir = check_output_dir(b.dir, "babilong.dir", BABILONG)
    lengths = {name: length_tokens(name) for name in b.lengths}
    for name, n in lengths.items():
        if n and n - b.margin <= 0:
            raise Lm2Error(f"babilong.margin = {b.margin} leaves no context at length {name}; lower the margin "
                           f"(fine-tuning sets use 20)")
    tokenizer, tokenizer_path = babilong_tokenizer(recipe)
    haystack = haystack_for(b.haystack, b.split, b.seed, b.haystack_field)
    facts_source, facts_meta = facts_description(b.facts, b.tasks, b.split)
    haystack_meta = haystack.describe()
    fingerprint = _fingerprint(recipe, tokenizer, haystack_meta, facts_meta)
    if not force and _up_to_date(out_dir, fingerprint):
        print(f"{out_dir}: up to date (fingerprint {fingerprint[:12]}); nothing to do (--force rebuilds)")
        return out_dir
    _remove_previous_build(out_dir)
    # Marks the directory as lm2's (and lists what this build will write) from the first moment, so a killed
    # build is recognised, and cleaned up, by the next one.
    planned = [f"{task}/{name}.json" for task in b.tasks for name in lengths]
    atomic_write_json(out_dir / "meta.json", {"format": "babilong", "lm2_version": __version__, "complete": False,
                                              "files": planned})

    rows_written: dict[str, dict[str, int]] = {}
    dropped: dict[str, dict[str, dict[str, int]]] = {}
    skipped_for_names: dict[str, dict[str, int]] = {}
    chars: dict[str, list[int]] = {name: [] for name in lengths}
    files = []
    window = (b.fact_window[0], b.fact_window[1])
    for task in b.tasks:
        pool = SamplePool(sample_stream(b.facts, task, b.split, b.seed))
        for name, length in lengths.items():
            stream_key = f"lm2-babilong/{b.seed}/{task}/{name}"
            sampler = SentenceSampler(haystack, tokenizer, random.Random(stream_key + "/haystack"),
                                      b.max_sentence_tokens, b.haystack_skip_names)
            gaps = random.Random(stream_key + "/gaps")
            rows, reasons = [], {"fact_filter": 0, "facts_over_budget": 0}
            for sample in pool:
                row, reason = build_row(sample, length, b.margin, tokenizer, sampler, gaps, window)
                if row is None:
                    reasons[reason] += 1
                    if b.facts == "synthetic" and sum(reasons.values()) > 1000 * b.samples:
                        raise Lm2Error(f"{task} at {name}: almost every sample is filtered out (too many facts "
                                       f"for the budget); use longer lengths or a smaller babilong.margin")
                    continue
                rows.append(row)
                chars[name].append(len(row["input"]))
                if len(rows) == b.samples:
                    break
            if len(rows) < b.samples:
                print(f"warning: {task} at {name}: only {len(rows)} of {b.samples} samples pass the filters")
            rel = f"{task}/{name}.json"
            atomic_write_text(out_dir / rel, json.dumps(rows, ensure_ascii=False) + "\n")
            files.append(rel)
            rows_written.setdefault(task, {})[name] = len(rows)
            skipped_for_names.setdefault(task, {})[name] = sampler.skipped_for_names
            dropped.setdefault(task, {})[name] = reasons
            print(f"{out_dir / rel}: {len(rows)} samples"
                  + (f" ({reasons['fact_filter']} over the fact limit, {reasons['facts_over_budget']} with facts "
                     f"over the budget skipped)" if any(reasons.values()) else ""))
    meta = {
        "format": "babilong", "lm2_version": __version__, "split": b.split,
        "generator": "lm2 bAbI-world generator" if b.facts == "synthetic" else "bAbI v1.2 files",
        "facts_source": facts_source, "facts": facts_meta, "haystack": haystack_meta,
        "length_unit": "tokens",
        "tokenizer": {"kind": "sentencepiece", "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "path": tokenizer_path},
        "margin": b.margin, "lengths": lengths, "samples_per_length": b.samples, "seed": b.seed,
        "max_n_facts": f"budget//{FACTS_PER_BUDGET_TOKEN}", "min_sentence_tokens": MIN_SENTENCE_TOKENS,
        "max_sentence_tokens": b.max_sentence_tokens or None, "fact_window": list(window),
        "haystack_skip_names": b.haystack_skip_names,
        **({"haystack_sentences_skipped_for_names": skipped_for_names} if b.haystack_skip_names else {}),
        "whitespace": "collapsed", "sentence_splitter": "regex on .!? with abbreviation guard",
        "mean_chars": {name: (round(sum(c) / len(c)) if c else 0) for name, c in chars.items()},
        "rows": rows_written, "dropped": dropped, "files": files, "fingerprint": fingerprint,
        "note": "BABILong-style data generated by lm2, not the official BABILong release",
    }
    atomic_write_json(out_dir / "meta.json", meta)
    return out_dir


def _remove_previous_build(out_dir: Path) -> None:
    """Delete what an earlier build listed in its meta.json, so no stale qaN/<len>.json survives."""
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return
    try:
        old_files = json.loads(meta_path.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError):
        old_files = []
    from lm2cli.fileio import remove_stale_temp_files

    for rel in old_files:
        if isinstance(rel, str) and re.fullmatch(r"qa\d+/\w+\.json", rel):  # never a path outside the set
            (out_dir / rel).unlink(missing_ok=True)
            remove_stale_temp_files((out_dir / rel).parent)
    meta_path.unlink()


def write_babi_text(recipe, out_dir: Path, train_questions: int = TRAIN_REFERENCE_QUESTIONS,
                    test_questions: int = TEST_REFERENCE_QUESTIONS) -> list[Path]:
    """Generated stories for babilong.tasks as bAbI v1.2 files (train and test), like en-10k."""
    from lm2cli import __version__
    from lm2cli.data.babi import file_name, write_babi_file
    from lm2cli.data.stories import generate_stories
    from lm2cli.fileio import atomic_write_json, remove_stale_temp_files
    from lm2cli.outdir import BABI_TEXT, check_output_dir

    b = recipe.babilong
    out_dir = check_output_dir(out_dir, "--babi-text", BABI_TEXT)
    remove_stale_temp_files(out_dir)
    names = [file_name(task, split) for task in b.tasks for split in ("train", "test")]
    meta = {"format": "lm2-babi-text", "lm2_version": __version__, "seed": b.seed, "tasks": list(b.tasks),
            "questions": {"train": train_questions, "test": test_questions}, "files": names}
    atomic_write_json(out_dir / "meta.json", meta)  # first: the directory is recognisably lm2's from the start
    written = []
    for task in b.tasks:
        for split, n in (("train", train_questions), ("test", test_questions)):
            path = out_dir / file_name(task, split)
            write_babi_file(path, generate_stories(task, split, b.seed, n_questions=n))
            written.append(path)
            print(f"{path}: {n} questions")
    return written


# -------------------------------------------------------------------------------------------- loader


def load_babilong(source: str | Path, length: str, task: str, keep_extra: bool = False) -> list[dict]:
    """Rows {input, question, target} of one task and length.

    `source` is a local directory in the hub layout (`<dir>/<task>/<length>.json`, also `<dir>/data/...`) or a
    hub dataset name such as RMT-team/babilong (booydar/* are aliases). Hub access imports `datasets` lazily,
    tries config=length/split=task, then the older config=task/split=length order, and honours
    HF_DATASETS_OFFLINE. Extra per-row keys (fact_spans, support, ...) are dropped unless `keep_extra`.
    """
    path = Path(source)
    if path.is_dir():
        for candidate in (path / task / f"{length}.json", path / "data" / task / f"{length}.json"):
            if candidate.is_file():
                return _validated(_read_json_rows(candidate), str(candidate), keep_extra)
        raise Lm2Error(f"{path}: no {task}/{length}.json; build it with `lm2 babilong RECIPE` (babilong.tasks, "
                       f"babilong.lengths)")
    name = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise Lm2Error(f"BABILong source '{name}' is neither a directory nor a hub dataset name (owner/name)")
    return _validated(_load_from_hub(HUB_ALIASES.get(name, name), length, task), f"{name} {task}/{length}",
                      keep_extra)


def support_is_last_fact(row: dict) -> bool | None:
    """Whether the newest supporting fact is also the story's last fact (rows built by `lm2 babilong` say where
    their facts are); None when the row does not say, or says it in a form that does not add up. A model that
    keeps only the latest fact answers the True rows and fails the others: `lm2 eval` reports both."""
    spans, support = row.get("fact_spans"), row.get("support")
    if not (isinstance(spans, list) and spans and isinstance(support, list) and support):
        return None
    if not all(type(i) is int and 0 <= i < len(spans) for i in support):
        return None
    return max(support) == len(spans) - 1


def _read_json_rows(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Lm2Error(f"{path}: not a JSON list of rows ({e})") from None
    if not isinstance(rows, list):
        raise Lm2Error(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _validated(rows, where: str, keep_extra: bool = False) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in ROW_KEYS):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise Lm2Error(f"{where}: row {i} needs text fields input, question and target (has {keys})")
        out.append(dict(row) if keep_extra else {k: row[k] for k in ROW_KEYS})
    return out


def _load_from_hub(name: str, length: str, task: str) -> list:
    from lm2cli.data.corpus import _first_line, is_network_error, load_dataset

    offline = os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    problems = []
    for config, split in ((length, task), (task, length)):  # current hub order, then the older one
        try:
            dataset = load_dataset(name, config)
        except Exception as e:
            if is_network_error(e) or offline:
                raise Lm2Error(f"BABILong source '{name}': the Hugging Face hub cannot be reached "
                               f"({'HF_DATASETS_OFFLINE is set' if offline else _first_line(e)}); build a local set "
                               f"with `lm2 babilong RECIPE` and point to its directory") from None
            problems.append(f"config {config}: {_first_line(e)}")
            continue
        if split in dataset:
            return list(dataset[split])
        problems.append(f"config {config} has no split {split}")
    raise Lm2Error(f"BABILong source '{name}': no {task} at {length} ({'; '.join(problems)})")
