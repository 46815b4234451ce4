"""Static-shape decoding (lm2cli.model.static): the same tokens and logits as eager decoding through the state,
for lm2, vanilla and rmt, across memory-segment boundaries and window wrap-around; and each fixed-shape function
compiles once, however many positions, segments and prompts follow."""

from __future__ import annotations

import json

import pytest
import torch

from lm2cli.model import build_model
from lm2cli.model.static import StaticDecoder
from lm2cli.recipe import load_recipe

SEGMENT, VOCAB = 8, 53


def tiny_model(arch: str, window: int):
    extra = {"lm2-slot-keys": ["memory.slot_keys=true"],
             "lm2-compete": ["memory.slot_keys=true", "memory.write=compete"],
             "lm2-delta": ["memory.write=delta"],
             "lm2-delta-value": ["memory.write=delta", "memory.value_window=3"]}.get(arch, [])
    arch = arch.split("-")[0]
    recipe = load_recipe(None, [*extra,
        f"model.arch={arch}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        f"model.vocab_size={VOCAB}", "model.init_std=0.3", "memory.slots=4", "memory.heads=2",
        f"memory.segment_len={SEGMENT}", f"attention.window={window}", "model.max_seq_len=96"])
    torch.manual_seed(0)
    return build_model(recipe).eval()


@torch.no_grad()
def eager_greedy(model, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    logits, state = model(prompt)
    out, token = [], logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        logits, state = model(token, state)
        out.append(logits[:, -1])
        token = logits[:, -1].argmax(-1, keepdim=True)
    return out, torch.stack([o.argmax(-1) for o in out], dim=1)


@torch.no_grad()
def static_greedy(model, decoder: StaticDecoder, prompt: torch.Tensor, steps: int):
    logits, state = model(prompt)
    decoder.load(state)
    out, token = [], logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        step_logits = decoder.decode(token)
        out.append(step_logits.clone())
        token = step_logits.argmax(-1, keepdim=True)
    return out, torch.stack([o.argmax(-1) for o in out], dim=1)


@pytest.mark.parametrize("arch", ["lm2", "lm2-slot-keys", "lm2-compete", "lm2-delta", "lm2-delta-value", "vanilla",
                                  "rmt"])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("prompt_len", [13, 16])  # prefill ends inside a segment / exactly on a boundary
def test_static_decoding_equals_eager_decoding(arch, window, prompt_len):
    model = tiny_model(arch, window)
    prompt = torch.randint(0, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    steps = 4 * SEGMENT + 3  # several memory writes / RMT segments; a window of 5 wraps its ring many times
    eager_logits, eager_tokens = eager_greedy(model, prompt, steps)
    decoder = StaticDecoder(model, batch_size=2)
    static_logits, static_tokens = static_greedy(model, decoder, prompt, steps)
    assert torch.equal(static_tokens, eager_tokens)
    difference = max((s - e).abs().max().item() for s, e in zip(static_logits, eager_logits, strict=True))
    assert difference <= 5e-4  # float rounding (RMT's read prefix runs apart from the first token: 1e-4)
    # every step's top two logits are further apart than twice that: equal tokens are not luck
    top2 = torch.stack(eager_logits).topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * difference


def test_static_decoding_really_uses_its_state():
    """A decoder whose memory write is skipped drifts from eager decoding: the equality above is not vacuous."""
    model = tiny_model("lm2", 5)
    prompt = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))
    eager_logits, _ = eager_greedy(model, prompt, 3 * SEGMENT)
    decoder = StaticDecoder(model)
    decoder._write = lambda: None
    static_logits, _ = static_greedy(model, decoder, prompt, 3 * SEGMENT)
    assert max((s - e).abs().max().item() for s, e in zip(static_logits, eager_logits, strict=True)) > 1e-3


