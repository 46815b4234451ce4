"""Model core: causality, incremental = full, gradients, truncated BPTT, recorder, reports (all three archs)."""

from __future__ import annotations

import pytest
import torch

from lm2cli import build_model, load_recipe
from lm2cli.model import MemoryRecorder

VOCAB = 61


def tiny(arch: str, window: int = 0, *extra: str):
    # N = 5 slots, S = 8, d = 32, d_m = 12: no size tied to another.
    if arch == "lm2-normalized":  # LM2 with the bounded bank update (memory.update)
        arch, extra = "lm2", ("memory.update=normalized", *extra)
    if arch == "lm2-slot-keys":  # LM2 with a learned per-slot key term (memory.slot_keys)
        arch, extra = "lm2", ("memory.slot_keys=true", *extra)
    if arch == "lm2-compete":  # LM2 whose tokens share their write over the slots (memory.write), slot keys on
        arch, extra = "lm2", ("memory.write=compete", "memory.slot_keys=true", "memory.update=normalized", *extra)
    if arch == "lm2-delta":  # LM2 with the associative bank written by the delta rule (memory.write)
        arch, extra = "lm2", ("memory.write=delta", *extra)
    if arch == "lm2-delta-window":  # the same with keys and queries mixed over 3 tokens back (memory.key_window)
        # and values over 2 tokens ahead (memory.value_window: the causality test shows that it does not leak)
        arch, extra = "lm2", ("memory.write=delta", "memory.key_window=3", "memory.value_window=2", *extra)
    recipe = load_recipe(None, [
        f"model.arch={arch}", "model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
        f"model.vocab_size={VOCAB}", "memory.slots=5", "memory.slot_dim=12", "memory.heads=2",
        # memory.out_gate_bias=0: the gate open (0.5, not the default 0.018), so the
        # memory path is loud enough for these checks to test it
        "memory.segment_len=8", f"attention.window={window}", "memory.out_gate_bias=0",
        *extra])
    torch.manual_seed(0)
    return build_model(recipe)


ARCHS = [("lm2", 0), ("lm2", 6), ("lm2-normalized", 6), ("lm2-slot-keys", 6), ("lm2-compete", 6),
         ("lm2-delta", 0), ("lm2-delta", 6), ("lm2-delta-window", 6), ("vanilla", 0), ("vanilla", 6), ("rmt", 0),
         ("rmt", 6)]


@pytest.mark.parametrize("arch,window", ARCHS)
def test_future_tokens_never_change_past_logits(arch, window):
    model = tiny(arch, window).eval()
    x = torch.randint(0, VOCAB, (2, 45))  # 5.6 segments: several boundaries, last one open
    with torch.no_grad():
        base, _ = model(x)
        tol = 1e-6 * max(1.0, base.abs().max().item())  # float32 rounding of logits of this size; a leak is O(1)
        for t in (0, 7, 8, 20, 31, 43):
            changed = x.clone()
            changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
            out, _ = model(changed)
            assert (out[:, :t + 1] - base[:, :t + 1]).abs().max() <= tol, f"position <= {t} saw the future"
        for t in (2, 3):  # short inputs without a cache take a different mask path
            assert (model(x[:, :t])[0][:, 0] - base[:, 0]).abs().max() <= tol
        # and the test can fail: changing a token does change later logits
        changed = x.clone()
        changed[:, 3] = (changed[:, 3] + 1) % VOCAB
        assert (model(changed)[0][:, 3:] - base[:, 3:]).abs().max() > 1e-4


@pytest.mark.parametrize("arch,window", ARCHS)
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_decoding_equals_full_forward(arch, window, chunk):
    model = tiny(arch, window).eval()
    x = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        full, _ = model(x)
        state, outs = None, []
        for i in range(0, x.shape[1], chunk):
            logits, state = model(x[:, i:i + chunk], state)
            outs.append(logits)
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-4
    assert state.pos == 37


def test_window_bounds_the_kv_cache():
    model = tiny("lm2", 6).eval()
    with torch.no_grad():
        _, state = model(torch.randint(0, VOCAB, (1, 50)))
    assert all(ls.k.shape[2] == 5 for ls in state.layers)  # W - 1 keys: enough for the next token


def test_memory_heads_must_divide_both_widths():
    from lm2cli.model.memory import LM2Memory

    with pytest.raises(ValueError, match="memory heads must divide d_model and slot_dim"):
        LM2Memory(8, 4, 6, 4, 8, "identity", 0.0, 1.0)


def test_memory_layers_subset_and_params():
    model = tiny("lm2", 0, "memory.layers=[1]")
    assert [b.memory is not None for b in model.blocks] == [False, True, False]
    report = model.param_report()
    assert report["memory"] > 0 and report["total"] == sum(p.numel() for p in model.parameters())
    assert tiny("vanilla").param_report()["memory"] == 0
    first_two = tiny("lm2", 0, "memory.layers=2")
    assert [b.memory is not None for b in first_two.blocks] == [True, True, False]


