"""The LM2 memory module: a gated memory bank read by cross-attention and written once per segment.

Causal, segment-recurrent and well-typed version of Kang et al. 2025 (see docs/architecture.md):

    read  (every token of segment k, from the bank M as it stood after segment k-1)
        P      = softmax_slots(Q Kᵀ/√dh)          Q = x W_Q, K = M W_K (+ E with memory.slot_keys), V = M W_V
        E_mem  = merge_heads(P V);   g_out = σ(E_mem W_out + b_out);   block adds g_out ⊙ E_mem
    write (after the S tokens of segment k, slot-side, reusing the read scores transposed)
        P_w    = softmax_tokens(Q Kᵀ/√dh)          each slot's view of the segment (memory.write = "attend")
               = A / Σ_tokens A,  A = softmax_slots(Q Kᵀ/√dh)   (memory.write = "compete": every token's weight
                 is shared out over the slots it reads from, and each slot takes the mean of what it received)
        U      = merge_heads(P_w (x W_U))
        g_in   = σ([U, M] W_in + b_in);   g_f = σ([U, M] W_f + b_f)
        M'     = g_in ⊙ tanh(U) + g_f ⊙ M
                 (compete: g_in ⊙ w, w = N · Σ_tokens A / S per slot and head: how much of the segment chose the slot)

Memory only ever holds the past, so causality holds by construction. The bank is kept in float32 even under
autocast: it is a recurrence over many segments and bf16 rounding would accumulate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MemoryState:
    """One memory block's recurrent state for a batch of sequences."""

    bank: Tensor  # (B, N, d_m) float32: M after the last completed segment
    # The open segment's tokens (r < S of them), kept as tuples of per-call pieces so that decoding appends
    # without copying; concatenated once, when the segment completes. Within a segment the bank is fixed, so
    # the tokens' read queries and write contents are all the write needs.
    pending_queries: tuple[Tensor, ...] = ()  # each (B, h, t, dh)
    pending_contents: tuple[Tensor, ...] = ()  # each (B, h, t, d_m/h)
    pending_len: int = 0  # tokens in the open segment (kept as a number: summing the pieces costs every step)
    # Key/value projections of `bank` (keys pre-scaled by 1/√dh), cached for inference so that decoding does not
    # recompute them for every token. With autograd on they are always recomputed: a cache made before an
    # optimizer step would be stale.
    keys: Tensor | None = None  # (B, h, N, dh)
    values: Tensor | None = None


