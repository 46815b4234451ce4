"""TraceRecorder on real tiny models: exact logits, normalised attention, the bank's rhythm, RMT weights,
and the bytes a long text costs."""

from __future__ import annotations

import pytest
import torch

from lm2cli.inspection.capture import read_against
from lm2cli.inspection.recording import TraceRecorder, reduce_heads
from lm2cli.inspection.rmt import attention_weights

from .conftest import tiny_model

T = 100  # tiny recipe: S = 32, so three writes and an open segment of 4 tokens


def run(model, ids, recorder=None, chunk=None):
    """Logits of `ids` fed in chunks (None = at once), recording into `recorder` if given."""
    state = model.init_state(1)
    outs = []
    context = recorder.recording(model, state) if recorder is not None else _nothing()
    with torch.no_grad(), context:
        for i in range(0, ids.shape[1], chunk or ids.shape[1]):
            logits, state = model(ids[:, i:i + (chunk or ids.shape[1])], state, recorder=recorder)
            outs.append(logits)
    return torch.cat(outs, dim=1), state


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("arch,window,chunk", [("lm2", 0, None), ("lm2", 24, 7), ("lm2", 0, 1),
                                                ("rmt", 0, None), ("rmt", 24, 7), ("rmt", 0, 1)])
def test_recording_leaves_logits_bit_identical(tokenizer, arch, window, chunk):
    """One pass, chunks, and token by token (decoding takes a fused path when nothing records)."""
    model = tiny_model(tokenizer, arch, f"attention.window={window}")
    length = 40 if chunk == 1 else T  # token by token: one write and an open segment are enough
    ids = torch.randint(0, tokenizer.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    plain, _ = run(model, ids, chunk=chunk)
    recorder = TraceRecorder(heads="mean", keep_inputs=True, full=True)
    recorded, _ = run(model, ids, recorder, chunk=chunk)
    assert torch.equal(plain, recorded)
    assert recorder.traces[0].get("read").shape[0] == length  # it did record


@pytest.mark.parametrize("window,chunk_tokens", [(0, 96), (24, 160), (24, None)])
def test_long_input_paths_record_every_read_and_write(tokenizer, monkeypatch, window, chunk_tokens):
    """One call over a long input takes the model's own paths: without autograd it runs through its state in
    chunks of whole segments (NO_GRAD_CHUNK_TOKENS, lowered here so a short input takes it), and with a window
    each chunk attends block-locally (more than two blocks of max(W, 64) queries). Recording must see every
    token's read and every segment's write there too, and leave those paths' logits bit-identical."""
    from lm2cli.model import model as model_module

    model = tiny_model(tokenizer, "lm2", f"attention.window={window}")
    length = 300  # S = 32: nine writes and an open segment of 12 tokens
    if chunk_tokens is not None:
        monkeypatch.setattr(model, "NO_GRAD_CHUNK_TOKENS", chunk_tokens)
    chunks, locals_built = [], []
    monkeypatch.setattr(model, "_hidden_in_chunks", _spy(model._hidden_in_chunks, chunks))
    monkeypatch.setattr(model_module.LocalBlocks, "build",
                        staticmethod(_spy(model_module.LocalBlocks.build, locals_built)))
    ids = torch.randint(0, tokenizer.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))
    plain, _ = run(model, ids)
    recorder = TraceRecorder(heads="mean", full=True)
    recorded, state = run(model, ids, recorder)
    assert torch.equal(plain, recorded)
    assert len(chunks) == (2 if chunk_tokens else 0) and bool(locals_built) == (window > 0)  # the paths ran
    for layer in (0, 1):
        trace = recorder.traces[layer]
        assert trace.get("read").shape == (length, 8)
        assert trace.get("write_end").tolist() == list(range(32, length + 1, 32))
        assert torch.equal(trace.get("bank")[-1], state.layers[layer].memory.bank[0])  # the last write seen
    # the same text token by token gives the same reads and writes, up to float rounding carried through nine
    # writes of a sharp tiny model (measured 3e-4 on reads, 7e-5 on writes; a missed or misplaced write is > 0.1)
    single = TraceRecorder(heads="mean")
    run(model, ids, single, chunk=1)
    assert torch.allclose(single.traces[0].get("read"), recorder.traces[0].get("read"), atol=2e-3)
    assert torch.allclose(single.traces[1].get("write"), recorder.traces[1].get("write"), atol=2e-3)


def _spy(function, calls: list):
    def spy(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)
    return spy


@pytest.mark.parametrize("heads", ["mean", 1])
def test_read_rows_sum_to_one_over_slots_and_write_rows_over_tokens(tokenizer, heads):
    model = tiny_model(tokenizer)
    recorder = TraceRecorder(heads=heads)
    run(model, torch.randint(0, tokenizer.vocab_size, (1, T)), recorder)
    for layer in (0, 1):
        read, write = recorder.traces[layer].get("read"), recorder.traces[layer].get("write")
        assert read.shape == (T, 8) and write.shape == (3, 8, 32)
        assert torch.allclose(read.sum(-1), torch.ones(T), atol=1e-5)
        assert torch.allclose(write.sum(-1), torch.ones(3, 8), atol=1e-5)
        assert read.min() >= 0 and write.min() >= 0


