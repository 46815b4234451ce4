"""Logit processors and token choice, on mock logits."""

from __future__ import annotations

import pytest
import torch

from lm2cli.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    choose_next,
    make_rng,
    process_logits,
)


def random_logits(batch=4, vocab=50, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits()
    params = SamplingParams(temperature=0.0)
    assert torch.equal(choose_next(process_logits(logits, torch.empty(4, 0, dtype=torch.long), params), params, None),
                       logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_samples_outside_the_k_largest(k):
    logits = random_logits(batch=3, vocab=40, seed=k)
    params = SamplingParams(temperature=1.5, top_k=k)
    support = torch.topk(logits, k, dim=-1).indices
    rng = make_rng(0)
    processed = process_logits(logits, torch.empty(3, 0, dtype=torch.long), params)
    assert (torch.isfinite(processed).sum(-1) == k).all()
    draws = 400  # many rows at once: one call, same code path as a single draw
    picked = choose_next(processed.repeat_interleave(draws, 0), params, rng).view(3, draws)
    for b in range(3):
        assert set(picked[b].tolist()) <= set(support[b].tolist())
    assert len(set(picked[0].tolist())) == k  # every token of the support does get picked


def test_top_k_with_ties_keeps_exactly_k():
    logits = torch.zeros(1, 10)
    assert torch.isfinite(apply_top_k(logits, 3)).sum() == 3


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = random_logits(batch=5, vocab=30, seed=7)
    kept = torch.isfinite(apply_top_p(logits, p))
    probs = torch.softmax(logits, -1)
    for b in range(5):
        order = probs[b].argsort(descending=True)
        cum = probs[b][order].cumsum(0)
        n_expected = int((cum < p).sum()) + 1  # tokens until the mass first reaches p
        expected = set(order[:n_expected].tolist())
        assert set(kept[b].nonzero().flatten().tolist()) == expected


def test_top_p_sampling_stays_in_the_nucleus():
    logits = random_logits(batch=2, vocab=25, seed=3)
    params = SamplingParams(temperature=1.0, top_p=0.6)
    processed = process_logits(logits, torch.empty(2, 0, dtype=torch.long), params)
    allowed = torch.isfinite(processed)
    rng = make_rng(1)
    picked = choose_next(processed.repeat_interleave(500, 0), params, rng).view(2, 500)
    seen = torch.zeros_like(allowed).scatter(1, picked, True)
    assert not (seen & ~allowed).any()
    assert seen.sum() > 2  # it does sample, not always the top token


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [[True, False, False]]


def test_top_k_and_top_p_combine():
    logits = random_logits(batch=1, vocab=30, seed=11)
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.5)
    kept = torch.isfinite(process_logits(logits, torch.empty(1, 0, dtype=torch.long), params))
    top5 = set(torch.topk(logits, 5).indices[0].tolist())
    assert set(kept[0].nonzero().flatten().tolist()) <= top5


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    context = torch.tensor([[0, 1, 1]])  # repeated ids count once
    out = apply_repetition_penalty(logits, context, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_repetition_window_only_counts_recent_tokens():
    logits = torch.tensor([[2.0, 2.0, 2.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0, repetition_window=2)
    out = process_logits(logits, torch.tensor([[0, 1, 2, 2]]), params)
    assert out.tolist() == [[2.0, 2.0, 0.5]]
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert process_logits(logits, torch.tensor([[0, 1]]), params).tolist() == [[0.5, 0.5, 2.0]]


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert choose_next(process_logits(logits, torch.tensor([[0]]), params), params, None).item() == 1


def test_same_seed_same_draws_different_seed_different_draws():
    logits = random_logits(batch=1, vocab=100, seed=5) / 3
    params = SamplingParams(temperature=1.0)

    def draws(seed):
        rng = make_rng(seed)
        return [choose_next(logits, params, rng).item() for _ in range(50)]

    assert draws(42) == draws(42)
    assert draws(42) != draws(43)


def test_sampling_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    choose_next(random_logits(), SamplingParams(temperature=1.0), make_rng(3))
    assert torch.equal(torch.rand(1), expected)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    ctx = torch.empty(1, 0, dtype=torch.long)
    cold = torch.softmax(process_logits(logits, ctx, SamplingParams(temperature=0.1)), -1)
    hot = torch.softmax(process_logits(logits, ctx, SamplingParams(temperature=10.0)), -1)
    assert cold[0, 0] > 0.99 and hot[0, 0] < 0.4


def test_params_from_recipe_and_overrides():
    from lm2cli.recipe import load_recipe

    params = SamplingParams.from_recipe(load_recipe(None, ['generate.stop=["\\n"]', "generate.top_k=7"]).generate)
    assert params.stop == ("\n",) and params.top_k == 7
    assert params.with_overrides(greedy=True, top_k=None).greedy
    assert params.with_overrides(greedy=True).top_k == 7
    assert params.with_overrides(stop=["x"]).stop == ("x",)


def test_temperature_comes_before_top_p():
    """At T = 2 the distribution is flatter, so the nucleus is larger: softmax([3, 2, 1, 0] / 2) is
    [0.455, 0.276, 0.167, 0.102], and p = 0.5 keeps the first two tokens (the mass above the third is 0.731).
    Filtering the raw logits first would keep only token 0 (its probability alone is 0.644)."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=2.0, top_p=0.5)
    processed = process_logits(logits, torch.empty(1, 0, dtype=torch.long), params)
    assert torch.isfinite(processed).tolist() == [[True, True, False, False]]
    probs = torch.softmax(processed, -1)[0]
    e = torch.exp(torch.tensor([1.5, 1.0]))
    assert probs.tolist() == pytest.approx([(e[0] / e.sum()).item(), (e[1] / e.sum()).item(), 0.0, 0.0], abs=1e-6)


def test_temperature_scales_the_logits_kept_by_top_k():
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0]])
    params = SamplingParams(temperature=0.5, top_k=2)
    processed = process_logits(logits, torch.empty(1, 0, dtype=torch.long), params)
    assert processed[0, [0, 2]].tolist() == [8.0, 6.0] and torch.isinf(processed[0, [1, 3, 4]]).all()


@pytest.mark.parametrize("logits, k, kept", [
    ([0.0] * 10, 3, [0, 1, 2]),
    ([0.0, 5.0, 0.0, 5.0, 0.0, 5.0], 2, [1, 3]),
    ([1.0] + [0.0] * 36, 3, [0, 1, 2]),
    ([2.0, 1.0, 2.0, 1.0, 1.0, 3.0], 4, [0, 1, 2, 5]),
])
def test_top_k_breaks_ties_by_the_lower_id(logits, k, kept):
    """docs/generation.md: exactly K tokens, ties broken by id (the lower id is kept)."""
    out = apply_top_k(torch.tensor([logits]), k)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept
    assert out[0, kept].tolist() == [logits[i] for i in kept]


def test_repetition_penalty_divides_small_positive_logits_too():
    """A seen token with a logit in (0, 1] is divided as well (made less likely), zero stays zero."""
    logits = torch.tensor([[0.5, 1.0, 0.0, -0.5, 0.5]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 2, 3]]), 2.0)
    assert out.tolist() == [[0.25, 0.5, 0.0, -1.0, 0.5]]
