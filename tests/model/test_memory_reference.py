"""The LM2 memory module against the equations of docs/architecture.md §2, computed here in plain torch.

Tiny hand-set weights (d = 4, two heads, N = 3 slots of width d_m = 2, segments of S = 3 tokens, 7 tokens: two
writes and an open segment), so every read, gate and write can be checked against an independent reference:
the module's output, the gates and attention it records, and the bank it carries on.
"""

from __future__ import annotations

import math

import pytest
import torch

from lm2cli import build_model, load_recipe
from lm2cli.model import MemoryRecorder
from lm2cli.model.memory import LM2Memory, MemoryState

D, HEADS, SLOTS, SLOT_DIM, S, T = 4, 2, 3, 2, 3, 7


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The matrices of the equations in the row-vector convention of the docs (y = x W + b), with values on a
    grid of 1/4 so they are plainly hand-sized; biases are chosen away from zero so a sign error shows."""
    g = torch.Generator().manual_seed(seed)

    def grid(*shape):
        return torch.randint(-6, 7, shape, generator=g).float() / 4

    return {
        "W_Q": grid(D, D), "W_U": grid(D, SLOT_DIM), "W_K": grid(SLOT_DIM, D), "W_V": grid(SLOT_DIM, D),
        "W_out": grid(D, D), "b_out": torch.full((D,), -0.5),
        "W_in": grid(2 * SLOT_DIM, SLOT_DIM), "b_in": torch.tensor([0.25, -0.75]),
        "W_f": grid(2 * SLOT_DIM, SLOT_DIM), "b_f": torch.tensor([1.0, 0.5]),
    }


def load_equation_weights(module: LM2Memory, w: dict[str, torch.Tensor]) -> None:
    """Write the equations' matrices into the module's fused layers (the one place that knows their layout).

    qu_proj = [W_Q | W_U]; kv_proj is split into heads first, then each head's block into its keys and values;
    in_forget_gate maps [U, M] to [g_in | g_f]. nn.Linear stores W transposed (y = x Wᵀ).
    """
    dh = D // HEADS
    kv_columns = []
    for h in range(HEADS):
        cols = slice(h * dh, (h + 1) * dh)
        kv_columns += [w["W_K"][:, cols], w["W_V"][:, cols]]
    with torch.no_grad():
        module.qu_proj.weight.copy_(torch.cat([w["W_Q"], w["W_U"]], dim=1).T)
        module.kv_proj.weight.copy_(torch.cat(kv_columns, dim=1).T)
        module.out_gate.weight.copy_(w["W_out"].T)
        module.out_gate.bias.copy_(w["b_out"])
        module.in_forget_gate.weight.copy_(torch.cat([w["W_in"], w["W_f"]], dim=1).T)
        module.in_forget_gate.bias.copy_(torch.cat([w["b_in"], w["b_f"]]))


def softmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(scores - scores.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def reference(x: torch.Tensor, w: dict[str, torch.Tensor], bank0: torch.Tensor, write: str = "attend") -> dict:
    """The read and write equations, segment by segment and head by head, in float64. write = "compete": each
    token's read softmax over the slots is its share of the write; a slot takes the mean of its shares and its
    input gate is scaled by N x (its shares' sum) / S."""
    x = x.double()
    w = {k: v.double() for k, v in w.items()}
    batch = x.shape[0]
    dh, uh = D // HEADS, SLOT_DIM // HEADS
    memory = bank0.double().expand(batch, -1, -1)
    out, out_gate, read_attention, writes = [], [], [], []
    for start in range(0, x.shape[1], S):
        seg = x[:, start:start + S]
        q, k, v, c = seg @ w["W_Q"], memory @ w["W_K"], memory @ w["W_V"], seg @ w["W_U"]
        e_mem = torch.zeros(batch, seg.shape[1], D, dtype=torch.float64)
        update = torch.zeros(batch, SLOTS, SLOT_DIM, dtype=torch.float64)
        strength = torch.ones(batch, SLOTS, SLOT_DIM, dtype=torch.float64)
        probs_read, probs_write = [], []
        for h in range(HEADS):
            cols, ucols = slice(h * dh, (h + 1) * dh), slice(h * uh, (h + 1) * uh)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(dh)  # (B, t, N)
            p = softmax(scores, dim=2)  # over slots: no mask, the bank holds only the past
            e_mem[..., cols] = p @ v[..., cols]
            probs_read.append(p)
            p_w = softmax(scores, dim=1).transpose(1, 2)  # (B, N, t): each slot over the segment's tokens
            if write == "compete":
                received = p.sum(dim=1)  # (B, N): the shares the slots got from the segment's tokens
                p_w = (p / received.unsqueeze(1)).transpose(1, 2)
                strength[..., ucols] = (received * SLOTS / seg.shape[1]).unsqueeze(-1)
            update[..., ucols] = p_w @ c[..., ucols]
            probs_write.append(p_w)
        g_out = torch.sigmoid(e_mem @ w["W_out"] + w["b_out"])
        out.append(g_out * e_mem)
        out_gate.append(g_out)
        read_attention.append(torch.stack(probs_read, dim=1))
        if seg.shape[1] == S:  # the segment is complete: write it
            um = torch.cat([update, memory], dim=-1)
            g_in = torch.sigmoid(um @ w["W_in"] + w["b_in"]) * strength
            g_f = torch.sigmoid(um @ w["W_f"] + w["b_f"])
            memory = g_in * torch.tanh(update) + g_f * memory
            writes.append({"end_pos": start + S, "attention": torch.stack(probs_write, dim=1), "in_gate": g_in,
                           "forget_gate": g_f, "update": update, "bank": memory})
    return {"out": torch.cat(out, dim=1), "out_gate": torch.cat(out_gate, dim=1),
            "read_attention": torch.cat(read_attention, dim=2), "writes": writes, "bank": memory}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", out_gate_bias=0.0, forget_gate_bias=1.0)
    w = weights()
    load_equation_weights(module, w)
    x = torch.randint(-4, 5, (2, T, D), generator=torch.Generator().manual_seed(1)).float() / 2
    return module, w, x


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=2e-5, rtol=1e-5)


