"""LM2's memory carries information across segments beyond the attention window; without memory it cannot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm2cli import build_model, load_recipe

S, N_KEYS, N_VALUES, N_FILLER = 16, 16, 16, 32
VOCAB = 1 + N_KEYS + N_VALUES + N_FILLER


def recall_batch(gen: torch.Generator, batch: int) -> torch.Tensor:
    """Three segments: a key/value pair somewhere in segment 0, filler, then the key again; predict the value.

    With attention window S, the query token at the end of segment 2 cannot attend to segment 0: the pair can
    only arrive through memory (written after segment 0, kept through segment 1's write).
    """
    length = 3 * S
    x = 1 + N_KEYS + N_VALUES + torch.randint(0, N_FILLER, (batch, length), generator=gen)
    key = 1 + torch.randint(0, N_KEYS, (batch,), generator=gen)
    value = 1 + N_KEYS + torch.randint(0, N_VALUES, (batch,), generator=gen)
    where = torch.randint(0, S - 1, (batch,), generator=gen)
    rows = torch.arange(batch)
    x[rows, where], x[rows, where + 1] = key, value
    x[:, -2], x[:, -1] = key, value
    return x


def train_and_score(arch: str, steps: int = 300) -> float:
    torch.manual_seed(0)
    recipe = load_recipe(None, [
        f"model.arch={arch}", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", f"model.vocab_size={VOCAB}",
        "memory.slots=16", "memory.heads=4", f"memory.segment_len={S}", f"attention.window={S}"])
    model = build_model(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = recall_batch(gen, 32)
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits[:, -1], x[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x = recall_batch(torch.Generator().manual_seed(1234), 1000)
        logits, _ = model(x[:, :-1])
    return (logits[:, -1].argmax(-1) == x[:, -1]).float().mean().item()


@pytest.mark.slow
def test_lm2_recalls_across_segments_and_vanilla_cannot():
    lm2 = train_and_score("lm2")
    vanilla = train_and_score("vanilla")
    chance = 1 / N_VALUES
    assert lm2 >= 0.90, f"LM2 recall accuracy {lm2:.3f}"
    assert vanilla <= 3 * chance, f"without memory accuracy {vanilla:.3f} should stay near chance {chance:.3f}"
