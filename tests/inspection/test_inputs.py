"""The inspected text: which tokens are facts, the BABILong spec, bAbI statements in free text."""

from __future__ import annotations

import pytest

from lm2cli.errors import Lm2Error
from lm2cli.inspection.inputs import BabilongSpec, fact_of_token, parse_babilong_spec, statement_spans, tokens_in


def test_tokens_inside_fact_spans():
    text = "He sat. Mary went to the office. The end"
    fact = (8, 32)
    assert text[slice(*fact)] == "Mary went to the office."
    tokens = [None, (0, 2), (2, 6), (6, 7), (7, 12), (12, 17), (17, 31), (31, 32), (32, 36), (36, 36), (36, 40),
              None]
    # " Mary" carries the space before the fact: it is in; " The" starts where the fact ends: it is out
    assert tokens_in(tokens, [fact]) == [False, False, False, False, True, True, True, True, False, False, False,
                                         False]
    assert tokens_in([(20, 20), (32, 32), (7, 8)], [fact]) == [True, False, False]  # empty spans by position
    assert tokens_in([(0, 2), (9, 10)], [(9, 12), (0, 1)]) == [True, True]  # any order of spans


def test_each_token_knows_its_fact_by_the_facts_own_order():
    text = "Mary went home. John went out."
    facts = [(16, 30), (0, 15)]  # not in text order: the indices are the list's
    assert [text[a:b] for a, b in facts] == ["John went out.", "Mary went home."]
    tokens = [None, (0, 4), (4, 9), (9, 15), (15, 20), (20, 25), (25, 30), None]
    # " John" carries the space between the facts: it belongs to the fact it starts
    assert fact_of_token(tokens, facts) == [-1, 1, 1, 1, 0, 0, 0, -1]
    assert fact_of_token(tokens, []) == [-1] * len(tokens)


def test_babilong_spec_is_read_from_the_right():
    assert parse_babilong_spec("data/babilong:qa1:1k") == BabilongSpec("data/babilong", "qa1", "1k", 0)
    assert parse_babilong_spec("RMT-team/babilong:qa2:4k:17") == BabilongSpec("RMT-team/babilong", "qa2", "4k", 17)
    assert parse_babilong_spec("C:/sets:qa3:0k:2") == BabilongSpec("C:/sets", "qa3", "0k", 2)
    for bad in ("qa1:1k", ":qa1:1k", "d:qa1", "d:1k:qa1"):
        with pytest.raises(Lm2Error, match="DIR_OR_HUB:TASK:LENGTH"):
            parse_babilong_spec(bad)


def test_babi_statements_are_found_in_free_text_and_look_alikes_are_not():
    text = ("The day was long. Mary went back to the kitchen. He went to the door. John picked up the apple "
            "there. The office is north of the garden. Where is Mary? Fred gave the milk to Bill. Ann went to "
            "the kitchen. Sandra is either in the park or the school.")
    found = [text[a:b] for a, b in statement_spans(text)]
    assert found == ["Mary went back to the kitchen.", "John picked up the apple there.",
                     "The office is north of the garden.", "Fred gave the milk to Bill.",
                     "Sandra is either in the park or the school."]