def test_initial_bank_is_the_identity_modulo_the_slot_width():
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0)
    bank = module.init_state(2).bank
    assert bank.dtype == torch.float32 and bank.shape == (2, SLOTS, SLOT_DIM)
    assert bank[0].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]  # slot r = e_(r mod d_m)


def test_one_call_matches_the_equations_reads_gates_writes_and_bank(setup):
    module, w, x = setup
    ref = reference(x, w, module.bank0)
    rec = MemoryRecorder()
    out, state = module(x, module.init_state(2), recorder=rec, layer=0)
    assert close(out, ref["out"]), (out - ref["out"]).abs().max()
    assert close(rec.read_attention(0), ref["read_attention"])
    assert close(rec.output_gate(0), ref["out_gate"])
    assert [r.end_pos for r in rec.writes[0]] == [3, 6]
    for got, want in zip(rec.writes[0], ref["writes"], strict=True):
        assert close(got.attention, want["attention"])
        assert close(got.in_gate, want["in_gate"]) and close(got.forget_gate, want["forget_gate"])
        assert close(got.bank, want["bank"])
    assert close(state.bank, ref["bank"]) and state.bank.dtype == torch.float32
    assert state.pending_len == 1  # token 7 is in the open segment


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 1, 1], [2, 2, 3], [4, 3], [1, 5, 1]])
def test_chunked_calls_without_recorder_match_the_equations(setup, chunks):
    """The fast paths (single-token decode, fused attention inside a segment, a segment completed across
    calls) compute the same equations."""
    module, w, x = setup
    ref = reference(x, w, module.bank0)
    state, outs, pos = module.init_state(2), [], 0
    with torch.no_grad():
        for n in chunks:
            out, state = module(x[:, pos:pos + n], state, start_pos=pos)
            outs.append(out)
            pos += n
    assert close(torch.cat(outs, dim=1), ref["out"])
    assert close(state.bank, ref["bank"])


