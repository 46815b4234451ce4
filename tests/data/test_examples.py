"""Example assembly shared by fine-tuning and `lm2 eval`: the exact BABILong prompt string (babilong.md §5.3)."""

from __future__ import annotations

import json

import pytest

from lm2cli.data.examples import babilong_context, babilong_example, jsonl_example, load_examples
from lm2cli.errors import Lm2Error
from lm2cli.recipe import load_recipe


class CharTokenizer:
    """One id per character (offset past the special ids), so a sequence of ids spells its text exactly."""

    bos_id, eos_id, pad_id, answer_id = 1, 2, 3, 4

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 10) for i in ids if i >= 10)


ROW = {"input": "\n  Mary went to the kitchen.  John moved to the garden. \n", "question": " Where is Mary?\t",
       "target": " kitchen \n"}


def test_babilong_prompt_string_is_pinned():
    """input.strip() + " " + question.strip(), then the separator; the answer is target.strip() + EOS."""
    tok = CharTokenizer()
    assert babilong_context(ROW) == "Mary went to the kitchen.  John moved to the garden. Where is Mary?"
    ex = babilong_example(tok, ROW)
    assert ex.prompt[0] == tok.bos_id and ex.prompt[-1] == tok.answer_id
    assert tok.decode(ex.prompt[1:-1]) == "Mary went to the kitchen.  John moved to the garden. Where is Mary?"
    assert ex.answer == tok.encode("kitchen") + [tok.eos_id] and ex.text_answer == "kitchen"
    assert len(ex) == len(ex.prompt) + len(ex.answer)


def test_jsonl_rows_keep_prompt_and_response_apart():
    tok = CharTokenizer()
    ex = jsonl_example(tok, {"prompt": "Q: 2+2? ", "response": "4"})
    assert ex.prompt == [tok.bos_id] + tok.encode("Q: 2+2? ") and ex.answer == tok.encode("4") + [tok.eos_id]


def test_load_examples_reads_either_format(tmp_path):
    tok = CharTokenizer()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    jsonl = load_examples(load_recipe(None, ["finetune.format=jsonl"]), tok, str(rows))
    assert [(tok.decode(e.prompt), tok.decode(e.answer)) for e in jsonl] == [("a", "b"), ("c", "d")]
    for length in ("0k", "1k"):
        (tmp_path / "bl" / "qa2").mkdir(parents=True, exist_ok=True)
        (tmp_path / "bl" / "qa2" / f"{length}.json").write_text(json.dumps([dict(ROW, target=length)]))
    babilong = load_examples(load_recipe(None, ["finetune.tasks=['qa2']"]), tok, str(tmp_path / "bl"))
    assert [e.text_answer for e in babilong] == ["0k", "1k"]
    assert all(e.prompt == babilong_example(tok, ROW).prompt for e in babilong)
    with pytest.raises(Lm2Error, match="no BABILong files for qa3"):
        load_examples(load_recipe(None, ["finetune.tasks=['qa3']"]), tok, str(tmp_path / "bl"))


def test_a_file_that_is_not_a_babilong_length_is_refused_with_its_name_escaped(tmp_path):
    """A length's name labels the rows (console, metrics): a stranger's file name never reaches the terminal raw."""
    tok = CharTokenizer()
    (tmp_path / "bl" / "qa1").mkdir(parents=True)
    (tmp_path / "bl" / "qa1" / "1k.json").write_text(json.dumps([ROW]))
    assert [e.group for e in load_examples(load_recipe(None, []), tok, str(tmp_path / "bl"))] == ["1k"]
    (tmp_path / "bl" / "qa1" / "\x1b[2Jnotes.json").write_text(json.dumps([ROW]))
    with pytest.raises(Lm2Error) as e:
        load_examples(load_recipe(None, []), tok, str(tmp_path / "bl"))
    assert "\x1b" not in str(e.value) and "\\x1b[2Jnotes.json" in str(e.value)
    assert "not a BABILong length file; expected one of 0k.json, 256.json" in str(e.value)
