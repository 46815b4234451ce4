"""What the GPU training path relies on, checked on the CPU: bf16 autocast keeps the memory bank in float32,
and `compile_blocks` (train.compile) trains exactly like the eager model with one compilation for all blocks."""

from __future__ import annotations

import pytest
import torch

from lm2cli import build_model, load_recipe

VOCAB = 61


def tiny(arch: str, window: int = 8):
    recipe = load_recipe(None, [
        f"model.arch={arch}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        f"model.vocab_size={VOCAB}", "memory.slots=5", "memory.slot_dim=12", "memory.heads=2",
        f"memory.segment_len={40 if arch == 'rmt' else 32}", f"attention.window={window}",
        # memory.out_gate_bias=0: the gate open (0.5, not the default 0.018), so the
        # memory path is loud enough for these checks to test it
        "memory.out_gate_bias=0"])
    torch.manual_seed(0)
    return build_model(recipe).train()


def test_bf16_autocast_keeps_the_bank_float32_and_close_to_fp32():
    model = tiny("lm2")
    x = torch.randint(0, VOCAB, (2, 80))
    full, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(x)
    banks = [ls.memory.bank for ls in state.layers if ls.memory is not None]
    assert len(banks) == 2 and all(b.dtype == torch.float32 for b in banks)
    assert logits.dtype == torch.float32
    # bf16 rounding (8 mantissa bits: ~0.4 % relative per operation), not a different computation: the relative
    # RMS error is 1.0-1.2 % over inputs and weight draws (the largest single error, 1.4-2.7 % of the largest
    # logit, is too noisy a statistic to bound)
    assert (logits - full).norm() < 0.02 * full.norm()
    assert (logits - full).abs().max() > 0  # and autocast really ran in bf16


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs += 1
        run_as_traced = lambda graph, _: make_boxed_func(graph.forward)  # noqa: E731
        return aot_autograd(fw_compiler=run_as_traced)(gm, example_inputs)  # forward and backward via AOTAutograd


@pytest.mark.parametrize("arch", ["lm2", "vanilla"])
def test_compiled_blocks_train_exactly_like_eager_and_compile_once(arch):
    """160 tokens with a window of 8: the block-local attention path, 5 memory segments per block."""
    torch._dynamo.reset()
    x = torch.randint(0, VOCAB, (2, 160))
    results = []
    backend = CountingBackend()
    for compiled in (False, True):
        model = tiny(arch)
        if compiled:
            model.compile_blocks(backend=backend, fullgraph=True)
        for _ in range(2):  # a second step reuses the compilation
            model.zero_grad()
            logits, _ = model(x, keep_state=False)
            logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_logits, eager_grads), (logits, grads) = results
    assert torch.allclose(logits, eager_logits, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, eager_grads, strict=True))
    assert backend.graphs == 1  # one graph serves both blocks and both steps
    state_keys = set(model.state_dict())
    assert not any("_orig_mod" in k for k in state_keys)  # compiled in place: checkpoints keep plain names
