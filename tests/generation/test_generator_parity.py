"""KV-cache and memory parity on the real model core: greedy decoding through the state (prefill in
segment-aligned chunks, then one token at a time with the memory written every S tokens) gives exactly the
argmax of one full forward pass over the growing sequence — for lm2, vanilla and rmt, with and without a
sliding window, across several segment boundaries."""

from __future__ import annotations

import pytest
import torch

from lm2cli.generation.generator import Generator
from lm2cli.generation.sampling import SamplingParams
from lm2cli.recipe import load_recipe

model_core = pytest.importorskip("lm2cli.model")

SEGMENT = 8


def tiny_recipe(arch: str, window: int):
    return load_recipe(None, [
        f"model.arch={arch}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        # Large initial weights give peaked logits, so argmax comparisons are not decided by float noise.
        "model.init_std=0.3", "memory.slots=4", "memory.heads=2", f"memory.segment_len={SEGMENT}",
        # memory.out_gate_bias=0: the gate open (0.5, not the default 0.018), so the
        # memory path is loud enough for these checks to test it
        f"attention.window={window}", "model.max_seq_len=256", "memory.out_gate_bias=0"])


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("arch", ["lm2", "vanilla", "rmt"])
@pytest.mark.parametrize("chunk_len", [SEGMENT, 3 * SEGMENT, 512])
def test_greedy_through_state_equals_full_forward_argmax(tokenizer, arch, window, chunk_len):
    torch.manual_seed(0)
    recipe = tiny_recipe(arch, window)
    model = model_core.build_model(recipe, vocab_size=tokenizer.vocab_size).eval()
    gen = Generator(model, tokenizer, recipe, device="cpu")
    gen.chunk_len = chunk_len  # also prefill in single segments and in multi-segment chunks
    prompt = gen.encode_prompt("Mary went to the kitchen. John picked up the apple there. Ça coûte 5 €")
    assert len(prompt) > 3 * SEGMENT and len(prompt) % SEGMENT  # prefill ends inside a segment
    params = SamplingParams(temperature=0.0, max_new_tokens=3 * SEGMENT + 3, min_new_tokens=3 * SEGMENT + 3)
    result = gen.generate(prompt, params)
    assert result.new_tokens == params.max_new_tokens

    # One forward over prompt + generated tokens gives, by causality, every step's full-forward logits.
    full = torch.tensor([prompt + result.token_ids])
    with torch.no_grad():
        logits, _ = model(full, None)
    step_logits = logits[0, len(prompt) - 1:-1]
    step_logits[:SEGMENT * 3 + 3, tokenizer.eos_id] = float("-inf")  # min_new_tokens suppressed EOS throughout
    expected = step_logits.argmax(-1).tolist()
    top2 = step_logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "near-tie: the comparison would test float noise"
    assert result.token_ids == expected


@pytest.mark.parametrize("arch", ["lm2", "rmt"])
def test_memory_is_written_during_decoding(tokenizer, arch):
    """Decoding past a segment boundary changes the memory: the state after generation differs from the
    state right after the prompt, as the paper's test-time memory updates require."""
    recipe = tiny_recipe(arch, 5)
    model = model_core.build_model(recipe, vocab_size=tokenizer.vocab_size).eval()
    gen = Generator(model, tokenizer, recipe, device="cpu")
    prompt = gen.encode_prompt("Mary went to the kitchen.")
    _, state = gen.prefill(prompt)
    before = memory_of(state)
    with torch.no_grad():
        for _ in range(SEGMENT):
            _, state = model(torch.tensor([[5]]), state)
    assert not torch.equal(before, memory_of(state))


def memory_of(state):
    if state.rmt_memory is not None:
        return state.rmt_memory.clone()
    return torch.cat([ls.memory.bank for ls in state.layers if ls.memory is not None]).clone()