def test_head_reduction_picks_mean_max_or_one_head():
    t = torch.tensor([[1.0, 4.0], [3.0, 2.0]])
    assert reduce_heads(t, "mean").tolist() == [2.0, 3.0]
    assert reduce_heads(t, "max").tolist() == [3.0, 4.0]
    assert reduce_heads(t, 1).tolist() == [3.0, 2.0]


def test_bank_is_fixed_within_a_segment_and_changes_at_each_write(tokenizer):
    model = tiny_model(tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    state = model.init_state(1)
    recorder = TraceRecorder(keep_inputs=True)
    banks = []  # bank of block 0 after each token
    with torch.no_grad(), recorder.recording(model, state):
        for i in range(T):
            _, state = model(ids[:, i:i + 1], state, recorder=recorder)
            banks.append(state.layers[0].memory.bank[0].clone())
    for i in range(1, T):
        written = (i + 1) % 32 == 0  # token i completes a segment
        assert torch.equal(banks[i], banks[i - 1]) != written, f"token {i}"
    trace = recorder.traces[0]
    assert trace.get("write_end").tolist() == [32, 64, 96]
    assert (trace.get("slot_change") > 0).all()
    # every token read the bank as it stood after the previous segment: the read spelled out against that
    # bank gives the recorded weights
    read, inputs = trace.get("read"), trace.get("inputs")
    bank0 = model.init_state(1).layers[0].memory.bank[0]
    for segment, bank in enumerate([bank0, banks[31], banks[63], banks[95]]):
        rows = slice(32 * segment, min(T, 32 * segment + 32))
        assert torch.allclose(read_against(model.blocks[0].memory, inputs[rows], bank, "mean"), read[rows],
                              atol=1e-6)


@pytest.mark.parametrize("window", [0, 24])
def test_rmt_weights_reproduce_the_block_attention(tokenizer, window):
    """The RMT hook's weights, applied to the values and the output projection, give the block's own
    attention output: for token calls and for the write suffix, with and without a window."""
    model = tiny_model(tokenizer, "rmt", f"attention.window={window}")
    calls = []

    def keep(module, args, kwargs):
        calls.append((module, args))

    handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in model.blocks]
    with torch.no_grad():
        model(torch.randint(0, tokenizer.vocab_size, (1, 70)))
        for h in handles:
            h.remove()
        starts = set()
        for block, (h, cos, sin, mask, causal, st, *_rest) in calls:
            start = _rest[2]
            starts.add(start)
            probs, v = attention_weights(block, h, cos, sin, mask, causal, st.k, st.v)
            b, t = h.shape[:2]
            mine = block.attn.wo((probs @ v).transpose(1, 2).reshape(b, t, -1))
            theirs = block.attn.forward(block.norm1.forward(h), cos, sin, mask, causal, st.k, st.v)[0]
            assert torch.allclose(mine, theirs, atol=1e-5)
            assert torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5)
    assert {0, 8 + 32} <= starts  # segment starts (read prefix + tokens) and write suffixes were checked


def test_rmt_trace_reads_memory_tokens_and_the_write_suffix(tokenizer):
    model = tiny_model(tokenizer, "rmt")
    recorder = TraceRecorder()
    run(model, torch.randint(0, tokenizer.vocab_size, (1, T)), recorder, chunk=5)
    trace = recorder.traces[1]
    read, write, split = trace.get("read"), trace.get("write"), trace.get("write_split")
    assert read.shape == (T, 8) and write.shape == (3, 8, 32) and split.shape == (3, 8, 3)
    assert (read.sum(-1) <= 1 + 1e-5).all() and (read.sum(-1) > 0).all()  # the rest is on the tokens
    assert torch.allclose(split.sum(-1), torch.ones(3, 8), atol=1e-5)
    assert torch.allclose(write.sum(-1), split[..., 1], atol=1e-5)  # write = the mass on segment tokens
    assert recorder.memory.get("write_end").tolist() == [32, 64, 96]
    assert (recorder.memory.get("slot_change") > 0).all()


