"""The Tokenizer wrapper: fixed special ids, exact round trips, serialisation, clear training errors."""

from __future__ import annotations

import hashlib

import pytest

from lm2cli.data.tokenizer import Tokenizer, train_tokenizer, user_defined_pieces
from lm2cli.errors import Lm2Error

from .conftest import varied_sentences


def test_special_ids_are_fixed(small_tokenizer):
    tok = small_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.answer_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(7)][:6] == ["<unk>", "<s>", "</s>", "<pad>", "<ans>", "<sep>"]
    assert tok.newline_id == 6 and tok.id_to_piece(6) == "\n"
    assert tok.vocab_size == 400 == len(tok)
    assert user_defined_pieces(tok.to_bytes()) == [4, 5, 6]


@pytest.mark.parametrize("text", [
    "Anna walked near the letter.",
    "Mary went to the kitchen.\nWhere is Mary? kitchen\n\nTwo  spaces and a\ttab.",
    "Unseen: café, naïve, Ελληνικά, 日本語, emoji 🙂 and {braces}!",
    "Anna <ans> Bruno",
])
def test_decode_inverts_encode(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.unk_id not in ids  # byte fallback covers every character
    assert small_tokenizer.decode(ids) == text


def test_bos_eos_framing_and_batch(small_tokenizer):
    tok = small_tokenizer
    plain = tok.encode("Elena spoke.")
    assert tok.encode("Elena spoke.", bos=True, eos=True) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.decode([tok.bos_id, *plain, tok.eos_id]) == "Elena spoke."
    texts = ["Elena spoke.", "Farid read the old map.", ""]
    assert tok.encode_batch(texts, eos=True) == [tok.encode(t, eos=True) for t in texts]
    assert tok.encode("Anna <ans> Bruno").count(tok.answer_id) == 1


def test_bytes_round_trip_and_checksum(small_tokenizer, tmp_path):
    raw = small_tokenizer.to_bytes()
    assert small_tokenizer.sha256 == hashlib.sha256(raw).hexdigest()
    again = Tokenizer.from_bytes(raw)
    assert again.sha256 == small_tokenizer.sha256 and again.answer_id == 4
    small_tokenizer.save(tmp_path / "t.model")
    loaded = Tokenizer.load(tmp_path / "t.model")
    assert loaded.encode("Chloe waited 7 times.") == small_tokenizer.encode("Chloe waited 7 times.")


def test_training_is_deterministic(small_tokenizer):
    again = train_tokenizer(varied_sentences(3000), model_type="bpe", vocab_size=400, byte_fallback=True,
                            character_coverage=1.0, sample_sentences=100_000, answer_token="<ans>",
                            extra_symbols=["<sep>"], seed=1)
    assert again.sha256 == small_tokenizer.sha256


def test_unigram_with_custom_answer_token():
    tok = train_tokenizer(varied_sentences(2000), model_type="unigram", vocab_size=300, byte_fallback=True,
                          character_coverage=1.0, sample_sentences=100_000, answer_token="<answer>",
                          extra_symbols=[], seed=1)
    assert tok.id_to_piece(4) == "<answer>" and Tokenizer.from_bytes(tok.to_bytes()).answer_id == 4
    text = "Bruno laughed near a lantern.\nAnna read."
    assert tok.decode(tok.encode(text)) == text


def test_vocabulary_larger_than_corpus_is_one_clear_line():
    with pytest.raises(Lm2Error) as e:
        train_tokenizer(varied_sentences(50), model_type="bpe", vocab_size=5000, byte_fallback=True,
                        character_coverage=1.0, sample_sentences=1000, answer_token="<ans>",
                        extra_symbols=[], seed=1)
    msg = str(e.value)
    assert "tokenizer.vocab_size = 5000" in msg and "set tokenizer.vocab_size <=" in msg and "\n" not in msg


def test_vocabulary_too_small_for_bytes():
    with pytest.raises(Lm2Error, match=r"tokenizer.vocab_size = 100 is too small"):
        train_tokenizer(varied_sentences(50), model_type="bpe", vocab_size=100, byte_fallback=True,
                        character_coverage=1.0, sample_sentences=1000, answer_token="<ans>",
                        extra_symbols=[], seed=1)


def test_bad_symbol_and_bad_model_file(tmp_path):
    with pytest.raises(Lm2Error, match="without spaces or commas"):
        train_tokenizer(["a b"], model_type="bpe", vocab_size=300, byte_fallback=True, character_coverage=1.0,
                        sample_sentences=10, answer_token="<ans>", extra_symbols=["a,b"], seed=1)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a sentencepiece model")
    with pytest.raises(Lm2Error, match="junk.model: not a SentencePiece model"):
        Tokenizer.load(junk)
    with pytest.raises(Lm2Error, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing.model")