@pytest.mark.parametrize("arch", ["lm2", "lm2-slot-keys", "lm2-compete", "lm2-delta", "lm2-delta-window", "rmt"])
def test_every_memory_parameter_gets_a_gradient(arch):
    model = tiny(arch, 4, "memory.init=learned")
    x = torch.randint(0, VOCAB, (2, 33))  # 4 full segments + 1 token: memory written and read several times
    logits, _ = model(x)
    logits.float().logsumexp(-1).mean().backward()
    memory_params = [(n, p) for n, p in model.named_parameters() if model.is_memory_param(n)]
    assert memory_params
    # the learned initial bank (the delta rule's matrix starts empty: nothing to learn)
    assert any(n.endswith("bank0") for n, _ in memory_params) == (arch.startswith("lm2") and "delta" not in arch)
    assert any(n.endswith("key_mix") for n, _ in memory_params) == (arch == "lm2-delta-window")
    assert any(n.endswith("value_mix") for n, _ in memory_params) == (arch == "lm2-delta-window")
    assert any(n.endswith("slot_keys") for n, _ in memory_params) == (arch in ("lm2-slot-keys", "lm2-compete"))
    for name, p in memory_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def _grad_of_segment(model, bptt, segment):
    emb = model.tok_emb
    x = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    captured = {}

    def keep(_module, _inp, out):
        out.retain_grad()
        captured.setdefault("emb", out)

    handle = emb.register_forward_hook(keep)
    logits, _ = model(x, bptt=bptt)
    handle.remove()
    logits[:, -1].sum().backward()  # last token: window 4 keeps earlier segments out of its attention
    return captured["emb"].grad[:, 8 * segment:8 * segment + 8].abs().sum().item()


def _grad_of_first_segment(model, bptt):
    return _grad_of_segment(model, bptt, 0)


@pytest.mark.parametrize("arch", ["lm2", "rmt"])
def test_truncated_bptt_really_stops_gradients(arch):
    model = tiny(arch, 4)
    assert _grad_of_first_segment(model, bptt=0) > 0  # gradient reaches segment 0 only through memory
    # 4 segments of 8 tokens: the last token reads write 2 (of segment 2). bptt=1 keeps that write's history
    # only; segment 1 still reaches it through attention (window 4 spills into segment 2), segment 0 cannot.
    model.zero_grad()
    assert _grad_of_first_segment(model, bptt=1) == 0
    if arch == "lm2":  # (RMT's write suffix sees only the last W - 1 tokens of its segment)
        model.zero_grad()
        assert _grad_of_segment(model, bptt=1, segment=2) > 0  # the last write read keeps its history


def test_recorder_captures_reads_writes_and_gates_without_changing_logits():
    model = tiny("lm2", 0).eval()
    x = torch.randint(0, VOCAB, (2, 20))
    rec = MemoryRecorder()
    with torch.no_grad():
        plain, _ = model(x)
        recorded, _ = model(x, recorder=rec)
    assert torch.allclose(plain, recorded, atol=1e-6)  # the recorded path computes scores explicitly
    assert rec.layers == [0, 1, 2]
    assert rec.read_attention(0).shape == (2, 2, 20, 5)  # (B, heads, T, N)
    assert torch.allclose(rec.read_attention(0).sum(-1), torch.ones(2, 2, 20))
    assert rec.output_gate(1).shape == (2, 20, 32)
    writes = rec.writes[2]
    assert [w.end_pos for w in writes] == [8, 16]
    assert writes[0].attention.shape == (2, 2, 5, 8) and writes[0].bank.shape == (2, 5, 12)
    assert torch.allclose(writes[0].attention.sum(-1), torch.ones(2, 2, 5))


def test_chunks_that_complete_a_segment_as_long_as_the_bank_has_slots():
    """A piece that completes a segment begun in an earlier call, as many tokens long as there are slots."""
    model = tiny("lm2", 0, "memory.slots=2").eval()
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        full, _ = model(x)
        state, outs = None, []
        for a, b in ((0, 6), (6, 8), (8, 14), (14, 24)):
            logits, state = model(x[:, a:b], state)
            outs.append(logits)
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-4


