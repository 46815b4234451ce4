"""Batched decoding through the model state gives exactly what one-at-a-time generation gives."""

from __future__ import annotations

import random

import pytest
import torch

from lm2cli.evaluation.decode import StateRunner, select_rows

from .conftest import tiny_model

# LM2 with full attention and with a window, RMT, vanilla: every state layout the model core has.
ARCHS = {"lm2": [], "lm2-window": ["attention.window=24"], "rmt": ["model.arch=rmt"],
         "vanilla": ["model.arch=vanilla", "attention.window=20"]}


def prompts_of(tokenizer, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = range(5, tokenizer.vocab_size)
    return [[tokenizer.bos_id] + [rng.choice(vocab) for _ in range(n - 1)] for n in lengths]


def one_at_a_time(model, recipe, tokenizer, prompts, max_new: int) -> list[list[int]]:
    """The reference: `lm2 generate`'s greedy loop, one prompt at a time."""
    from lm2cli.generation import Generator, SamplingParams

    gen = Generator(model, tokenizer, recipe, device="cpu")
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
    out = []
    for p in prompts:
        ids = gen.generate(p, params).token_ids
        out.append([t for t in ids if t != tokenizer.eos_id])
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_greedy_equals_generation_one_at_a_time(tokenizer, arch):
    model, recipe = tiny_model(tokenizer, *ARCHS[arch])
    # lengths on both sides of segment (16) and chunk (256) boundaries, repeats, and one lone length
    lengths = [3, 15, 16, 17, 17, 17, 31, 33, 40, 40, 47, 64, 65, 65, 100, 270]
    prompts = prompts_of(tokenizer, lengths)
    random.Random(1).shuffle(prompts)
    reference = one_at_a_time(model, recipe, tokenizer, prompts, max_new=12)
    for batch_size in (1, 4, 16):
        runner = StateRunner(model, recipe.memory.segment_len, "cpu", batch_size=batch_size)
        assert runner.greedy(prompts, 12, tokenizer.eos_id) == reference, f"batch_size={batch_size}"


def test_select_rows_continues_each_row_exactly(tokenizer):
    """A row taken out of a batched state continues as if it had been run alone (LM2 memory, pending segment,
    KV cache and the broadcast initial bank all follow the row)."""
    model, _ = tiny_model(tokenizer)
    ids = torch.tensor(prompts_of(tokenizer, [40, 40, 40], seed=3))
    nxt = torch.tensor(prompts_of(tokenizer, [9, 9, 9], seed=4))
    with torch.no_grad():
        _, state = model(ids, None)
        picked = select_rows(state, [2, 0])
        logits, _ = model(nxt[[2, 0]], picked)
        for j, row in enumerate([2, 0]):
            _, alone = model(ids[row:row + 1], None)
            expected, _ = model(nxt[row:row + 1], alone)
            assert torch.allclose(logits[j], expected[0], atol=1e-5)
        fresh = select_rows(model.init_state(3), [1, 1])  # the broadcast bank stays broadcast
        bank = fresh.layers[0].memory.bank
        assert bank.shape[0] == 2 and bank.stride(0) == 0


def test_greedy_stops_at_eos_and_groups_do_not_leak(tokenizer):
    """Rows that stop early keep no tokens after EOS, whatever the others in their batch do."""
    from .conftest import TableModel

    prompts = prompts_of(tokenizer, [10, 10, 10, 12], seed=5)
    table = {tuple(prompts[0]): [7], tuple(prompts[1]): [8, 9, 10], tuple(prompts[2]): [],
             tuple(prompts[3]): [11, 12]}
    model = TableModel(tokenizer.vocab_size, tokenizer.eos_id, table)
    runner = StateRunner(model, 16, "cpu", batch_size=8)
    assert runner.greedy(prompts, 10, tokenizer.eos_id) == [[7], [8, 9, 10], [], [11, 12]]
    assert runner.greedy(prompts, 2, tokenizer.eos_id) == [[7], [8, 9], [], [11, 12]]


def test_continuation_scores_equal_a_full_forward(tokenizer):
    model, recipe = tiny_model(tokenizer, "attention.window=24")
    contexts = prompts_of(tokenizer, [20, 35, 35, 50], seed=6)
    conts = [[[9], [10, 11, 12]], [[13, 14]], [[15]], [[16, 17, 18, 19, 20], [21]]]
    runner = StateRunner(model, recipe.memory.segment_len, "cpu", batch_size=3)
    scores = runner.continuation_scores(contexts, conts)
    with torch.no_grad():
        for ctx, options, got in zip(contexts, conts, scores, strict=True):
            for cont, (logprob, greedy) in zip(options, got, strict=True):
                logits, _ = model(torch.tensor([ctx + cont]), None)
                logp = torch.log_softmax(logits[0, len(ctx) - 1:-1].float(), dim=-1)
                want = float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
                assert logprob == pytest.approx(want, abs=1e-4)
                assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_batched_prefill_calls_are_never_split_by_the_model(tokenizer, monkeypatch):
    """A batched prefill feeds the model pieces it takes in one call (an lm2 model splits a longer no-grad call
    and concatenates the logits: a copy the runner avoids); one row gets lm2 generate's chunk; the answers stay
    those of one-at-a-time generation."""
    model, recipe = tiny_model(tokenizer, "attention.window=24")
    monkeypatch.setattr(type(model), "NO_GRAD_CHUNK_TOKENS", 256)  # 16 rows: 16 tokens per call, one segment
    split = []
    real = type(model)._hidden_in_chunks
    monkeypatch.setattr(type(model), "_hidden_in_chunks", lambda self, *a, **k: split.append(1) or real(self, *a, **k))
    prompts = prompts_of(tokenizer, [70] * 8 + [90] * 8)
    runner = StateRunner(model, recipe.memory.segment_len, "cpu", batch_size=16)
    assert runner.chunk_for(16) == 16 and runner.chunk_for(4) == 64 and runner.chunk_for(1) == runner.chunk_len
    assert runner.greedy(prompts, 6, tokenizer.eos_id) == one_at_a_time(model, recipe, tokenizer, prompts, 6)
    assert split == []
