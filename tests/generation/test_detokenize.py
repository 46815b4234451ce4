"""Incremental SentencePiece decoding: correct spacing, byte-fallback characters, stream == full decode."""

from __future__ import annotations

import random

import pytest

from lm2cli.generation.detokenize import REPLACEMENT, IncrementalDecoder


def stream(tok, ids, context=(), window=4):
    d = IncrementalDecoder(tok.decode, context, window=window)
    chunks = [d.push(i) for i in ids]
    return chunks, d.flush()


def test_spacing_after_a_prompt(tokenizer):
    prompt = [tokenizer.bos_id, *tokenizer.encode("Mary went")]
    new = tokenizer.encode("to the kitchen.")  # starts with "▁to": mid-text it is " to"
    chunks, tail = stream(tokenizer, new, prompt)
    assert "".join(chunks) + tail == " to the kitchen."
    assert chunks[0].startswith(" ")


def test_no_context_means_no_leading_space(tokenizer):
    chunks, tail = stream(tokenizer, tokenizer.encode("John picked"))
    assert "".join(chunks) + tail == "John picked"


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("東京 €")
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert any(p.startswith("<0x") for p in pieces), pieces  # the fixture really uses byte fallback
    chunks, tail = stream(tokenizer, ids)
    assert all(REPLACEMENT not in c for c in chunks)
    assert "".join(chunks) + tail == "東京 €"
    assert tail == ""


def test_stream_cut_inside_a_character_flushes_the_replacement(tokenizer):
    byte = tokenizer.piece_to_id("<0xE6>")  # a lead byte with no continuation
    chunks, tail = stream(tokenizer, [*tokenizer.encode("ab"), byte])
    assert "".join(chunks) == "ab" and tail == REPLACEMENT


def test_window_of_control_tokens_does_not_swallow_spaces(tokenizer):
    t = tokenizer
    ids = t.encode("Mary") + [t.pad_id] * 6 + t.encode("went")  # "▁went" after pads is " went"
    chunks, tail = stream(t, ids, window=2)
    assert "".join(chunks) + tail == t.decode(ids) == "Mary went"


@pytest.mark.parametrize("window", [1, 2, 4])
def test_random_token_streams_equal_the_full_decode(tokenizer, window):
    """Any token sequence (random pieces, stray bytes, control tokens, lone "▁") after a real prompt."""
    t = tokenizer
    rnd = random.Random(window)
    words = "Mary went to the 東京 café € garden . ! Größe".split()
    byte_ids = [t.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    special = [0, 1, 2, 3, 4, t.piece_to_id("▁")]
    for _ in range(1500):
        context = ([t.bos_id] if rnd.random() < 0.5 else []) + t.encode(
            " ".join(rnd.choice(words) for _ in range(rnd.randint(0, 4))))
        ids = [rnd.choice([rnd.randrange(t.vocab_size), rnd.choice(byte_ids), rnd.choice(special)])
               for _ in range(rnd.randint(0, 14))]
        chunks, tail = stream(t, ids, context, window)
        full = t.decode(context + ids)
        assert full.startswith(t.decode(context))
        assert "".join(chunks) + tail == full[len(t.decode(context)):], (context, ids)


def test_memory_stays_bounded(tokenizer):
    d = IncrementalDecoder(tokenizer.decode, window=4)
    for i in tokenizer.encode("Mary went to the kitchen. " * 50):
        d.push(i)
    assert len(d.ids) <= 8