class LM2Memory(nn.Module):
    # Some parameters serve the write alone (the input/forget gate): a forward whose rows never complete a
    # segment that is read leaves them without a gradient (distributed training must expect that).
    write_only_params = True
    # False only for `lm2 eval`'s no-carry control (LanguageModel.set_memory_carry): every write is dropped, so
    # each segment reads the initial bank again and nothing crosses a segment boundary through the memory.
    carry = True

    def __init__(self, d_model: int, slots: int, slot_dim: int, heads: int, segment_len: int, init: str,
                 out_gate_bias: float, forget_gate_bias: float, update: str = "sum", slot_keys: bool = False,
                 write: str = "attend"):
        super().__init__()
        if d_model % heads or slot_dim % heads:
            raise ValueError("memory heads must divide d_model and slot_dim")
        self.d_model, self.slots, self.slot_dim, self.heads = d_model, slots, slot_dim, heads
        self.segment_len = segment_len
        self.head_dim = d_model // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # Token side, fused into one matmul over the whole input: read queries W_Q and write contents W_U.
        self.content_width = slot_dim  # what each token contributes to the write (W_U)
        self.qu_proj = nn.Linear(d_model, d_model + slot_dim, bias=False)
        self.kv_proj = nn.Linear(slot_dim, 2 * d_model, bias=False)  # keys and values from the slots
        self.out_gate = nn.Linear(d_model, d_model)
        self.in_forget_gate = nn.Linear(2 * slot_dim, 2 * slot_dim)  # [g_in | g_f] from [U, M]
        bank0 = identity_bank(slots, slot_dim)
        if init == "learned":
            self.bank0 = nn.Parameter(bank0)
        else:
            self.register_buffer("bank0", bank0, persistent=False)
        # K = M W_K + E: a learned vector per slot (and head) in the key. Without it the keys are a function of the
        # bank's rows alone, so rows that become equal get equal reads and equal writes and stay equal for good.
        self.slot_keys = nn.Parameter(torch.zeros(slots, d_model)) if slot_keys else None  # see reset_slot_keys
        self._out_gate_bias, self._forget_gate_bias = out_gate_bias, forget_gate_bias
        if update not in ("sum", "normalized"):
            raise ValueError(f"memory update {update!r}: expected 'sum' or 'normalized'")
        self.normalized_update = update == "normalized"
        if write not in ("attend", "compete"):
            raise ValueError(f"memory write {write!r}: expected 'attend' or 'compete'")
        self.competitive_write = write == "compete"

    def reset_slot_keys(self) -> None:
        """E ~ N(0, 1). Queries have unit scale at init, so a token's logits over the slots then differ by ~1 and
        each slot's write attention picks its own tokens from the first write on. At the matrices' scale (0.088
        at d 128) the slots of a qa1 LM2 were near-copies after 15 writes at init (participation ratio of the
        bank 1.02 in block 0, against 3.7 with N(0, 1)), and equal slots get equal gradients."""
        if self.slot_keys is not None:
            nn.init.normal_(self.slot_keys, std=1.0)

    def reset_gate_biases(self) -> None:
        """Gate biases from the recipe: output gate (negative = start nearly closed), forget gate +1 (remember)."""
        with torch.no_grad():
            self.out_gate.bias.fill_(self._out_gate_bias)
            self.in_forget_gate.bias[: self.slot_dim].zero_()
            self.in_forget_gate.bias[self.slot_dim:].fill_(self._forget_gate_bias)

    # ------------------------------------------------------------------------------------------ state

    def init_state(self, batch_size: int, device=None) -> MemoryState:
        bank = self.bank0.to(device=device, dtype=torch.float32).unsqueeze(0).expand(batch_size, -1, -1)
        return MemoryState(bank)

    def _with_keys(self, state: MemoryState) -> MemoryState:
        if state.keys is not None and not torch.is_grad_enabled():
            return state
        keys, values = self.bank_keys_values(state.bank)
        return MemoryState(state.bank, state.pending_queries, state.pending_contents, state.pending_len, keys, values)

    def bank_keys_values(self, bank: Tensor) -> tuple[Tensor, Tensor]:
        """The read keys (pre-scaled by 1/√dh) and values (B, h, N, dh) of a bank (B, N, d_m)."""
        shared = bank.stride(0) == 0  # the initial bank is one tensor broadcast over the batch: project it once
        source = bank[:1] if shared else bank
        kv = self._split_heads(self.kv_proj.forward(source.to(self.kv_proj.weight.dtype)))
        if shared:
            kv = kv.expand(bank.shape[0], -1, -1, -1)
        keys, values = kv.chunk(2, dim=-1)
        if self.slot_keys is not None:  # (N, h·dh) -> (h, N, dh), broadcast over the batch
            keys = keys + self._split_heads(self.slot_keys.unsqueeze(0).to(keys.dtype))
        return keys * self.scale, values

    def _split_heads(self, t: Tensor) -> Tensor:
        """(B, L, h·c) -> (B, h, L, c)."""
        b, length, width = t.shape
        return t.view(b, length, self.heads, width // self.heads).transpose(1, 2)

    @staticmethod
    def _merge_heads(t: Tensor) -> Tensor:
        b, h, length, c = t.shape
        return t.transpose(1, 2).reshape(b, length, h * c)

    def _chunk_sizes(self, pending: int, total: int) -> list[int]:
        """Split `total` new tokens at segment boundaries, the first chunk completing the open segment."""
        first = min(self.segment_len - pending, total)
        rest = total - first
        sizes = [first] + [self.segment_len] * (rest // self.segment_len)
        return sizes + [rest % self.segment_len] if rest % self.segment_len else sizes

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, state: MemoryState, writes_kept: int | None = None,
                recorder=None, layer: int = 0, start_pos: int = 0,
                keep_state: bool = True) -> tuple[Tensor, MemoryState]:
        """Read for every token of `x` (B, T, d); write whenever a segment completes.

        Returns the gated memory output g_out ⊙ E_mem (B, T, d) and the new state. `writes_kept`: only the last
        this-many writes that this call reads keep their autograd history (truncated BPTT; a write at the call's
        very end, read by no token of it, keeps it too); None keeps all.
        `keep_state=False` skips a write at the very end of `x` that no token of this call reads (the returned
        state is then incomplete): a training step that discards the state saves that work.
        """
        state = self._with_keys(state)
        if (x.shape[1] == 1 and recorder is None and not torch.is_grad_enabled()
                and state.pending_len + 1 < self.segment_len):
            return self._decode_one(x, state)
        sizes = self._chunk_sizes(state.pending_len, x.shape[1])
        queries, contents = self.qu_proj.forward(x).split([self.d_model, self.content_width], dim=-1)
        queries, contents = self._split_heads(queries), self._split_heads(contents)
        if len(sizes) > 1:  # split, not slicing: one cheap backward
            queries, contents = queries.split(sizes, dim=2), contents.split(sizes, dim=2)
        else:
            queries, contents = (queries,), (contents,)
        n_read = read_writes(state.pending_len, x.shape[1], self.segment_len)
        reads, pos, write_idx = [], start_pos, 0
        for q, content in zip(queries, contents, strict=True):
            t = q.shape[2]
            completes = state.pending_len + t == self.segment_len
            if not completes:  # e.g. decoding: one fused kernel, scores not needed
                reads.append(self._read_open(q, state))
                if recorder is not None:
                    self._record_read(recorder, layer, pos, q, None, state)
                state = MemoryState(state.bank, state.pending_queries + (q,), state.pending_contents + (content,),
                                    state.pending_len + t, state.keys, state.values)
                pos += t
                continue
            if state.pending_queries:  # the segment began in an earlier call: score its earlier tokens too
                q = torch.cat([*state.pending_queries, q], dim=2)
                content = torch.cat([*state.pending_contents, content], dim=2)
            read, probs, scores = self._read_closing(q, t, state)
            reads.append(read)
            if recorder is not None:
                self._record_read(recorder, layer, pos, q if q.shape[2] == t else q[:, :, -t:], probs, state)
            pos += t
            if completes and (keep_state or pos < start_pos + x.shape[1] or recorder is not None):
                detach = writes_kept is not None and write_idx < n_read - writes_kept
                state = self._write(scores, content, state, detach, recorder, layer, pos)
                write_idx += 1
            elif not completes:
                state = MemoryState(state.bank, (q,), (content,), q.shape[2], state.keys, state.values)
        read = self._merge_heads(reads[0] if len(reads) == 1 else torch.cat(reads, dim=2))
        gate = torch.sigmoid(self.out_gate.forward(read))
        if recorder is not None:
            recorder.on_out_gate(layer, start_pos, gate)
        return gate * read, state

    def _record_read(self, recorder, layer: int, pos: int, q: Tensor, probs: Tensor | None,
                     state: MemoryState) -> None:
        """Hand the recorder the read weights (B, h, t, N) of the tokens `q` (B, h, t, dh) from `pos` on. An open
        segment's read ran fused (no weights): they are spelled out here, the output stays SDPA's."""
        if probs is None:
            probs = torch.matmul(q, state.keys.transpose(-1, -2)).softmax(dim=-1)
        recorder.on_read(layer, pos, probs)

    def _decode_one(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """The generic path specialised to one token inside a segment (token-by-token decoding): the same
        arithmetic with a third of the kernel launches and Python steps."""
        q, content, out = self.read_one(x, state.keys, state.values, state.pending_queries)
        return out, MemoryState(state.bank, state.pending_queries + (q,), state.pending_contents + (content,),
                                state.pending_len + 1, state.keys, state.values)

    def read_one(self, x: Tensor, keys: Tensor, values: Tensor,
                 pending_queries: tuple[Tensor, ...] = ()) -> tuple[Tensor, Tensor, Tensor]:
        """One token x (B, 1, d) reads the bank (its keys and values): (query (B, h, 1, dh), write content
        (B, h, 1, d_m/h), gated output (B, 1, d)). With a single token, (B, 1, h·c) reshapes to (B, h, 1, c)
        without a transpose. Shared by eager decoding and the static-shape decode step. `pending_queries`: the
        open segment's earlier queries (memory.key_window reads them; the static step, which refuses it, not)."""
        b = x.shape[0]
        q, content = self.qu_proj.forward(x).split([self.d_model, self.content_width], dim=-1)
        q = q.reshape(b, self.heads, 1, self.head_dim)
        content = content.reshape(b, self.heads, 1, self.content_width // self.heads)
        state = MemoryState(None, pending_queries=pending_queries, keys=keys, values=values)
        read = self._read_open(q, state).reshape(b, 1, self.d_model)
        return q, content, torch.sigmoid(self.out_gate.forward(read)).mul_(read)

    def _read_open(self, q: Tensor, state: MemoryState) -> Tensor:
        """The read (B, h, t, dh) of tokens whose segment is still open: one fused kernel, no weights kept."""
        return F.scaled_dot_product_attention(q, state.keys, state.values, scale=1.0)

    def _read_closing(self, q: Tensor, t: int, state: MemoryState) -> tuple[Tensor, Tensor, Tensor]:
        """The last t tokens' read when `q` (B, h, S, dh) completes a segment: (read (B, h, t, dh), their read
        weights over the slots (B, h, t, N), the whole segment's scores (B, h, S, N), which the write reuses)."""
        scores = self.write_scores(q, state.keys)
        # Slice only when earlier tokens were prepended: a no-op slice still costs a zero-filled gradient.
        probs = (scores if scores.shape[2] == t else scores[:, :, -t:]).softmax(dim=-1)
        return torch.matmul(probs, state.values), probs, scores

    def write_scores(self, queries: Tensor, keys: Tensor) -> Tensor:
        """The segment's read scores (B, h, S, N), which the slot write reuses; keys carry 1/√dh."""
        return torch.matmul(queries, keys.transpose(-1, -2))

    def updated_bank(self, scores: Tensor, content: Tensor, bank: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The write of one segment: (new bank, write attention, g_in, g_f) from the segment's read scores
        (B, h, S, N), its write contents (B, h, S, d_m/h) and the bank before it (B, N, d_m, float32)."""
        probs_w, strength = self.write_attention(scores)  # (B, h, N, S): each slot's weights over the tokens
        update = self._merge_heads(torch.matmul(probs_w, content)).float()  # (B, N, d_m)
        gates = torch.sigmoid(self.in_forget_gate.forward(torch.cat([update, bank], dim=-1).to(content.dtype))).float()
        g_in, g_forget = gates.chunk(2, dim=-1)
        if strength is not None:  # compete: a slot is written as much as the segment chose it (g_in as recorded)
            g_in = g_in * strength
        new_bank = g_in * torch.tanh(update) + g_forget * bank
        if self.normalized_update:
            # A weighted mean of the new content and the old slot: every entry stays within [-1, 1] (tanh and the
            # one-hot M0 are), however many segments are written. With the plain sum, a slot whose forget gate
            # sits near 1 grows with every write (measured: bank norm 2.6 after one segment, 172 after 62).
            new_bank = new_bank / (g_in + g_forget)
        return new_bank, probs_w, g_in, g_forget

    def write_attention(self, scores: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each slot's weights over the segment's tokens (B, h, N, S), summing to 1, from the read scores (B, h, S, N),
        and (compete only) how strongly each slot is written, (B, N, d_m).

        attend: every slot takes its own softmax over the tokens and is written in full. Slots whose keys are alike
        then take the same mean and are overwritten together: the qa1 LM2s kept one vector, the latest fact (their
        wrong answers were mostly the story's last place, docs/results.md).
        compete: each token's weight is split over the slots by the read softmax (a token writes where it reads
        from, as in Slot Attention); a slot takes the mean of what it received, with strength = its share of the
        segment x N (1 when the tokens spread evenly, as at init; 0 for a slot no token chose, which keeps its
        content; up to N for a slot that took the whole segment).
        """
        if not self.competitive_write:
            return scores.softmax(dim=-2).transpose(-1, -2), None
        shares = scores.float().softmax(dim=-1).transpose(-1, -2)  # (B, h, N, S): each token's shares sum to 1
        received = shares.sum(dim=-1, keepdim=True)  # (B, h, N, 1)
        # clamp: a slot no token chose (all shares underflowed) gets a zero update, not 0/0
        probs = (shares / received.clamp_min(1e-12)).to(scores.dtype)
        strength = received * (self.slots / scores.shape[-2])  # (B, h, N, 1) -> each head's d_m/h channels
        strength = self._merge_heads(strength.expand(-1, -1, -1, self.slot_dim // self.heads))
        return probs, strength

    def _write(self, scores: Tensor, content: Tensor, state: MemoryState, detach: bool, recorder, layer: int,
               end_pos: int) -> MemoryState:
        new_bank, probs_w, g_in, g_forget = self.updated_bank(scores, content, state.bank)
        if detach:
            new_bank = new_bank.detach()
        if recorder is not None:
            recorder.on_write(layer, end_pos, probs_w, g_in, g_forget, new_bank)
        return self._with_keys(MemoryState(self.carried(new_bank)))

    def carried(self, new_bank: Tensor) -> Tensor:
        """The bank the next segment reads: the new one, or with carry off the initial one."""
        return new_bank if self.carry else self.init_state(new_bank.shape[0], new_bank.device).bank


def read_writes(pending: int, t: int, segment: int) -> int:
    """How many of the writes of a call over t tokens (after `pending` tokens of an open segment) a token of the
    same call reads: all but one that completes at the call's very last token. Truncated BPTT (`writes_kept`)
    keeps the history of the last writes that are read; the unread one is skipped without keep_state."""
    return (pending + t - 1) // segment if t > 0 else 0


def identity_bank(slots: int, slot_dim: int) -> Tensor:
    """Slot r starts as the one-hot vector e_(r mod d_m), as in the paper."""
    bank = torch.zeros(slots, slot_dim)
    bank[torch.arange(slots), torch.arange(slots) % slot_dim] = 1.0
    return bank


class AssociativeMemory(LM2Memory):
    """memory.write = "delta": the bank is an associative matrix per head, written by the delta rule.

    The slot bank's write is addressed by the slots: every qa1 LM2 learned to store the latest fact's place and
    not whose place it is (docs/results.md). Here the address comes from the tokens, as in fast-weight and
    associative memories (DeltaNet, ARMT): each token t of a segment proposes a key k_t (unit norm), a value v_t
    and a strength β_t = σ(· + memory.write_strength_bias), and the segment's write applies, in token order,

        S ← S + β_t k_tᵀ (v_t − k_t S)        (S: d_h × d_h per head; writing v under k_t replaces what k_t held)

    so "Mary" can address what was stored under "Mary". A token reads r_t = q_t S (q_t unit norm), gated by the
    same output gate as the slot read. The bank keeps the slot module's shape contract, (B, h·d_h, d_h) in float32
    (h·d_h rows), so carrying, checkpoints and the segment bookkeeping are shared; memory.slots and
    memory.slot_dim do not apply. The S sequential updates of a segment are computed at once (the WY form of
    DeltaNet, Yang et al. 2024): with K, V, β the segment's keys, values and strengths,

        (I + tril₋₁(diag(β) K Kᵀ)) U = diag(β) (V − K S),      S' = S + Kᵀ U,

    one unit-triangular solve of S × S per head.
    """

    write_only_params = False  # keys, values and strengths come from the tokens' projection, which reads use too

    def __init__(self, d_model: int, heads: int, segment_len: int, out_gate_bias: float,
                 write_strength_bias: float = 0.0, key_window: int = 1, value_window: int = 1):
        nn.Module.__init__(self)
        if d_model % heads:
            raise ValueError("memory heads must divide d_model")
        self.d_model, self.heads, self.segment_len = d_model, heads, segment_len
        self.head_dim = d_model // heads
        # Per head the matrix has d_h rows ("slots") of width d_h; the bank stacks the heads: (h·d_h, d_h).
        self.slots, self.slot_dim = self.head_dim, self.head_dim
        self.scale = 1.0
        self.content_width = heads * (2 * self.head_dim + 1)  # per head: key, value, strength
        self.qu_proj = nn.Linear(d_model, d_model + self.content_width, bias=False)
        self.out_gate = nn.Linear(d_model, d_model)
        self.register_buffer("bank0", torch.zeros(d_model, self.head_dim), persistent=False)
        self.slot_keys = None
        self._out_gate_bias = out_gate_bias
        # A constant, not a parameter: the logit's weights can still move it, and checkpoints keep their tensors.
        self.write_strength_bias = write_strength_bias
        # memory.key_window K > 1: a token's key and query mix its own and the K - 1 tokens before it (within the
        # segment), per channel, as DeltaNet's short convolution. Why: the bank in block 1 binds a person to a
        # place only if block 1's input at the place token already carries the person; a linear probe found it
        # there in the two trained bases whose LM2 learned to bind (100 %) and not in the four whose LM2 did not
        # (33-86 %), and the fine-tune did not put it there (docs/results.md, eleventh pass). "Mary journeyed to
        # the office": the person is 4-5 tokens before the place.
        self.key_window = key_window
        self.query_mix = self.key_mix = None
        if key_window > 1:
            self.query_mix = nn.Parameter(torch.empty(heads, key_window, self.head_dim))
            self.key_mix = nn.Parameter(torch.empty(heads, key_window, self.head_dim))
        # memory.value_window V > 1: the value written under token t's key mixes the values of t and the V - 1
        # tokens after it in the segment. Causal: the bank is written once the segment is complete and read only by
        # later segments. Then "Mary journeyed to the office" can store the place under the person's own token,
        # whose key needs nothing from the backbone (the other way round from key_window).
        self.value_window = value_window
        self.value_mix = nn.Parameter(torch.empty(heads, value_window, self.head_dim)) if value_window > 1 else None
        self.reset_window_mix()

    def reset_window_mix(self) -> None:
        """Every lag of a window weighs 1 at the start: keys, queries and values begin as the sum of their window, so
        the person is in the place token's key (or the place in the person's value) from the first step; with lag 0
        alone, the lags would have to be learned before they help, the chicken-and-egg of the binding itself.
        Measured: neither window made qa1's binding learnable (docs/results.md, eleventh pass)."""
        with torch.no_grad():
            for weights in (self.query_mix, self.key_mix, self.value_mix):
                if weights is not None:
                    weights.fill_(1.0)

    @staticmethod
    def window_mixed(raw: Tensor, weights: Tensor | None, ahead: bool = False) -> Tensor:
        """Σ_j w_j ⊙ raw_(t-j) (ahead: raw_(t+j)) over the window's lags j for every token of `raw` (B, h, t, d_h),
        which starts at a segment's first token (lags outside it are zero); `raw` unchanged without a window."""
        if weights is None:
            return raw
        out = raw * weights[:, 0].unsqueeze(1).to(raw.dtype)
        length = raw.shape[2]
        for lag in range(1, min(weights.shape[1], length)):
            shifted = F.pad(raw, (0, 0, 0, lag))[:, :, lag:] if ahead else F.pad(raw, (0, 0, lag, 0))[:, :, :length]
            out = out + shifted * weights[:, lag].unsqueeze(1).to(raw.dtype)
        return out

    def _mixed_queries(self, q: Tensor, state: MemoryState) -> Tensor:
        """The read queries of the tokens `q` (B, h, t, dh), the open segment's earlier tokens in `state`."""
        if self.query_mix is None:
            return q
        segment = torch.cat([*state.pending_queries, q], dim=2) if state.pending_queries else q
        return self.window_mixed(segment, self.query_mix)[:, :, -q.shape[2]:]

    def reset_gate_biases(self) -> None:
        with torch.no_grad():
            self.out_gate.bias.fill_(self._out_gate_bias)

    def bank_keys_values(self, bank: Tensor) -> tuple[Tensor, Tensor]:
        """S as (B, h, d_h, d_h), twice: the matrix is read directly, nothing is projected. It stands in for the
        keys too, so the slot bank's caching and static-decoding bookkeeping apply unchanged (the keys go unused)."""
        matrix = bank.reshape(bank.shape[0], self.heads, self.head_dim, self.head_dim)
        return matrix, matrix

    def _record_read(self, recorder, layer: int, pos: int, q: Tensor, probs, state: MemoryState) -> None:
        """No read weights here: the recorder gets the unit read queries q̂ (B, h, t, dh), from which (with the
        recorded writes) inspect-memory takes the read apart token by token (lm2cli/inspection/associative.py)."""
        recorder.on_delta_read(layer, pos, F.normalize(self._mixed_queries(q, state).float(), dim=-1))

    def _read_open(self, q: Tensor, state: MemoryState) -> Tensor:
        """The read of the tokens `q` (their raw queries; the open segment's earlier ones are in `state`)."""
        q = self._mixed_queries(q, state)
        return torch.matmul(F.normalize(q, dim=-1).to(state.values.dtype), state.values).to(q.dtype)

    def write_scores(self, queries: Tensor, keys: Tensor) -> None:
        """None: the delta rule's write needs only the tokens' keys, values and strengths (static decoding asks)."""
        return None

    def _read_closing(self, q: Tensor, t: int, state: MemoryState) -> tuple[Tensor, None, None]:
        # q[:, :, :-t] are the open segment's earlier queries, still in `state`: the key window sees them there
        return self._read_open(q if q.shape[2] == t else q[:, :, -t:], state), None, None

    def updated_bank(self, scores, content: Tensor, bank: Tensor) -> tuple[Tensor, None, Tensor, None]:
        """The delta-rule write of one segment: (new bank, None, the tokens' strengths β (B, h, S, 1), None)."""
        new_bank, _, beta, _ = self.delta_write(content, bank)
        return new_bank, None, beta, None

    def _write(self, scores, content: Tensor, state: MemoryState, detach: bool, recorder, layer: int,
               end_pos: int) -> MemoryState:
        new_bank, keys, beta, updates = self.delta_write(content, state.bank)
        if detach:
            new_bank = new_bank.detach()
        if recorder is not None:
            recorder.on_delta_write(layer, end_pos, keys, beta, updates, new_bank)
        return self._with_keys(MemoryState(self.carried(new_bank)))

    def delta_write(self, content: Tensor, bank: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One segment's write from its tokens' contents (B, h, S, 2·d_h + 1) and the bank before it: (new bank,
        unit keys K (B, h, S, d_h), strengths β (B, h, S, 1), updates U (B, h, S, d_h)) with S' = S + Kᵀ U, so
        that the matrix after any number of writes from S₀ = 0 is Σ_t k_tᵀ u_t over every written token."""
        b, dh = bank.shape[0], self.head_dim
        keys, values, beta = content.float().split([dh, dh, 1], dim=-1)  # (B, h, S, ·)
        keys = self.window_mixed(keys, self.key_mix)  # `content` is the whole segment, from its first token
        values = self.window_mixed(values, self.value_mix, ahead=True)
        keys, beta = F.normalize(keys, dim=-1), torch.sigmoid(beta + self.write_strength_bias)
        matrix = bank.reshape(b, self.heads, dh, dh)
        size = keys.shape[2]
        lower = torch.tril(beta * torch.matmul(keys, keys.transpose(-1, -2)), diagonal=-1)
        system = lower + torch.eye(size, dtype=lower.dtype, device=lower.device)
        residuals = torch.linalg.solve_triangular(system, beta * (values - torch.matmul(keys, matrix)), upper=False,
                                                  unitriangular=True)
        new = matrix + torch.matmul(keys.transpose(-1, -2), residuals)
        return new.reshape(b, self.heads * dh, dh), keys, beta, residuals
