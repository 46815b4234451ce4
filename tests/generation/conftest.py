"""Fixtures for the generation tests: a tiny lm2 tokenizer trained on the spot (SentencePiece, byte fallback
on, some non-ASCII text) and a small model that follows the lm2 model contract without being the real one."""

from __future__ import annotations

import pytest
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
def make_tokenizer():
    """make_tokenizer(vocab_size) -> an lm2 Tokenizer trained the way `lm2 tokenize` does (special ids unk 0,
    BOS 1, EOS 2, pad 3, <ans> 4)."""
    from lm2cli.data.tokenizer import train_tokenizer

    def make(vocab_size: int = 400):
        return train_tokenizer(CORPUS * 40, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
                               character_coverage=0.98, sample_sentences=10_000, answer_token="<ans>",
                               extra_symbols=[], seed=1)

    return make


@pytest.fixture(scope="session")
def tokenizer(make_tokenizer):
    return make_tokenizer(400)


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

    def forward(self, input_ids: torch.Tensor, state=None, logits_at=None):
        if state is None:
            state = self.init_state(input_ids.size(0), input_ids.device)
        total, count = state
        self.calls.append(input_ids.size(1))
        e = self.embed[input_ids]                                   # (B, T, D)
        sums = total[:, None] + torch.cumsum(e, dim=1)
        counts = count + torch.arange(1, input_ids.size(1) + 1, device=input_ids.device)
        logits = (e + sums / counts[None, :, None]) @ self.head + self.bias
        if logits_at is not None:  # the lm2 contract: the named positions' logits only, packed (N, V)
            logits = logits[logits_at]
        return logits, (sums[:, -1], count + input_ids.size(1))


@pytest.fixture
def mock_lm(tokenizer) -> RunningMeanLM:
    return RunningMeanLM(tokenizer.vocab_size)