def test_the_write_is_gated_tanh_of_the_update_plus_the_forgetting_bank(setup):
    """M' = g_in ⊙ tanh(U) + g_f ⊙ M. The sizes are such that the plausible wrong writes (no tanh, 1 - g_f)
    give clearly different banks, so matching the reference pins this write."""
    module, w, x = setup
    write = reference(x[:, :S], w, module.bank0)["writes"][0]
    g_in, g_f, update, bank0 = write["in_gate"], write["forget_gate"], write["update"], module.bank0.double()
    for wrong in (g_in * update + g_f * bank0, g_in * torch.tanh(update) + (1 - g_f) * bank0):
        assert (wrong - write["bank"]).abs().max() > 0.1
    rec = MemoryRecorder()
    module(x[:, :S], module.init_state(2), recorder=rec)
    assert close(rec.writes[0][0].bank, write["bank"])


def test_gate_biases_come_from_the_recipe():
    """b_in = 0, b_f = memory.forget_gate_bias, b_out = memory.out_gate_bias: with the gate weights zeroed, the
    recorded gates are exactly the sigmoids of the biases."""
    recipe = load_recipe(None, ["model.d_model=8", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=11",
                                "memory.slots=3", "memory.heads=2", "memory.segment_len=2",
                                "memory.forget_gate_bias=1.5", "memory.out_gate_bias=-2.0"])
    torch.manual_seed(0)
    model = build_model(recipe)
    memory = model.blocks[0].memory
    with torch.no_grad():
        memory.out_gate.weight.zero_()
        memory.in_forget_gate.weight.zero_()
    rec = MemoryRecorder()
    model(torch.tensor([[1, 2, 3, 4]]), recorder=rec)
    assert torch.allclose(rec.output_gate(0), torch.full((1, 4, 8), torch.sigmoid(torch.tensor(-2.0)).item()))
    for write in rec.writes[0]:
        assert torch.allclose(write.in_gate, torch.full_like(write.in_gate, 0.5))
        assert torch.allclose(write.forget_gate, torch.full_like(write.forget_gate, torch.sigmoid(torch.tensor(1.5))))


def test_the_normalized_write_is_the_gate_weighted_mean_of_content_and_bank(setup):
    """memory.update = "normalized": M' = (g_in ⊙ tanh(U) + g_f ⊙ M) / (g_in + g_f), same gates as the sum."""
    _, w, x = setup
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0, update="normalized")
    load_equation_weights(module, w)
    write = reference(x[:, :S], w, module.bank0)["writes"][0]
    g_in, g_f, update, bank0 = write["in_gate"], write["forget_gate"], write["update"], module.bank0.double()
    rec = MemoryRecorder()
    module(x[:, :S], module.init_state(2), recorder=rec)
    expected = (g_in * torch.tanh(update) + g_f * bank0) / (g_in + g_f)
    assert (expected - write["bank"]).abs().max() > 0.1  # not the sum
    assert close(rec.writes[0][0].bank, expected)


@pytest.mark.parametrize("update, bounded", [("sum", False), ("normalized", True)])
def test_only_the_normalized_bank_stays_bounded_over_many_segments(update, bounded):
    """A forget gate near 1 (bias +6) and a strong write: the summed bank grows with every segment (what a
    trained LM2 did beyond its training length, docs/results.md), the normalized one stays within [-1, 1]."""
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 6.0, update=update)
    module.reset_gate_biases()
    x = torch.randn(1, 60 * S, D, generator=torch.Generator().manual_seed(3)) * 4
    with torch.no_grad():
        _, state = module(x, module.init_state(1))
    largest = state.bank.abs().max().item()
    assert (largest <= 1.0) if bounded else (largest > 5.0)


def test_the_recipe_chooses_the_update():
    base = ["model.d_model=8", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=11", "memory.slots=3",
            "memory.heads=2", "memory.segment_len=2"]
    assert not build_model(load_recipe(None, base)).blocks[0].memory.normalized_update
    assert build_model(load_recipe(None, [*base, "memory.update=normalized"])).blocks[0].memory.normalized_update


