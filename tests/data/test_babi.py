"""The bAbI v1.2 text format: reading, writing and the per-question split (fixtures written by hand)."""

from __future__ import annotations

import pytest

from lm2cli.data.babi import format_story, parse_babi, read_babi_file, render_plain, story_samples
from lm2cli.errors import Lm2Error

QA2_FIXTURE = (
    "1 Anna moved to the hallway.\n"
    "2 Anna got the lamp there.\n"
    "3 Where is Anna? \thallway\t1\n"
    "4 Anna went to the kitchen.\n"
    "5 Where is the lamp? \tkitchen\t2 4\n"
    "1 Bo went to the office.\n"
    "2 Where is Bo? \toffice\t1\n"
)
QA4_FIXTURE = (
    "1 The office is north of the kitchen.\n"
    "2 The garden is south of the kitchen.\n"
    "3 What is north of the kitchen?\toffice\t1\n"
)


def test_read_write_round_trip():
    stories = parse_babi(QA2_FIXTURE, "qa2")
    assert len(stories) == 2 and len(stories[0].lines) == 5
    q = stories[0].lines[4]
    assert q.is_question and q.text == "Where is the lamp?" and q.answer == "kitchen" and q.support == [2, 4]
    assert "".join(format_story(s) for s in stories) == QA2_FIXTURE


def test_qa4_has_no_trailing_space_and_still_parses():
    stories = parse_babi(QA4_FIXTURE, "qa4")
    assert stories[0].lines[2].text == "What is north of the kitchen?"
    assert format_story(stories[0]) == QA4_FIXTURE
    # the reader does not depend on the space: a qa4-style line in another task parses the same way
    assert parse_babi(QA4_FIXTURE, "qa1")[0].lines[2].answer == "office"


def test_per_question_split_grows_and_excludes_questions():
    samples = list(story_samples(parse_babi(QA2_FIXTURE, "qa2")[0]))
    assert [s.facts for s in samples] == [
        ["Anna moved to the hallway.", "Anna got the lamp there."],
        ["Anna moved to the hallway.", "Anna got the lamp there.", "Anna went to the kitchen."],
    ]
    assert samples[1].question == "Where is the lamp? " and samples[1].answer == "kitchen"
    assert samples[1].references == ["Anna got the lamp there.", "Anna went to the kitchen."]
    assert samples[1].support_positions == [1, 2]


def test_plain_rendering_for_pretraining():
    story = parse_babi(QA2_FIXTURE, "qa2")[0]
    assert render_plain(story) == ("Anna moved to the hallway. Anna got the lamp there. Where is Anna? hallway "
                                   "Anna went to the kitchen. Where is the lamp? kitchen")


def test_plain_rendering_gives_a_name_the_same_tokens_everywhere(small_tokenizer):
    """A name in a statement must be the very tokens of the name in the question (and in BABILong rows, whose
    facts are joined by spaces); a name starting a line would lose its '▁' piece."""
    story = parse_babi(QA2_FIXTURE, "qa2")[0]
    ids = small_tokenizer.encode(render_plain(story))
    name = small_tokenizer.encode("Anna")
    found = sum(ids[i:i + len(name)] == name for i in range(len(ids)))
    assert found == render_plain(story).count("Anna") == 4


@pytest.mark.parametrize("text, message", [
    ("1 A went to the b.\n3 B went to the c.\n", "line ID 3 does not follow 1"),
    ("x A went.\n", "expected '<ID> <text>'"),
    ("1 A went to the b.\n2 Where is A?\tb\t2\n", "support ID 2 is not a statement"),
    ("1 A went to the b.\n2 Where is A?\tb\n", "question<TAB>answer<TAB>support"),
])
def test_malformed_lines_name_the_line(text, message):
    with pytest.raises(Lm2Error, match=message) as e:
        parse_babi(text, "qa1", where="f.txt")
    assert str(e.value).startswith("f.txt:")


def test_read_file_errors(tmp_path):
    with pytest.raises(Lm2Error, match="cannot tell the task"):
        read_babi_file(tmp_path / "stories.txt")
    bad = tmp_path / "qa1_single-supporting-fact_train.txt"
    bad.write_bytes(b"1 Mary went to the \xff.\n")
    with pytest.raises(Lm2Error, match=r"not UTF-8 text \(byte offset 19\)"):
        read_babi_file(bad)