def test_recording_across_chunked_calls_equals_one_recorded_call():
    """One recorder over several calls (as generation makes them) gives the same per-token views as one call."""
    model = tiny("lm2", 0).eval()
    x = torch.randint(0, VOCAB, (2, 21))
    whole, pieces = MemoryRecorder(), MemoryRecorder()
    with torch.no_grad():
        model(x, recorder=whole)
        state = None
        for a, b in ((0, 5), (5, 6), (6, 17), (17, 21)):
            _, state = model(x[:, a:b], state, recorder=pieces)
    for layer in (0, 2):
        assert pieces.read_attention(layer).shape == (2, 2, 21, 5)
        assert torch.allclose(pieces.read_attention(layer), whole.read_attention(layer), atol=1e-6)
        assert pieces.output_gate(layer).shape == (2, 21, 32)
        assert torch.allclose(pieces.output_gate(layer), whole.output_gate(layer), atol=1e-6)
        assert [w.end_pos for w in pieces.writes[layer]] == [w.end_pos for w in whole.writes[layer]] == [8, 16]
        for a, b in zip(pieces.writes[layer], whole.writes[layer], strict=True):
            assert torch.allclose(a.bank, b.bank, atol=1e-6)


def test_identity_initial_memory_and_carry():
    model = tiny("lm2", 0)
    state = model.init_state(3)
    bank = state.layers[0].memory.bank
    assert bank.shape == (3, 5, 12) and torch.equal(bank[0, :, :5], torch.eye(5))
    _, after = model(torch.randint(0, VOCAB, (3, 16)))
    carried = model.carry_memory(after)
    assert carried.pos == 0 and carried.layers[0].k is None
    assert torch.equal(carried.layers[0].memory.bank, after.layers[0].memory.bank)
    assert not carried.layers[0].memory.bank.requires_grad


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, VOCAB, (2, 24))
    grads = []
    for ckpt in (False, True):
        model = tiny("lm2", 0).train()
        model.set_activation_checkpointing(ckpt)
        model(x)[0].logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_flops_estimate_is_plausible():
    vanilla, lm2 = tiny("vanilla"), tiny("lm2")
    n = vanilla.param_report()["total"]
    assert 6 * n <= vanilla.flops_per_token(64) < 6 * n * 1.5
    assert lm2.flops_per_token(64) > vanilla.flops_per_token(64)


@pytest.mark.parametrize("arch", ["lm2", "rmt", "vanilla"])
def test_dropping_the_state_changes_no_logit_or_gradient(arch):
    x = torch.randint(0, VOCAB, (2, 32))  # ends exactly on a segment boundary: the last write is skipped
    results = []
    for keep in (True, False):
        model = tiny(arch, 0)
        logits, state = model(x, keep_state=keep)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                     if p.grad is not None]), state))
    (kept_logits, kept_grads, kept_state), (logits, grads, state) = results
    assert state is None and kept_state is not None
    assert torch.allclose(kept_logits, logits, atol=1e-6) and torch.allclose(kept_grads, grads, atol=1e-6)


def test_memory_bank_stays_float32_under_bf16_autocast():
    """docs/architecture.md: the bank is a recurrence over many segments and is kept in float32 under bf16."""
    model = tiny("lm2", 0).eval()
    x = torch.randint(0, VOCAB, (2, 33))  # 4 writes
    with torch.no_grad():
        _, exact = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state = model(x)
            _, state = model(x[:, :5], state)  # a continuation reads and writes the float32 bank too
    banks = [ls.memory.bank for ls in state.layers]
    assert all(b.dtype == torch.float32 for b in banks) and logits.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = model(x)
    for a, b in zip(low.layers, exact.layers, strict=True):
        assert a.memory.bank.dtype == torch.float32
        assert 0 < (a.memory.bank - b.memory.bank).abs().max() < 0.05  # bf16 activations, float32 recurrence


def test_flops_estimate_follows_its_definition():
    """docs/architecture.md §5: 6 x matmul parameters per token, plus attention over the context (half of it on
    average under the causal mask, at most W keys with a window), plus the memory read and write. Checked
    through properties of the estimate rather than its formula."""
    d, layers = 32, 3
    vanilla = tiny("vanilla")
    n = vanilla.param_report()["total"]
    f = vanilla.flops_per_token
    assert f(0) == 6 * n  # no context: the parameters alone (the tied embedding counted once, as the head)
    assert f(100) - f(0) == pytest.approx(6 * layers * d * 100)  # scores and weighted sum: 2 x 2 x d per key x 3
    untied = tiny("vanilla", 0, "model.tie_embeddings=false")
    assert untied.param_report()["total"] == n + VOCAB * d and untied.flops_per_token(64) == f(64)  # lookup is free
    assert vanilla.param_report()["embedding"] == VOCAB * d and untied.param_report()["embedding"] == 2 * VOCAB * d
    windowed = tiny("vanilla", 6).flops_per_token
    assert windowed(6) == windowed(1000) == f(12)  # W keys at most, every key (no causal halving)
    lm2 = tiny("lm2")
    extra = lm2.flops_per_token(64) - f(64) - 6 * lm2.param_report()["memory"]  # memory work beyond its weights
    one_layer = tiny("lm2", 0, "memory.layers=[1]")
    extra_one = one_layer.flops_per_token(64) - f(64) - 6 * one_layer.param_report()["memory"]
    assert extra > 0 and extra == pytest.approx(layers * extra_one)
    per_slot = [tiny("lm2", 0, f"memory.slots={n}").flops_per_token(64) for n in (2, 4, 6)]
    assert per_slot[2] - per_slot[1] == pytest.approx(per_slot[1] - per_slot[0])  # reads and writes grow with N
    assert per_slot[1] > per_slot[0]
    longer_segments = tiny("lm2", 0, "memory.segment_len=16")
    assert longer_segments.flops_per_token(64) < lm2.flops_per_token(64)  # per-segment work amortised over S
    rmt = tiny("rmt")
    assert rmt.flops_per_token(64) == pytest.approx(
        (6 * (rmt.param_report()["total"] - 5 * d) + 6 * layers * d * 64) * (1 + 2 * 5 / 8))


