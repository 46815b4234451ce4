"""Fixtures for the generation tests: a tiny SentencePiece model trained on the spot (byte fallback on, some
non-ASCII text) and a small model that follows the lm2 model contract without being the real model."""

from __future__ import annotations

import io

import pytest
import sentencepiece as spm
import torch

CORPUS = [
    "Mary went to the kitchen. John picked up the apple there.",
    "Sandra journeyed to the garden; Daniel travelled to the office!",
    "Ça coûte 5 € — une naïve café crème, s'il vous plaît.",
    "東京 と 大阪 は 大きい 都市 です。",
    "Größe, Übermaß und Straße: ÄÖÜ äöü ß.",
    "The end.  Two  spaces,\ttabs and\nnew lines.",
]


@pytest.fixture(scope="session")
def sp_model_bytes() -> bytes:
    """A SentencePiece model with the lm2 special ids (unk 0, BOS 1, EOS 2, pad 3, <ans> 4)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40), model_writer=out, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, user_defined_symbols=["<ans>"], minloglevel=2, num_threads=1)
    return out.getvalue()


class SentencePieceTokenizer:
    """The slice of the lm2 Tokenizer interface that generation uses, over a raw SentencePiece model."""

    bos_id, eos_id, pad_id, answer_id = 1, 2, 3, 4

    def __init__(self, model_bytes: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model_bytes) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_model_bytes)


class RunningMeanLM(torch.nn.Module):
    """logits_t = head(embed(x_t) + mean(embed(x_1..x_t))): every position depends on the whole past, so
    a generator that loses or repeats state gives different logits. The state is (running sum, count) and
    chunked calls equal one full call, as the lm2 model contract requires."""

    def __init__(self, vocab_size: int, dim: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab_size, dim, generator=g))
        self.head = torch.nn.Parameter(torch.randn(dim, vocab_size, generator=g) * 2)
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        self.calls: list[int] = []  # lengths of the chunks fed, to check how prefill is split

    def init_state(self, batch_size: int, device=None):
        return (torch.zeros(batch_size, self.embed.size(1), device=device), 0)

    def forward(self, input_ids: torch.Tensor, state=None):
        if state is None:
            state = self.init_state(input_ids.size(0), input_ids.device)
        total, count = state
        self.calls.append(input_ids.size(1))
        e = self.embed[input_ids]                                   # (B, T, D)
        sums = total[:, None] + torch.cumsum(e, dim=1)
        counts = count + torch.arange(1, input_ids.size(1) + 1, device=input_ids.device)
        logits = (e + sums / counts[None, :, None]) @ self.head + self.bias
        return logits, (sums[:, -1], count + input_ids.size(1))


@pytest.fixture
def mock_lm(sp_tokenizer) -> RunningMeanLM:
    return RunningMeanLM(sp_tokenizer.vocab_size)
