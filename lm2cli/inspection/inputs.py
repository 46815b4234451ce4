"""The text an inspection reads: a prompt, a file, or one BABILong row with its facts located in the tokens.

A BABILong row built by `lm2 babilong` carries `fact_spans` (each fact's character span in `input`) and
`support` (which facts the answer rests on), so its fact tokens are known exactly. Rows from the hub have
neither: their facts are found by matching bAbI statements (the checker's grammar, the bAbI vocabulary) in
the text, which may also catch a haystack sentence that happens to read like one; the summary says which.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from lm2cli.errors import Lm2Error

SPEC_HELP = "expected DIR_OR_HUB:TASK:LENGTH[:INDEX], e.g. data/babilong:qa1:1k or RMT-team/babilong:qa2:4k:3"


@dataclass
class TextInput:
    name: str  # the default output folder name
    ids: list[int]  # BOS first
    where: str  # names the source in messages
    fact_mask: list[bool] | None = None  # per token: inside a bAbI fact
    fact_index: list[int] | None = None  # per token: which fact (0, 1, ... in the story's order), -1 for none
    support_mask: list[bool] | None = None  # per token: inside a supporting fact of the question
    answer_pos: int | None = None  # the position whose next-token prediction is the answer
    target: str | None = None
    facts_note: str = ""  # how the facts were located


@dataclass(frozen=True)
class BabilongSpec:
    source: str
    task: str
    length: str
    index: int = 0


def parse_babilong_spec(spec: str) -> BabilongSpec:
    """DIR_OR_HUB:TASK:LENGTH[:INDEX], read from the right so a directory may itself contain ':'."""
    from lm2cli.data.babilong import length_tokens

    parts = spec.split(":")
    index = 0
    if len(parts) >= 4 and parts[-1].isdigit():
        index = int(parts.pop())
    if len(parts) < 3 or not parts[0]:
        raise Lm2Error(f"--babilong '{spec}': {SPEC_HELP}")
    length, task, source = parts[-1], parts[-2], ":".join(parts[:-2])
    if not re.fullmatch(r"qa\d+", task):
        raise Lm2Error(f"--babilong '{spec}': task '{task}' should be qa1 ... qa20; {SPEC_HELP}")
    try:
        length_tokens(length)
    except Lm2Error:
        raise Lm2Error(f"--babilong '{spec}': length '{length}' should look like 0k, 1k, 4k or 128k; "
                       f"{SPEC_HELP}") from None
    return BabilongSpec(source, task, length, index)


def text_name(text: str) -> str:
    return "prompt-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise Lm2Error(f"--file {path}: " + ("is a directory" if path.is_dir() else "not found"))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Lm2Error(f"--file {path}: not UTF-8 text (byte offset {e.start})") from None


def babilong_input(spec: BabilongSpec, tokenizer, where: str) -> TextInput:
    from lm2cli.data.babilong import load_babilong
    from lm2cli.data.examples import babilong_context, babilong_example

    rows = load_babilong(spec.source, spec.length, spec.task, keep_extra=True)
    if not 0 <= spec.index < len(rows):
        raise Lm2Error(f"{where}: index {spec.index} is out of range; {spec.task} at {spec.length} has "
                       f"{len(rows)} rows (0 ... {len(rows) - 1})")
    row = rows[spec.index]
    example = babilong_example(tokenizer, row)  # the prompt exactly as fine-tuning and eval give it
    context = babilong_context(row)
    spans = prompt_spans(tokenizer, context, example.prompt)
    facts, note = row_fact_spans(row, where)
    if facts is None:
        facts = statement_spans(context[:len(row["input"].strip())])
        note = (f"facts located by matching bAbI statements ({len(facts)} found): the row has no fact_spans "
                f"(rows built by `lm2 babilong` record them exactly)")
    support = [facts[i] for i in row.get("support", []) if 0 <= i < len(facts)] if "fact_spans" in row else []
    name = f"{spec.task}-{spec.length}-{spec.index}"
    index = fact_of_token(spans, facts)
    return TextInput(name, example.prompt, where, fact_mask=[i >= 0 for i in index], fact_index=index,
                     support_mask=tokens_in(spans, support) if support else None,
                     answer_pos=len(example.prompt) - 1, target=example.text_answer, facts_note=note)


def prompt_spans(tokenizer, context: str, prompt: list[int]) -> list[tuple[int, int] | None]:
    """Each prompt token's character span in `context`: None for BOS and the answer separator, which stand for
    no text. The prompt is [BOS] + encode(context) + [separator] (lm2cli.data.examples)."""
    ids, spans = tokenizer.encode_with_offsets(context)
    if prompt != [tokenizer.bos_id, *ids, tokenizer.answer_id]:  # a bug, not user input: the masks would shift
        raise RuntimeError("the BABILong prompt is no longer [BOS] + encode(context) + [separator]; "
                           "lm2cli.inspection.inputs.prompt_spans must follow lm2cli.data.examples")
    return [None, *spans, None]


def row_fact_spans(row: dict, where: str) -> tuple[list[tuple[int, int]] | None, str]:
    """The row's recorded fact spans, moved into the context text (which starts at the stripped input)."""
    spans = row.get("fact_spans")
    if spans is None:
        return None, ""
    text = row["input"]
    shift = len(text) - len(text.lstrip())
    if not isinstance(spans, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s)
            and shift <= s[0] < s[1] <= len(text.rstrip()) for s in spans):
        raise Lm2Error(f"{where}: fact_spans should be [start, end] character offsets inside the row's input; "
                       f"rebuild the set with `lm2 babilong RECIPE --force`")
    return [(a - shift, b - shift) for a, b in spans], f"{len(spans)} facts from the row's fact_spans"


def statement_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences in `text` that read as bAbI statements."""
    from lm2cli.data.checker import is_statement
    from lm2cli.data.stories import ACTORS, ACTORS_QA5, ACTORS_QA10, OBJECTS, PLACES, ROOMS

    names, nouns = set(ACTORS + ACTORS_QA5 + ACTORS_QA10), set(ROOMS + PLACES + OBJECTS)
    spans = []
    for m in re.finditer(r"[^.!?]+[.!?]", text):
        start = m.start() + len(m.group()) - len(m.group().lstrip())
        sentence = text[start:m.end()]
        capitals = [w for w in re.findall(r"[A-Z]\w*", sentence) if w != "The"]
        things = re.findall(r"\b[Tt]he (\w+)", sentence)
        if is_statement(sentence) and set(capitals) <= names and things and set(things) <= nouns:
            spans.append((start, m.end()))
    return spans


def tokens_in(token_spans: list[tuple[int, int] | None], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token, whether its characters fall inside one of `spans` (disjoint)."""
    return [i >= 0 for i in fact_of_token(token_spans, spans)]


def fact_of_token(token_spans: list[tuple[int, int] | None], spans: list[tuple[int, int]]) -> list[int]:
    """For each token, the index into `spans` (disjoint, any order) of the span its characters fall inside, or
    -1. An empty token span, as the first byte piece of a character has, counts by its position; None (a special
    token) never does. A token that straddles a span's start (SentencePiece's word mark is the space before a
    fact) belongs to that span."""
    order = sorted(range(len(spans)), key=lambda k: spans[k])
    starts = [spans[k][0] for k in order]
    out = []
    for span in token_spans:
        if span is None:
            out.append(-1)
            continue
        s, e = span
        j = bisect.bisect_right(starts, s) - 1 if s == e else bisect.bisect_left(starts, e) - 1
        out.append(order[j] if j >= 0 and spans[order[j]][1] > s else -1)
    return out