class CountingBackend:
    """A torch.compile backend that records every graph it is asked to compile and runs it as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("arch,functions", [("lm2", 2), ("vanilla", 1), ("rmt", 2)])
def test_each_fixed_shape_function_compiles_once(arch, functions):
    """step (+ write_memory for lm2, + rmt_boundary for rmt): one graph each for every position, segment
    boundary, window wrap and a second prompt of another length (fullgraph: no graph breaks either)."""
    torch._dynamo.reset()
    backend = CountingBackend()
    model = tiny_model(arch, 5)
    decoder = StaticDecoder(model, batch_size=1, compile=True, backend=backend)
    for prompt_len in (11, 16):
        prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        _, static_tokens = static_greedy(model, decoder, prompt, 3 * SEGMENT + 2)
        _, eager_tokens = eager_greedy(model, prompt, 3 * SEGMENT + 2)
        assert torch.equal(static_tokens, eager_tokens)
    assert backend.graphs == functions


# ------------------------------------------------------------------------------------- lm2 generate --compile


@pytest.fixture
def traced_only(monkeypatch):
    """Compile with Dynamo's "eager" backend: the same graph capture (fullgraph, fixed shapes) without the minutes
    of C++ code generation that inductor needs on a CPU; counts the graphs."""
    from lm2cli.model import static

    backend = CountingBackend()
    monkeypatch.setattr(static, "compile_options", lambda device: {"backend": backend})
    torch._dynamo.reset()
    return backend


@pytest.mark.parametrize("arch", ["lm2", "rmt"])
def test_generator_with_compile_gives_the_eager_text(tokenizer, traced_only, arch):
    from lm2cli.generation.sampling import SamplingParams

    eager, compiled = eager_and_compiled(arch, tokenizer)
    assert traced_only.graphs == 2  # step and the segment boundary, compiled before the first prompt
    for params in (SamplingParams(temperature=0.0, max_new_tokens=30, min_new_tokens=30),
                   SamplingParams(temperature=1.0, top_k=20, seed=5, max_new_tokens=30, min_new_tokens=30)):
        for prompt in ("Mary went to the kitchen.", "John"):
            assert compiled.generate(prompt, params).token_ids == eager.generate(prompt, params).token_ids
    assert traced_only.graphs == 2


def test_cli_compile_flag_and_recipe_key(cli, tokenizer, traced_only, tmp_path):
    from .test_cli_generate import save_run

    args = ["--prompt", "Mary went to the", "--greedy", "--max-new-tokens", "40", "--min-new-tokens", "40", "--json"]
    run = save_run(tmp_path / "run", tokenizer)
    eager = cli("generate", run, *args)
    flag = cli("generate", run, *args, "--compile")
    keyed = cli("generate", save_run(tmp_path / "keyed", tokenizer, ["generate.compile=true"]), *args)
    for res in (eager, flag, keyed):
        assert res.code == 0, res.err
    assert "compiled" not in eager.err and "compiled static-shape decoding" in flag.err and "compiled" in keyed.err
    assert json.loads(flag.out)["text"] == json.loads(keyed.out)["text"] == json.loads(eager.out)["text"]
    assert traced_only.graphs > 0


def test_compile_is_not_a_per_prompt_setting(cli, tokenizer, tmp_path):
    from .test_cli_generate import save_run

    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "Mary", "compile": true}\n')
    res = cli("generate", save_run(tmp_path / "run", tokenizer), "--prompts", rows)
    assert res.code == 2 and "unknown key 'compile'" in res.err


@pytest.mark.slow
def test_generator_compiled_by_inductor_gives_the_eager_tokens(tokenizer):
    """The real compilation `lm2 generate --compile` uses on this device (inductor, C++ wrapper on a CPU):
    tens of seconds with a warm compiler cache, minutes without."""
    from lm2cli.generation.sampling import SamplingParams

    torch._dynamo.reset()
    eager, compiled = eager_and_compiled("lm2", tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=3 * SEGMENT, min_new_tokens=3 * SEGMENT)
    prompt = "Mary went to the kitchen."
    assert compiled.generate(prompt, params).token_ids == eager.generate(prompt, params).token_ids


def eager_and_compiled(arch, tokenizer):
    """The same small model behind an eager and a compiled (warmed-up) generator."""
    from lm2cli.generation.generator import Generator

    recipe = load_recipe(None, [f"model.arch={arch}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                                "model.init_std=0.3", "memory.slots=4", "memory.heads=2",
                                f"memory.segment_len={SEGMENT}", "attention.window=6"])
    torch.manual_seed(0)
    model = build_model(recipe, vocab_size=tokenizer.vocab_size)
    eager = Generator(model, tokenizer, recipe, device="cpu")
    compiled = Generator(model, tokenizer, recipe, device="cpu", compile=True)
    compiled.warm_up()
    return eager, compiled


def test_the_key_window_has_no_static_step_and_generate_compile_says_so(tmp_path):
    """memory.key_window > 1 reads the open segment's earlier queries, which the static step does not keep:
    StaticDecoder refuses it and `Generator(compile=True)` says so in one line (the eager decoder serves it)."""
    from lm2cli.errors import Lm2Error
    from lm2cli.generation.generator import Generator

    overrides = ["model.arch=lm2", "memory.write=delta", "memory.key_window=3", "model.d_model=32", "model.n_layers=2",
                 "model.n_heads=4", f"model.vocab_size={VOCAB}", "memory.heads=2", f"memory.segment_len={SEGMENT}"]
    recipe = load_recipe(None, overrides)
    model = build_model(recipe).eval()
    with pytest.raises(ValueError, match="key_window"):
        StaticDecoder(model, batch_size=1)
    with pytest.raises(Lm2Error, match="memory.key_window = 3 has no static-shape decode step yet; generate without "
                                       "--compile"):
        Generator(model, None, recipe, device="cpu", compile=True)
