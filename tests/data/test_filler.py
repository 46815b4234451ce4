"""Filler prose: varied, deterministic, two disjoint sides, and free of every bAbI word."""

from __future__ import annotations

import re

from lm2cli.data.filler import FORBIDDEN_WORDS, filler_document
from lm2cli.data.haystack import split_sentences


def test_never_uses_babi_vocabulary_or_movement_phrases():
    docs = [filler_document(side, 7, i) for side in ("train", "test") for i in range(800)]
    words = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d)}
    assert not words & FORBIDDEN_WORDS
    assert not any(re.search(r"\b(moved|went|journeyed|travelled) to the\b", d) for d in docs)


def test_varied_and_deterministic():
    docs = [filler_document("train", 7, i) for i in range(300)]
    sentences = [s for d in docs for s in split_sentences(d)]
    assert len(set(sentences)) > 0.8 * len(sentences)  # mostly distinct sentences
    assert len({w for s in sentences for w in s.split()}) > 400
    assert any("\u201c" in d for d in docs) and any("\n\n" in d for d in docs)  # dialogue and paragraphs
    assert docs[:5] == [filler_document("train", 7, i) for i in range(5)]


def test_train_and_test_sides_are_different_streams():
    train = {filler_document("train", 7, i) for i in range(200)}
    test = {filler_document("test", 7, i) for i in range(200)}
    assert not train & test
