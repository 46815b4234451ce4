"""A fresh LM2 memory path starts nearly closed, so it does not add noise to a backbone that does not need it yet.

After its first write the bank holds g_in·tanh(U) + g_f·M, far larger than the one-hot initial bank; with the
output gate at σ(0) = 0.5 the gated read was then as loud as the token embeddings in every block (RMS 0.10 vs 0.085,
small recipe, docs/results.md "The memory's share of the gap"). The default `memory.out_gate_bias` (-4, gate 0.018)
keeps it at a few per cent until training opens the gate; tests/model/test_memory_learns.py checks that it does.
"""

from __future__ import annotations

import torch

from lm2cli import build_model, load_recipe

D, S, VOCAB = 64, 8, 32


def memory_to_embedding_rms(overrides: list[str]) -> float:
    """Largest RMS of a block's gated memory output over 3 segments, relative to the token embeddings' RMS."""
    torch.manual_seed(0)
    recipe = load_recipe(None, ["model.arch=lm2", f"model.d_model={D}", "model.n_layers=2", "model.n_heads=4",
                                f"model.vocab_size={VOCAB}", "memory.slots=8", "memory.heads=4",
                                f"memory.segment_len={S}", f"attention.window={S}", *overrides])
    model = build_model(recipe)
    tokens = torch.randint(0, VOCAB, (4, 3 * S), generator=torch.Generator().manual_seed(0))
    rms = []
    hooks = [block.memory.register_forward_hook(lambda mod, args, out: rms.append(out[0].pow(2).mean().sqrt()))
             for block in model.blocks]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    embedding_rms = model.tok_emb.weight[tokens].pow(2).mean().sqrt()
    return (max(rms) / embedding_rms).item()


def test_memory_output_starts_small_against_the_embeddings():
    assert memory_to_embedding_rms([]) < 0.1


def test_an_open_gate_is_still_available():
    assert memory_to_embedding_rms(["memory.out_gate_bias=0"]) > 0.3  # the measurement sees the memory at all
