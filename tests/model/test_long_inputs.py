"""Long inputs cost linear time. Block-local windowed attention equals the dense windowed attention it replaces
(logits and gradients), stays causal, and never builds anything of size T x T; a long forward without autograd
runs through the state in chunks and equals one call."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm2cli import build_model, load_recipe
from lm2cli.model import MemoryRecorder
from lm2cli.model import model as model_module

VOCAB = 61
WINDOW = 6
ARCHS = ["lm2", "vanilla", "rmt"]


def tiny(arch: str, window: int = WINDOW, segment: int = 8):
    recipe = load_recipe(None, [
        f"model.arch={arch}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        f"model.vocab_size={VOCAB}", "memory.slots=5", "memory.slot_dim=12", "memory.heads=2",
        # memory.out_gate_bias=0: the gate open (0.5, not the default 0.018), so the
        # memory path is loud enough for these checks to test it
        f"memory.segment_len={segment}", f"attention.window={window}", "memory.out_gate_bias=0"])
    torch.manual_seed(0)
    return build_model(recipe)


def dense_only(monkeypatch):
    """The implementation before block-local attention: a (t, n_cached + t) mask for every windowed input."""
    monkeypatch.setattr(model_module, "MIN_LOCAL_BLOCK", 10**9)


def logits_and_grads(model, x):
    model.zero_grad()
    logits, _ = model(x)
    (logits.logsumexp(-1) * torch.linspace(0.5, 1.5, x.shape[1])).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block", [8, 64])  # queries per block: several blocks of a window each, or one wide block
def test_block_local_equals_dense_windowed_attention(arch, block, monkeypatch):
    # RMT runs attention per segment: make the segment long enough to take the block-local path inside it.
    model = tiny(arch, segment=130 if arch == "rmt" else 8)
    x = torch.randint(0, VOCAB, (2, 150))  # not a multiple of the block: the last block is padded
    monkeypatch.setattr(model_module, "MIN_LOCAL_BLOCK", block)
    calls = []
    real_attend = model_module.LocalBlocks.attend
    monkeypatch.setattr(model_module.LocalBlocks, "attend", lambda self, *a: calls.append(1) or real_attend(self, *a))
    local_logits, local_grads = logits_and_grads(model, x)
    assert calls, "the block-local path was not taken"
    dense_only(monkeypatch)
    dense_logits, dense_grads = logits_and_grads(model, x)
    assert (local_logits - dense_logits).abs().max() <= 1e-5
    assert local_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        assert torch.allclose(local_grads[name], grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("arch", ARCHS)
def test_block_local_through_the_state_equals_one_dense_forward(arch, monkeypatch):
    """Chunks longer than a block continue a state whose cache holds W - 1 keys: the padding before the first
    query is then partly real keys."""
    model = tiny(arch, segment=130 if arch == "rmt" else 8).eval()
    x = torch.randint(0, VOCAB, (2, 173))
    monkeypatch.setattr(model_module, "MIN_LOCAL_BLOCK", 8)
    with torch.no_grad():
        state, outs = None, []
        for i in range(0, x.shape[1], 50):
            logits, state = model(x[:, i:i + 50], state)
            outs.append(logits)
        dense_only(monkeypatch)
        full, _ = model(x)
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_block_local_attention_is_causal(arch, monkeypatch):
    model = tiny(arch, segment=130 if arch == "rmt" else 8).eval()
    monkeypatch.setattr(model_module, "MIN_LOCAL_BLOCK", 8)
    x = torch.randint(0, VOCAB, (1, 120))
    with torch.no_grad():
        base, _ = model(x)
        for t in (5, 7, 8, 15, 16, 63, 100):  # inside blocks and on block edges
            changed = x.clone()
            changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
            out, _ = model(changed)
            assert (out[:, :t + 1] - base[:, :t + 1]).abs().max() <= 1e-6, f"position <= {t} saw the future"
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-4  # and the check can fail


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def largest_tensor_of_a_training_pass(model, t: int) -> int:
    x = torch.randint(0, VOCAB, (1, t))
    model.zero_grad()
    with LargestTensor() as seen:
        logits, _ = model(x, keep_state=False)
        logits.logsumexp(-1).mean().backward()
    return seen.largest


@pytest.mark.parametrize("arch", ["lm2", "vanilla"])
def test_a_long_windowed_pass_builds_nothing_quadratic(arch):
    """Doubling T at most doubles the largest tensor of a forward and backward (a T x T mask or score matrix
    would quadruple it): masks, scores and memory reads and writes all stay linear in T."""
    model = tiny(arch, segment=64)
    short, long = largest_tensor_of_a_training_pass(model, 512), largest_tensor_of_a_training_pass(model, 1024)
    assert long <= 2 * short


@pytest.mark.parametrize("arch", ["lm2", "vanilla"])
def test_a_long_no_grad_forward_runs_in_chunks_and_equals_one_call(arch, monkeypatch):
    model = tiny(arch).eval()
    x = torch.randint(0, VOCAB, (2, 150))
    one_call, one_state = model(x)  # autograd on: never chunked
    calls = []
    real_forward, real_hidden = model.forward, model.final_hidden
    monkeypatch.setattr(model, "final_hidden",
                        lambda ids, *a, **k: calls.append(ids.shape[1]) or real_hidden(ids, *a, **k))
    monkeypatch.setattr(model_module.LanguageModel, "NO_GRAD_CHUNK_TOKENS", 64)  # 2 rows x 32 tokens
    with torch.no_grad():
        chunked, state = real_forward(x)
        dropped = real_forward(x, keep_state=False)
        rec_chunked, rec_one = MemoryRecorder(), MemoryRecorder()
        real_forward(x, recorder=rec_chunked)
    assert calls[:6] == [150, 32, 32, 32, 32, 22]  # the call, then whole segments of 8 tokens and the rest
    assert (chunked - one_call).abs().max() <= 1e-4 and state.pos == one_state.pos == 150
    assert dropped[1] is None and (dropped[0] - chunked).abs().max() == 0
    if arch == "lm2":
        model(x, recorder=rec_one)
        assert [w.end_pos for w in rec_chunked.writes[0]] == [w.end_pos for w in rec_one.writes[0]]
        assert rec_chunked.read_attention(0).shape == rec_one.read_attention(0).shape


@pytest.mark.parametrize("block", [8, 10**9])  # the block-local path and the dense (t, n_cached + t) mask
def test_grouped_heads_repeated_for_the_fused_cuda_kernels_give_the_same_attention(block, monkeypatch):
    """On CUDA a masked attention with grouped key/value heads repeats them per group (the fused kernels need
    equal head counts); forced here on the CPU, logits and gradients equal the grouped call's."""
    model = tiny("lm2")
    x = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(model_module, "MIN_LOCAL_BLOCK", block)
    grouped_logits, grouped_grads = logits_and_grads(model, x)
    repeated = []
    real_sdpa = model_module.F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kw):
        repeated.append(k.shape[1] == q.shape[1] and kw.get("attn_mask") is not None)
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(model_module, "fused_kernels_need_equal_heads", lambda q: True)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", counting_sdpa)
    logits, grads = logits_and_grads(model, x)
    assert any(repeated), "no masked attention ran with repeated heads"
    assert (logits - grouped_logits).abs().max() <= 1e-5
    for name, grad in grouped_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("arch", ARCHS + ["lm2-delta"])
