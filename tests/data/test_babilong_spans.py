"""BABILong rows record where their facts are: character spans in `input` that cut out exactly the fact
sentences (for `lm2 inspect-memory`), kept by the loader only on request; tokenizer character offsets."""

from __future__ import annotations

import json
import random

import pytest

from lm2cli.data.babi import Sample
from lm2cli.data.babilong import build_row, load_babilong
from lm2cli.data.haystack import BuiltinHaystack, SentenceSampler

FACTS = ["Mary moved to the bathroom.", "John went to the hallway.", "Mary got the football there.",
         "Sandra journeyed to the garden.", "Mary travelled to the office."]


def sample(facts=FACTS):
    return Sample("qa2", list(facts), "Where is the football? ", "office", [facts[2], facts[4]], [2, 4])


@pytest.mark.parametrize("length,margin", [(0, 0), (300, 20), (1000, 300), (2000, 20)])
def test_fact_spans_cut_out_exactly_the_fact_sentences(small_tokenizer, length, margin):
    sampler = SentenceSampler(BuiltinHaystack("test", 5), small_tokenizer, random.Random(0))
    for k in range(4):
        row, _ = build_row(sample(), length, margin, small_tokenizer, sampler, random.Random(k))
        assert [row["input"][a:b] for a, b in row["fact_spans"]] == FACTS
        assert row["support"] == [2, 4]
        starts = [a for a, _ in row["fact_spans"]]
        assert starts == sorted(starts) and all(a == 0 or row["input"][a - 1] == " " for a in starts)


def test_facts_that_share_a_gap_and_open_the_text_are_cut_exactly(small_tokenizer):
    """Fact window [0, 0]: every fact goes before the first haystack sentence, one after the other."""
    sampler = SentenceSampler(BuiltinHaystack("test", 5), small_tokenizer, random.Random(1))
    row, _ = build_row(sample(), 500, 20, small_tokenizer, sampler, random.Random(0), window=(0.0, 0.0))
    assert row["fact_spans"][0][0] == 0 and row["input"].startswith(" ".join(FACTS))
    assert [row["input"][a:b] for a, b in row["fact_spans"]] == FACTS


def test_loader_keeps_the_extra_fields_only_on_request(tmp_path, small_tokenizer):
    sampler = SentenceSampler(BuiltinHaystack("test", 5), small_tokenizer, random.Random(0))
    row, _ = build_row(sample(), 300, 20, small_tokenizer, sampler, random.Random(0))
    (tmp_path / "qa2").mkdir()
    (tmp_path / "qa2" / "1k.json").write_text(json.dumps([row]))
    assert set(load_babilong(tmp_path, "1k", "qa2")[0]) == {"input", "question", "target"}
    assert load_babilong(tmp_path, "1k", "qa2", keep_extra=True)[0]["fact_spans"] == row["fact_spans"]


def test_tokenizer_offsets_locate_every_token(small_tokenizer):
    text = "Mary went to the kitchen.  Ça coûte 5 €. 東京 end"
    ids, spans = small_tokenizer.encode_with_offsets(text)
    assert ids == small_tokenizer.encode(text)
    assert "".join(text[a:b] for a, b in spans) == text  # contiguous, in order, covering the text
    decoded, offsets = small_tokenizer.decode_with_offsets(ids)
    assert decoded == small_tokenizer.decode(ids) == text
    assert "".join(decoded[a:b] for a, b in offsets) == decoded