def _participation_ratio(bank: torch.Tensor) -> float:
    """(Σσ²)² / Σσ⁴ of the bank's singular values: 1 when every slot row points one way, N for N equal, orthogonal."""
    s = torch.linalg.svdvals(bank.double())
    return (s.pow(2).sum() ** 2 / s.pow(4).sum()).item()


@pytest.mark.parametrize("slot_keys, distinct", [("false", False), ("true", True)])
def test_slot_keys_keep_the_slots_apart_from_the_first_writes(slot_keys, distinct):
    """At init the write attention of every slot is nearly uniform over the segment, so without slot keys the 8
    slots are copies after 20 writes (what every trained qa1 LM2 showed, docs/results.md); N(0, 1) slot keys
    give each slot its own tokens (participation ratio 1.5-3.3 over seeds 0-2)."""
    torch.manual_seed(0)
    model = build_model(load_recipe(None, [
        "model.arch=lm2", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", f"model.vocab_size={VOCAB}",
        "memory.slots=8", "memory.heads=2", "memory.segment_len=16", "memory.update=normalized",
        f"memory.slot_keys={slot_keys}"])).eval()
    x = torch.randint(0, VOCAB, (1, 16 * 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = model(x)
    ratios = [_participation_ratio(layer.memory.bank[0]) for layer in state.layers]
    assert all(r > 1.3 for r in ratios) if distinct else all(r < 1.01 for r in ratios), ratios


@pytest.mark.parametrize("arch", ["lm2", "lm2-delta", "rmt"])
def test_bptt_counts_the_writes_that_are_read(arch):
    """A training step (keep_state=False) over two segments reads one write: truncating to 1 write changes
    nothing, so every parameter gets the gradient of full backpropagation (the skipped final write, which no token
    reads, once took that one write's place and detached it: the memory's write weights got no gradient)."""
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for bptt in (0, 1):
        model = tiny(arch, 0)
        model(x, bptt=bptt, keep_state=False)[0].logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    full, truncated = grads
    assert full.keys() == truncated.keys()
    for name, grad in full.items():
        assert (grad is None) == (truncated[name] is None), name
        if grad is not None:
            assert torch.allclose(truncated[name], grad, atol=1e-6), name


@pytest.mark.parametrize("arch", ["lm2", "lm2-delta", "rmt"])
def test_no_carry_cuts_the_memory_between_segments_and_is_undone(arch):
    """eval.no_carry's switch: with the carry off, tokens of an earlier segment beyond attention's reach no longer
    change later logits (only the memory could carry them); decoding token by token agrees with one call; turned
    back on, the model is the trained one again, bit for bit."""
    model = tiny(arch, 4).eval()  # window 4 x 3 blocks: position 40 attends at most 9 tokens back; RMT: its segment
    x = torch.randint(0, VOCAB, (2, 45))
    changed = x.clone()
    changed[:, :6] = (changed[:, :6] + 1) % VOCAB  # the first segment (8 tokens), far beyond the window
    late = slice(24, 45)
    with torch.no_grad():
        trained, _ = model(x)
        assert (model(changed)[0][:, late] - trained[:, late]).abs().max() > 1e-4  # the memory carries them
        model.set_memory_carry(False)
        cut, _ = model(x)
        assert (model(changed)[0][:, late] - cut[:, late]).abs().max() <= 1e-6
        assert (cut[:, late] - trained[:, late]).abs().max() > 1e-4
        state, steps = model.init_state(2), []
        for t in range(x.shape[1]):
            logits, state = model(x[:, t:t + 1], state)
            steps.append(logits)
        assert (torch.cat(steps, dim=1) - cut).abs().max() <= 1e-5
        model.set_memory_carry(True)
        assert torch.equal(model(x)[0], trained)