def test_logits_at_the_targets_give_the_loss_gradients_and_hits_of_the_full_logits(arch):
    """A training step asks for the logits of its target positions only (`logits_at`): the summed loss, every
    gradient and the exact-match hits equal those from the full (B, T, V) logits; a row without a target counts
    nowhere, one whose answer is partly wrong is a miss."""
    from lm2cli.scoring import IGNORE, answer_hits, loss_sum

    if arch == "lm2-delta":
        recipe = load_recipe(None, ["model.arch=lm2", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                                    "model.n_kv_heads=2", f"model.vocab_size={VOCAB}", "memory.heads=2",
                                    "memory.segment_len=8", "memory.write=\"delta\"", "memory.out_gate_bias=0"])
        torch.manual_seed(0)
        model = build_model(recipe)
    else:
        model = tiny(arch)
    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))
    targets = torch.full_like(x, IGNORE)
    targets[0, 30:33] = x[0, 31:34]
    targets[2, 5] = x[2, 6]
    targets[2, 39] = 7
    results = []
    for at in (None, targets != IGNORE):
        model.zero_grad()
        logits, _ = model(x, keep_state=False, logits_at=at)
        loss = loss_sum(logits, targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits, loss.detach(), grads))
    (full, full_loss, full_grads), (packed, packed_loss, packed_grads) = results
    assert packed.shape == (5, VOCAB) and torch.allclose(packed, full[targets != IGNORE], atol=1e-5)
    assert torch.allclose(packed_loss, full_loss, rtol=1e-5) and full_grads.keys() == packed_grads.keys()
    assert all(torch.allclose(full_grads[n], packed_grads[n], rtol=1e-4, atol=1e-6) for n in full_grads)
    assert answer_hits(full, targets).tolist() == answer_hits(packed, targets).tolist()
    forced = torch.zeros(3, 40, VOCAB)  # row 0 right at every answer position, row 2 right at one of two
    forced[0, torch.arange(30, 33), x[0, 31:34]] = 1.0
    forced[2, 5, x[2, 6]] = 1.0
    assert answer_hits(forced, targets).tolist() == [1, 2]
    assert answer_hits(forced[targets != IGNORE], targets).tolist() == [1, 2]
