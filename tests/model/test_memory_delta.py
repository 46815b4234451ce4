"""memory.write = "delta": the associative bank against the delta rule written token by token in float64.

The module computes a segment's S updates at once (a unit-triangular solve); the reference applies them one token
at a time, S ← S + β k̂ᵀ(v − k̂ S), so an error in the solve, the order of the updates or the read shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm2cli import build_model, load_recipe
from lm2cli.model.memory import AssociativeMemory, LM2Memory

D, HEADS, S = 8, 2, 4
DH = D // HEADS


@pytest.fixture
def module() -> AssociativeMemory:
    torch.manual_seed(0)
    m = AssociativeMemory(D, HEADS, S, out_gate_bias=0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m


def within_segment_window(raw: torch.Tensor, weights: torch.Tensor | None, sign: int = -1) -> torch.Tensor:
    """memory.key_window (sign -1) and value_window (+1) spelled out: head h's channels of token t become
    Σ_j w[h, j] ⊙ raw[t ± j] over the lags j that stay inside t's segment; raw (B, T, h·d_h)."""
    if weights is None:
        return raw
    out = torch.zeros_like(raw)
    for t in range(raw.shape[1]):
        for j in range(weights.shape[1]):
            source = t + sign * j
            if (t // S) * S <= source < min((t // S + 1) * S, raw.shape[1]):
                for h in range(HEADS):
                    cols = slice(h * DH, (h + 1) * DH)
                    out[:, t, cols] += weights[h, j].double() * raw[:, source, cols]
    return out


def reference(m: AssociativeMemory, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gated read (B, T, D), final matrices (B, h, d_h, d_h)), token by token in float64."""
    w = m.qu_proj.weight.double()
    proj = x.double() @ w.T
    q, content = proj[..., :D], proj[..., D:]
    q = within_segment_window(q, m.query_mix)
    content = content.clone()
    for offset, weights, sign in ((0, m.key_mix, -1), (DH, m.value_mix, 1)):  # each head: key, value, strength
        part = torch.cat([content[..., h * (2 * DH + 1) + offset:h * (2 * DH + 1) + offset + DH]
                          for h in range(HEADS)], dim=-1)
        part = within_segment_window(part, weights, sign)
        for h in range(HEADS):
            content[..., h * (2 * DH + 1) + offset:h * (2 * DH + 1) + offset + DH] = part[..., h * DH:(h + 1) * DH]
    batch, length = x.shape[:2]
    matrix = torch.zeros(batch, HEADS, DH, DH, dtype=torch.float64)
    reads = torch.zeros(batch, length, D, dtype=torch.float64)
    for start in range(0, length, S):
        end = min(start + S, length)
        for t in range(start, end):  # every token of the segment reads the matrix as it was before the segment
            for h in range(HEADS):
                q_h = F.normalize(q[:, t, h * DH:(h + 1) * DH], dim=-1)
                reads[:, t, h * DH:(h + 1) * DH] = torch.einsum("bi,bij->bj", q_h, matrix[:, h])
        if end - start < S:
            break  # an open segment is not written yet
        for t in range(start, end):  # then the segment writes, in token order
            for h in range(HEADS):
                k, v, b = content[:, t, h * (2 * DH + 1):(h + 1) * (2 * DH + 1)].split([DH, DH, 1], dim=-1)
                k, b = F.normalize(k, dim=-1), torch.sigmoid(b + m.write_strength_bias)
                old = torch.einsum("bi,bij->bj", k, matrix[:, h])
                matrix[:, h] = matrix[:, h] + b.unsqueeze(-1) * k.unsqueeze(-1) * (v - old).unsqueeze(1)
    gate = torch.sigmoid(reads @ m.out_gate.weight.double().T + m.out_gate.bias.double())
    return gate * reads, matrix


@pytest.mark.parametrize("length,bias", [(3, 0.0), (8, 0.0), (11, 0.0), (8, -2.0)])  # no write; two writes; an open
def test_the_delta_write_and_read_match_the_rule_token_by_token(module, length, bias):  # segment; a β offset
    module.write_strength_bias = bias
    x = torch.randn(2, length, D, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        out, state = module(x, module.init_state(2))
    want_out, want_matrix = reference(module, x)
    assert torch.allclose(out.double(), want_out, atol=1e-5)
    assert torch.allclose(state.bank.double().view(2, HEADS, DH, DH), want_matrix, atol=1e-5)
    if length >= S:
        assert want_matrix.abs().max() > 0.05  # the write did something: the check above is not 0 == 0


@pytest.mark.parametrize("windows", [(3, 1), (1, 3), (3, 2)])  # key_window, value_window
@pytest.mark.parametrize("length", [7, 11])  # a write and an open segment read it; two writes
def test_the_windows_mix_keys_queries_and_values_within_the_segment(length, windows):
    torch.manual_seed(1)
    m = AssociativeMemory(D, HEADS, S, out_gate_bias=0.5, key_window=windows[0], value_window=windows[1])
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)  # the window's weights too: lags weigh differently per channel
    x = torch.randn(2, length, D, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        out, state = m(x, m.init_state(2))
        plain = AssociativeMemory(D, HEADS, S, out_gate_bias=0.5)
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.endswith("_mix")})
        plain_out, _ = plain(x, plain.init_state(2))
    want_out, want_matrix = reference(m, x)
    assert torch.allclose(out.double(), want_out, atol=1e-5)
    assert torch.allclose(state.bank.double().view(2, HEADS, DH, DH), want_matrix, atol=1e-5)
    assert (out - plain_out).abs().max() > 1e-3  # the window changes the read: the check above is not vacuous


def test_the_windows_start_as_the_sum_of_their_tokens_and_only_for_the_delta_bank():
    base = ["model.d_model=8", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=11", "memory.heads=2",
            "memory.segment_len=4", "memory.write=delta"]
    memory = build_model(load_recipe(None, [*base, "memory.key_window=3", "memory.value_window=2"])).blocks[0].memory
    assert memory.key_mix.shape == memory.query_mix.shape == (2, 3, 4) and memory.value_mix.shape == (2, 2, 4)
    assert all(w.eq(1.0).all() for w in (memory.key_mix, memory.query_mix, memory.value_mix))
    plain = build_model(load_recipe(None, base)).blocks[0].memory
    assert plain.key_mix is None and plain.value_mix is None  # no tensors: older checkpoints load unchanged
    from lm2cli.errors import Lm2Error
    for key in ("key_window", "value_window"):
        with pytest.raises(Lm2Error, match=f"memory.{key} = 3 applies to memory.write"):
            load_recipe(None, [*base[:-1], f"memory.{key}=3"])
        with pytest.raises(Lm2Error, match="must not exceed memory.segment_len = 4"):
            load_recipe(None, [*base, f"memory.{key}=5"])


def test_a_key_written_again_holds_only_its_latest_value(module):
    """The property qa1 needs ("where is Mary" = her latest move): writing v2 under a key that holds v1, at full
    strength, leaves v2 there, and a key orthogonal to it is untouched."""
    matrix = torch.zeros(1, D, DH)
    key = torch.zeros(DH)
    key[0] = 1.0
    other = torch.zeros(DH)
    other[1] = 1.0
    v_other, v1, v2 = torch.randn(3, DH, generator=torch.Generator().manual_seed(3))
    strong = torch.tensor([30.0])  # σ(30) = 1: a full-strength write
    tokens = [(other, v_other), (key, v1), (key, v2)]
    content = torch.stack([torch.cat([k, v, strong]) for k, v in tokens])  # (S-1, 2 d_h + 1), head 0
    content = torch.cat([content, torch.cat([torch.zeros(2 * DH), torch.tensor([-30.0])]).unsqueeze(0)])  # β = 0
    content = content.unsqueeze(0).unsqueeze(0).expand(1, HEADS, S, 2 * DH + 1)
    with torch.no_grad():
        new, *_ = module.updated_bank(None, content, matrix)
    head0 = new.view(1, HEADS, DH, DH)[0, 0]
    assert torch.allclose(key @ head0, v2, atol=1e-5) and torch.allclose(other @ head0, v_other, atol=1e-5)


def test_the_recipe_chooses_the_associative_bank():
    base = ["model.d_model=8", "model.n_layers=1", "model.n_heads=2", "model.vocab_size=11", "memory.heads=2",
            "memory.segment_len=2"]
    assert type(build_model(load_recipe(None, base)).blocks[0].memory) is LM2Memory
    model = build_model(load_recipe(None, [*base, "memory.write=delta"]))
    memory = model.blocks[0].memory
    assert isinstance(memory, AssociativeMemory)
    assert memory.init_state(3).bank.shape == (3, 8, 4)  # h·d_h rows of width d_h, empty
    assert memory.init_state(3).bank.abs().sum() == 0
    assert memory.out_gate.bias.eq(-4.0).all()  # the recipe's out_gate_bias, as for the slot bank
    assert memory.write_strength_bias == 0.0
    biased = build_model(load_recipe(None, [*base, "memory.write=delta", "memory.write_strength_bias=-3"]))
    assert biased.blocks[0].memory.write_strength_bias == -3.0
    assert biased.state_dict().keys() == model.state_dict().keys()  # a constant: checkpoints keep their tensors
