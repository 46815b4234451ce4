"""Text-level stop strings: held back while they may still match, cut at the earliest match."""

from __future__ import annotations

import random

import pytest

from lm2cli.generation.stopping import StopMatcher


def run(chunks, stops):
    """Feed chunks; return (emitted text, stopped, everything emitted before each chunk was fed)."""
    m = StopMatcher(stops)
    out = ""
    for c in chunks:
        out += m.feed(c)
        if m.stopped:
            return out, True
    return out + m.flush(), False


def reference(text, stops):
    """What the whole text gives when cut at the earliest stop string."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def test_no_stops_passes_text_through():
    assert run(["a", "bc", ""], []) == ("abc", False)


def test_stop_inside_one_chunk():
    assert run(["Hello world", "!"], ["wor"]) == ("Hello ", True)


def test_stop_across_chunk_boundaries_is_held_back():
    m = StopMatcher(["\n\n"])
    assert m.feed("line one\n") == "line one"   # the newline may start the stop: held back
    assert m.feed("\n") == "" and m.stopped


def test_partial_match_that_fails_is_released():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("OP") == "" and m.stopped
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("AR") == "STAR"


def test_litgpt_a_a_b_bug_does_not_happen():
    # Stop [A, B] must be found in the stream A A B: after the mismatch the second A starts a new match.
    assert run(["A", "A", "B", "C"], ["AB"]) == ("A", True)
    assert run(["x", "ab", "ab", "c"], ["abc"]) == ("xab", True)


def test_earliest_of_several_stops_wins():
    assert run(["one two three"], ["three", "two"]) == ("one ", True)
    assert run(["abc"], ["bc", "abcd"]) == ("a", True)


def test_flush_releases_an_unfinished_prefix():
    assert run(["the end: STO"], ["STOP"]) == ("the end: STO", False)


def test_nothing_after_a_stop_is_emitted():
    m = StopMatcher(["x"])
    assert m.feed("ax") == "a"
    assert m.feed("more") == "" and m.flush() == ""


def test_empty_stop_strings_are_ignored():
    assert run(["abc"], [""]) == ("abc", False)


def test_multibyte_and_overlapping_stops():
    assert run(["東", "京", "と"], ["京と"]) == ("東", True)
    assert run(["aaa", "ab"], ["aab"]) == ("aa", True)


@pytest.mark.parametrize("seed", range(20))
def test_random_chunkings_match_the_reference(seed):
    rnd = random.Random(seed)
    alphabet = "ab \n"
    text = "".join(rnd.choice(alphabet) for _ in range(60))
    stops = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(1, 3))]
    cuts = sorted(rnd.sample(range(1, len(text)), 15))
    chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(chunks, stops) == reference(text, stops)
    # A prefix of the emitted text never contains a stop, and the emitted text never ends mid-stop.
    m = StopMatcher(stops)
    emitted = ""
    for c in chunks:
        emitted += m.feed(c)
        assert reference(emitted, stops) == (emitted, False)
        if m.stopped:
            break