def test_long_text_fits_the_byte_budget_on_the_small_recipe():
    """16k tokens through the small recipe's shapes (4 memory blocks, 4 heads, d = 128, N = 16, S = 64): the
    reduced recording stores T·(N + 2) + W·N·(S + 6) numbers per block, whatever the heads and the width."""
    n_layers, slots, seg = 4, 16, 64

    def drive(recorder, tokens, heads, d):
        recorder.seed({layer: torch.zeros(slots, d) for layer in range(n_layers)})
        probs, gate = torch.full((1, heads, seg, slots), 1 / slots), torch.full((1, seg, d), 0.7)
        write, slot_gate = torch.full((1, heads, slots, seg), 1 / seg), torch.full((1, slots, d), 0.6)
        for w in range(tokens // seg):
            for layer in range(n_layers):
                recorder.on_read(layer, w * seg, probs)
                recorder.on_out_gate(layer, w * seg, gate)
                recorder.on_write(layer, (w + 1) * seg, write, slot_gate, slot_gate, slot_gate * w)
        return recorder.nbytes()

    def expected(tokens, d):
        writes = tokens // seg
        per_block = tokens * (slots + 2) * 4 + writes * slots * (seg + 6) * 4 + writes * 8  # write_end: int64
        return n_layers * (per_block + slots * d * 4)  # + the bank kept to measure the next change

    reduced = drive(TraceRecorder(), 16_384, heads=4, d=128)
    assert reduced == expected(16_384, 128)
    assert reduced < 2 * 2**30 / 100  # 9.3 MB: far inside the 2 GB budget
    assert drive(TraceRecorder(), 1024, heads=16, d=512) == expected(1024, 512)
    assert drive(TraceRecorder(full=True), 1024, heads=4, d=128) > 10 * expected(1024, 128)  # what it saves


# ------------------------------------------------------------------------- the associative bank ("delta")


@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_associative_recording_leaves_logits_bit_identical(tokenizer, chunk):
    model = tiny_model(tokenizer, "lm2", "memory.write=delta", "attention.window=24")
    length = 40 if chunk == 1 else T
    ids = torch.randint(0, tokenizer.vocab_size, (1, length), generator=torch.Generator().manual_seed(4))
    plain, _ = run(model, ids, chunk=chunk)
    recorder = TraceRecorder(heads="mean", full=True)
    recorded, state = run(model, ids, recorder, chunk=chunk)
    assert torch.equal(plain, recorded)
    for layer in (0, 1):
        trace = recorder.traces[layer]
        writes = length // 32
        assert trace.get("query").shape == (length, 2, 32)
        assert trace.get("write_key").shape == (32 * writes, 2, 32) and trace.get("beta").shape == (32 * writes, 2)
        assert trace.get("write_end").tolist() == list(range(32, length + 1, 32))
        assert torch.equal(trace.get("bank")[-1].flatten(0, 1), state.layers[layer].memory.bank[0])


def test_a_read_is_the_sum_of_its_written_tokens_terms(tokenizer):
    """S₀ = 0 and each write adds Kᵀ U, so the read q̂ S at any token equals Σ_t (q̂·k̂_t) u_t over the tokens written
    before its segment (the decomposition inspect-memory reports), and each head's shares sum to 1."""
    from lm2cli.inspection.associative import read_shares, read_terms

    model = tiny_model(tokenizer, "lm2", "memory.write=delta")
    recorder = TraceRecorder(full=True)
    run(model, torch.randint(0, tokenizer.vocab_size, (1, T), generator=torch.Generator().manual_seed(5)),
        recorder)
    tensors = recorder.traces[1].tensors()
    banks = tensors["bank"]  # (W, h, dh, dh) after each write
    for pos in (5, 31, 32, 70, T - 1):
        writes = pos // 32
        coefficients, read = read_terms(tensors, pos)
        assert coefficients.shape == (2, 32 * writes)
        direct = (torch.einsum("hd,hde->he", tensors["query"][pos], banks[writes - 1]) if writes
                  else torch.zeros(2, 32))
        assert torch.allclose(read, direct, atol=1e-5), pos
        shares = read_shares(tensors, pos)
        assert torch.allclose(shares.sum(-1), torch.ones(2) if writes else torch.zeros(2), atol=1e-4), pos


def test_shares_and_fact_numbers_on_hand_made_tensors():
    """Orthogonal keys: a query equal to token 2's key reads only token 2's update (share 1 there)."""
    from lm2cli.inspection.associative import fact_numbers, read_shares

    eye = torch.eye(4)
    tensors = {"query": eye[[2, 2, 2, 2, 2]].unsqueeze(1), "write_key": eye.unsqueeze(1),
               "write_update": torch.randn(4, 1, 4), "beta": torch.tensor([[0.2], [0.2], [0.8], [0.2]]),
               "write_end": torch.tensor([4])}
    shares = read_shares(tensors, 4)[0]
    assert torch.allclose(shares, torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-6)
    assert read_shares(tensors, 3).shape == (1, 0)  # before the first write: nothing held
    numbers = fact_numbers(tensors["beta"][:, 0], shares, [False, False, True, False, False])
    assert numbers == {"fact_tokens_written": 1, "tokens_written": 4, "write_ratio": 4.0,
                       "answer_read_on_facts": 1.0, "answer_read_even": 0.25}
    assert fact_numbers(tensors["beta"][:, 0], shares, [False] * 5) is None
