"""The generation loop on a small model that follows the lm2 model contract (see conftest.RunningMeanLM).

The same properties are checked on the real LM2 / vanilla / RMT models in test_generator_parity.py.
"""

from __future__ import annotations

import pytest
import torch

from lm2cli.errors import Lm2Error
from lm2cli.generation.generator import Generator
from lm2cli.generation.sampling import SamplingParams
from lm2cli.recipe import load_recipe


def make_generator(model, tokenizer, *overrides):
    recipe = load_recipe(None, ["memory.segment_len=8", *overrides])
    return Generator(model, tokenizer, recipe, device="cpu")


def full_forward_greedy(model, prompt_ids, n):
    """Reference: recompute the whole sequence every step and take the argmax of the last position."""
    ids = list(prompt_ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]), None)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_greedy_equals_argmax_of_full_forward(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer)
    prompt = gen.encode_prompt("Mary went to the kitchen and then")
    res = gen.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=30, min_new_tokens=30))
    assert res.token_ids == full_forward_greedy(mock_lm, prompt, 30)


def test_prefill_goes_in_whole_segments(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer)
    prompt = [tokenizer.bos_id] + tokenizer.encode("Mary went to the kitchen. " * 80)
    mock_lm.calls.clear()
    gen.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=3, min_new_tokens=3))
    prefill_calls = mock_lm.calls[:-2]
    assert sum(prefill_calls) == len(prompt) and len(prompt) > gen.chunk_len
    assert all(c == gen.chunk_len for c in prefill_calls[:-1]) and gen.chunk_len % 8 == 0
    assert mock_lm.calls[-2:] == [1, 1]  # then one token per step; the last token is not fed back


def test_seeded_sampling_is_reproducible(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=40, min_new_tokens=40, seed=7)
    a = gen.generate("Mary went", params)
    b = gen.generate("Mary went", params)
    c = gen.generate("Mary went", params.with_overrides(seed=8))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_streamed_text_equals_final_text_and_full_decode(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer)
    streamed = []
    prompt = gen.encode_prompt("Ça coûte")
    res = gen.generate(prompt, SamplingParams(temperature=1.2, max_new_tokens=60, min_new_tokens=60, seed=3),
                       on_text=streamed.append)
    assert "".join(streamed) == res.text
    assert res.text == tokenizer.decode(prompt + res.token_ids)[len(tokenizer.decode(prompt)):]
    assert res.stop_reason == "length" and res.new_tokens == 60


def test_eos_stops_generation(mock_lm, tokenizer):
    with torch.no_grad():
        mock_lm.bias[tokenizer.eos_id] = 1e4  # EOS always wins
    gen = make_generator(mock_lm, tokenizer)
    res = gen.generate("Mary", SamplingParams(temperature=0.0, max_new_tokens=10))
    assert res.stop_reason == "eos" and res.token_ids == [tokenizer.eos_id] and res.text == ""
    res = gen.generate("Mary", SamplingParams(temperature=0.0, max_new_tokens=10, min_new_tokens=4))
    assert res.token_ids[:4].count(tokenizer.eos_id) == 0 and res.token_ids[4] == tokenizer.eos_id


def pick_stop(text):
    """A stop string that occurs in `text`, spans token boundaries and is not at the very start."""
    for length in (5, 4, 3):
        for i in range(len(text) // 3, len(text) - length):
            s = text[i:i + length]
            if text.find(s) == i and s.strip():
                return i, s
    pytest.skip("generated text too short")


def test_stop_string_cuts_output_across_token_boundaries(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=60, min_new_tokens=60, seed=11)
    free = gen.generate("Mary went", params)
    at, stop = pick_stop(free.text)
    assert not any(stop in tokenizer.decode([t]) for t in free.token_ids)  # it spans several tokens
    streamed = []
    res = gen.generate("Mary went", params.with_overrides(stop=[stop, "never there"]), on_text=streamed.append)
    assert res.stop_reason == "stop"
    assert res.text == free.text[:at] == "".join(streamed)
    assert res.token_ids == free.token_ids[:res.new_tokens]  # same draws until the stop completed
    prompt = gen.encode_prompt("Mary went")

    def continuation(ids):
        return tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]

    assert continuation(res.token_ids).find(stop) == at  # the last token completed the stop string
    assert stop not in continuation(res.token_ids[:-1])


def test_empty_prompt_is_refused(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer)
    for prompt in ("", "   "):
        with pytest.raises(Lm2Error, match="empty"):
            gen.generate(prompt, SamplingParams())


def test_full_attention_length_limit(mock_lm, tokenizer):
    gen = make_generator(mock_lm, tokenizer, "attention.window=0", "model.max_seq_len=20")
    with pytest.raises(Lm2Error, match="max_seq_len = 20"):
        gen.generate("Mary went to the kitchen", SamplingParams(max_new_tokens=15))
    for unlimited in (["attention.window=4"], ["model.arch=rmt", "attention.window=0"]):
        gen = make_generator(mock_lm, tokenizer, *unlimited, "model.max_seq_len=20")
        res = gen.generate("Mary went to the kitchen", SamplingParams(max_new_tokens=15, min_new_tokens=15))
        assert res.new_tokens == 15


def test_top_k_1_and_tiny_top_p_sample_the_greedy_tokens(mock_lm, tokenizer):
    """Sampling restricted to a support of one token can only follow the argmax, whatever the seed."""
    gen = make_generator(mock_lm, tokenizer)
    greedy = gen.generate("Mary went", SamplingParams(temperature=0.0, max_new_tokens=25, min_new_tokens=25))
    for seed in range(3):
        for restrict in ({"top_k": 1}, {"top_p": 1e-6}):
            params = SamplingParams(temperature=1.5, max_new_tokens=25, min_new_tokens=25, seed=seed, **restrict)
            assert gen.generate("Mary went", params).token_ids == greedy.token_ids


def test_result_summary_fields(mock_lm, tokenizer):
    res = make_generator(mock_lm, tokenizer).generate("Mary", SamplingParams(max_new_tokens=5))
    s = res.summary()
    assert set(s) == {"text", "prompt_tokens", "new_tokens", "stop_reason", "prefill_tokens_per_s",
                      "decode_tokens_per_s"}
    assert s["prompt_tokens"] == 1 + len(tokenizer.encode("Mary")) and s["decode_tokens_per_s"] > 0