def test_slot_keys_add_a_learned_vector_to_each_slots_key(setup):
    """memory.slot_keys: K = M W_K + E (E: one row per slot, split into heads like the keys); values unchanged."""
    _, w, _ = setup
    plain = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0)
    keyed = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0, slot_keys=True)
    load_equation_weights(plain, w)
    load_equation_weights(keyed, w)
    extra = torch.randint(-6, 7, (SLOTS, D), generator=torch.Generator().manual_seed(5)).float() / 4
    with torch.no_grad():
        keyed.slot_keys.copy_(extra)
    bank = torch.rand(1, SLOTS, SLOT_DIM, generator=torch.Generator().manual_seed(6))
    keys, values = keyed.bank_keys_values(bank)
    plain_keys, plain_values = plain.bank_keys_values(bank)
    expected = (bank[0] @ w["W_K"] + extra).view(SLOTS, HEADS, D // HEADS).transpose(0, 1) / math.sqrt(D // HEADS)
    assert close(keys[0], expected) and close(values, plain_values) and not close(keys, plain_keys)


@pytest.mark.parametrize("slot_keys", [False, True])
def test_only_slot_keys_tell_equal_slots_apart(slot_keys):
    """Slots whose rows are equal have equal keys without slot keys: every token reads them alike and they get
    the same write, so they stay copies for good (what the trained qa1 LM2s did). Slot keys break the tie."""
    torch.manual_seed(0)
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0, slot_keys=slot_keys)
    if slot_keys:
        torch.nn.init.normal_(module.slot_keys, std=1.0)
    equal_rows = torch.full((1, SLOTS, SLOT_DIM), 0.3)
    x = torch.randn(1, 4 * S, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, state = module(x, MemoryState(equal_rows))
    spread = (state.bank[0] - state.bank[0, :1]).abs().max().item()
    assert (spread > 1e-3) if slot_keys else (spread < 1e-6)


@pytest.mark.parametrize("slot_keys", [False, True])
def test_the_competitive_write_matches_the_equations(setup, slot_keys):
    """memory.write = "compete": same reads, the write attention is the read softmax normalised over the tokens,
    and the input gate carries each slot's share of the segment (recorded as applied)."""
    _, w, x = setup
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0, slot_keys=slot_keys, write="compete")
    load_equation_weights(module, w)
    ref = reference(x, w, module.bank0, write="compete")
    attend = reference(x, w, module.bank0)
    assert not close(ref["bank"], attend["bank"])  # the two writes differ on these weights
    rec = MemoryRecorder()
    out, state = module(x, module.init_state(2), recorder=rec, layer=0)
    assert close(out, ref["out"]) and close(state.bank, ref["bank"])
    for got, want in zip(rec.writes[0], ref["writes"], strict=True):
        assert close(got.attention, want["attention"]) and close(got.in_gate, want["in_gate"])
        assert close(got.bank, want["bank"])


@pytest.mark.parametrize("write, kept", [("attend", False), ("compete", True)])
def test_a_slot_no_token_chooses_keeps_its_content_only_when_tokens_compete(write, kept):
    """Every token of the segment reads (and so writes) slot 0. Attending slots each take a full mean of the
    segment and are all overwritten (the trained qa1 LM2s kept only the latest fact); competing slots that no
    token chose keep their rows (normalized update: exactly)."""
    module = LM2Memory(D, SLOTS, SLOT_DIM, HEADS, S, "identity", 0.0, 1.0, update="normalized", write=write)
    load_equation_weights(module, weights())
    scores = torch.zeros(1, HEADS, S, SLOTS)
    scores[..., 0] = 30.0
    content = torch.randn(1, HEADS, S, SLOT_DIM // HEADS, generator=torch.Generator().manual_seed(2))
    bank = torch.rand(1, SLOTS, SLOT_DIM, generator=torch.Generator().manual_seed(3)) - 0.5
    with torch.no_grad():
        new_bank, *_ = module.updated_bank(scores, content, bank)
    moved = (new_bank - bank).abs().amax(dim=-1)[0]  # per slot
    assert moved[0] > 0.05
    assert (moved[1:].max() < 1e-6) if kept else (moved[1:].min() > 0.05), moved


def test_the_recipe_chooses_the_write():
    base = ["model.d_model=8", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=11", "memory.slots=3",
            "memory.heads=2", "memory.segment_len=2"]
    assert not build_model(load_recipe(None, base)).blocks[0].memory.competitive_write
    assert build_model(load_recipe(None, [*base, "memory.write=compete"])).blocks[0].memory.competitive_write
