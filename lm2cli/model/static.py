"""Static-shape decoding: one token per step with the same tensor shapes at every position (gpt-fast style), so
that `torch.compile` compiles the step once and, on a GPU, `mode="reduce-overhead"` can replay it as a CUDA graph.

The eager model keeps a growing state (KV caches that are concatenated and trimmed, the open memory segment as
a tuple of pieces). Here everything is preallocated and written in place:

    KV cache       (B, h_kv, L, dh) per block: a ring buffer of L slots; `slot_pos` (L,) holds the position
                   stored in each slot (-1 = empty), so the mask is a comparison of positions, whatever the
                   slot order. L = W with a window W; max_seq_len with full attention; for RMT one segment
                   [M ; S tokens ; M] (or W - 1 + m with a shorter window).
    LM2 memory     per memory block: the bank (B, N, d_m), its read keys and values, and the open segment's read
                   queries (B, h, S, dh) and write contents (B, h, S, d_m/h); position mod S is the fill count.
    position       `pos` (1,) int64, advanced inside the step; the step's input token is `tokens` (B, 1).

Three fixed-shape functions, each compiled once (`compile=True`):

    step()              token (B, 1) in `tokens` -> logits (B, V): the single-token step of every architecture
    write_memory()      LM2, after the token that completes a segment: the segment-completing write
    rmt_boundary()      RMT, after a segment's last token: the write suffix [M] through the segment's cache,
                        then a fresh cache holding the next segment's read prefix [M'] (m tokens at once)

Prefill stays eager (chunked, linear in the prompt); `load(state)` copies its state into the buffers. The
tokens equal the eager path's (tested for all three architectures, across segment boundaries and window
wrap-around), and the step compiles once (tested by counting compilations).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm2cli.model.model import LanguageModel, ModelState, rope_cos_sin


def compile_options(device: torch.device) -> dict:
    """How `lm2 generate --compile` compiles the fixed-shape functions on this device.

    CUDA: mode "reduce-overhead", i.e. CUDA graphs: one graph launch per token instead of hundreds of kernel
    launches. CPU: the C++ wrapper (the compiled kernels are called from C++ rather than from a generated
    Python function): 20% faster steps on the small recipe's model; weight freezing was measured too and did
    not help.
    """
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"options": {"cpp_wrapper": True}}


class StaticDecoder(nn.Module):
    """Fixed-shape decoding state and steps for one model and batch size.

        decoder = StaticDecoder(model, batch_size=1, compile=True)
        logits, state = model(prompt, None)           # eager prefill
        decoder.load(state)
        logits = decoder.decode(next_token)           # (B, 1) -> (B, V), then again with the next token

    The buffers are allocated on the first `load` (their dtypes follow the eager state's, e.g. under autocast)
    and reused by later loads with the same batch size, so one compilation serves every prompt.
    """

    def __init__(self, model: LanguageModel, batch_size: int = 1, compile: bool = False,
                 backend: str | object = "inductor", mode: str | None = None, options: dict | None = None):
        super().__init__()
        a = model.args
        self.model = model
        self.batch_size = batch_size
        self.arch, self.window, self.segment = a.arch, a.window, a.segment_len
        self.n_mem_tokens = a.slots if a.arch == "rmt" else 0
        self.cache_len = self._cache_len(a)
        self.memory_blocks = [i for i, b in enumerate(model.blocks) if b.memory is not None]
        # memory.key_window mixes a read query with the open segment's earlier ones, which the fixed-shape step
        # does not pass; memory.value_window acts in the segment-end write alone and is supported.
        if any(getattr(model.blocks[i].memory, "key_window", 1) > 1 for i in self.memory_blocks):
            raise ValueError("memory.key_window > 1 has no static-shape decode step")  # Generator refuses first
        if not model.memory_carry:  # the no-carry control is an eager evaluation; this step always carries
            raise ValueError("the static-shape decode step always carries the memory (set_memory_carry(True))")
        self.allocated = False
        self.position = 0  # Python mirror of `pos` (absolute; for RMT within the segment), for the boundaries
        self.absolute = 0  # tokens of the sequence so far
        self._step, self._write, self._boundary = self.step, self.write_memory, self.rmt_boundary
        self.cuda_graphs = compile and mode == "reduce-overhead"
        self.compiled = compile
        if compile:
            kwargs = dict(fullgraph=True, dynamic=False, backend=backend, mode=mode, options=options)
            self._step = torch.compile(self.step, **kwargs)
            self._write = torch.compile(self.write_memory, **kwargs)
            self._boundary = torch.compile(self.rmt_boundary, **kwargs)

    @staticmethod
    def _cache_len(a) -> int:
        """Slots of the KV ring buffer: every key a query can still see, plus room for the keys written in the
        same call (m at once for RMT's memory tokens), so that writing never evicts a visible key."""
        if a.arch == "rmt":
            per_segment = 2 * a.slots + a.segment_len  # attention never spans more than [M ; tokens ; M]
            return per_segment if a.window == 0 else min(per_segment, a.window - 1 + a.slots)
        return a.window if a.window > 0 else a.max_seq_len

    # ------------------------------------------------------------------------------------------ buffers

    def _allocate(self, state: ModelState) -> None:
        m, b, dev = self.model, self.batch_size, self.model.tok_emb.weight.device
        key_dtype = next((ls.k.dtype for ls in state.layers if ls.k is not None), m.tok_emb.weight.dtype)
        attn = m.blocks[0].attn
        shape = (b, attn.n_kv_heads, self.cache_len, attn.head_dim)
        for i in range(len(m.blocks)):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=key_dtype, device=dev), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=key_dtype, device=dev), persistent=False)
        self.register_buffer("slot_pos", torch.full((self.cache_len,), -1, dtype=torch.long, device=dev),
                             persistent=False)
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("tokens", torch.zeros(b, 1, dtype=torch.long, device=dev), persistent=False)
        for i in self.memory_blocks:
            mem, st = m.blocks[i].memory, state.layers[i].memory
            keys, _ = mem.bank_keys_values(st.bank) if st.keys is None else (st.keys, None)
            self.register_buffer(f"bank{i}", torch.zeros(st.bank.shape, dtype=torch.float32, device=dev),
                                 persistent=False)
            kv_shape = (b, mem.heads, mem.slots, mem.head_dim)
            self.register_buffer(f"mkeys{i}", torch.zeros(kv_shape, dtype=keys.dtype, device=dev), persistent=False)
            self.register_buffer(f"mvalues{i}", torch.zeros(kv_shape, dtype=keys.dtype, device=dev), persistent=False)
            self.register_buffer(f"queries{i}", torch.zeros(b, mem.heads, self.segment, mem.head_dim,
                                                            dtype=keys.dtype, device=dev), persistent=False)
            self.register_buffer(f"contents{i}", torch.zeros(b, mem.heads, self.segment, mem.content_width // mem.heads,
                                                             dtype=keys.dtype, device=dev), persistent=False)
        if self.arch == "rmt":
            self.register_buffer("rmt_memory", torch.zeros(b, self.n_mem_tokens, m.args.d_model,
                                                           dtype=state.rmt_memory.dtype, device=dev), persistent=False)
        if self.compiled:
            # Fixed addresses: CUDA graphs read and update these buffers in place instead of copying them.
            for buf in self.buffers(recurse=False):
                torch._dynamo.mark_static_address(buf)
        self.allocated = True

    def buffer(self, name: str, i: int) -> Tensor:
        return getattr(self, f"{name}{i}")

    @torch.no_grad()
    def load(self, state: ModelState) -> None:
        """Copy an eager state (after prefill) into the buffers; decoding continues exactly where it stops."""
        if state.layers[0].k is not None and state.layers[0].k.shape[0] != self.batch_size or (
                state.layers[0].memory is not None and state.layers[0].memory.bank.shape[0] != self.batch_size):
            raise ValueError(f"state of another batch size than this decoder's {self.batch_size}")
        if not self.allocated:
            self._allocate(state)
        self.absolute = state.pos
        position = state.pos if self.arch != "rmt" else self.n_mem_tokens + state.rmt_seg_len
        if self.arch != "rmt" and self.window == 0 and state.pos >= self.cache_len:
            raise ValueError(f"{state.pos} tokens exceed model.max_seq_len = {self.cache_len} "
                             f"of a full-attention model")
        self.slot_pos.fill_(-1)
        for i, ls in enumerate(state.layers):
            if ls.k is not None:
                n = ls.k.shape[2]
                positions = torch.arange(position - n, position, device=self.slot_pos.device)
                slots = positions % self.cache_len
                self.buffer("k", i).index_copy_(2, slots, ls.k.to(self.buffer("k", i).dtype))
                self.buffer("v", i).index_copy_(2, slots, ls.v.to(self.buffer("v", i).dtype))
                self.slot_pos.index_copy_(0, slots, positions)
        for i in self.memory_blocks:
            self._load_memory(i, state.layers[i].memory, state.pos)
        self.pos.fill_(position)
        self.position = position
        if self.arch == "rmt":
            self.rmt_memory.copy_(state.rmt_memory)
            if state.rmt_seg_len == 0:  # the segment has not started: its read prefix is not in the cache yet
                self.rmt_read_prefix()  # once per prompt: not worth a compilation

    def _load_memory(self, i: int, st, pos: int) -> None:
        mem = self.model.blocks[i].memory
        if st.pending_len != pos % self.segment:
            raise ValueError("memory state out of step with the position")  # a bug, not a user error
        keys, values = (st.keys, st.values) if st.keys is not None else mem.bank_keys_values(st.bank)
        self.buffer("bank", i).copy_(st.bank)
        self.buffer("mkeys", i).copy_(keys)
        self.buffer("mvalues", i).copy_(values)
        if st.pending_len:
            self.buffer("queries", i)[:, :, :st.pending_len] = torch.cat(st.pending_queries, dim=2)
            self.buffer("contents", i)[:, :, :st.pending_len] = torch.cat(st.pending_contents, dim=2)

    def warmed_up(self):
        """A context for decoding once every compiled function has run (e.g. through one segment boundary):
        Dynamo then skips evaluating its ~1,000 guards per call (60 us of a 750 us step on the small recipe's
        model). Safe here because the functions only ever see this decoder's own fixed buffers: their guards
        cannot fail, so there is nothing to recompile."""
        if not self.compiled:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    # ---------------------------------------------------------------------------------- decoding

    def decode(self, token: Tensor) -> Tensor:
        """Logits (B, V) of the next token after `token` (B, 1); runs the segment boundaries as they come."""
        self.tokens.copy_(token)  # a fixed input: a caller's slice (any strides) would not recompile the step
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
            logits = self._step().clone()  # ... so the caller gets its own copy
        else:
            logits = self._step()
        self.position += 1
        self.absolute += 1
        if self.memory_blocks and self.absolute % self.segment == 0:
            self._write()
        if self.arch == "rmt" and self.position == self.n_mem_tokens + self.segment:
            self._boundary()
            self.position = self.n_mem_tokens
        return logits

    def step(self) -> Tensor:
        """The fixed-shape single-token step (the token in `tokens`): the same shapes at every position."""
        m = self.model
        h = m.tok_emb(self.tokens)
        h = self._blocks(h, with_memory=True)
        self.pos.add_(1)
        return m.lm_head(m.norm(h)).float()[:, -1]

    def _blocks(self, h: Tensor, with_memory: bool) -> Tensor:
        """h (B, t, d) at positions pos .. pos + t - 1 through every block, keys written into the ring."""
        m, t = self.model, h.shape[1]
        positions = self.pos + torch.arange(t, device=h.device)
        cos, sin = rope_cos_sin(positions, m.inv_freq)
        cos, sin = cos.to(h.dtype).unsqueeze(1), sin.to(h.dtype).unsqueeze(1)
        slots = positions % self.cache_len
        self.slot_pos.index_copy_(0, slots, positions)
        stored = self.slot_pos.unsqueeze(0)  # (1, L)
        query = positions.unsqueeze(1)  # (t, 1)
        visible = (stored >= 0) & (stored <= query)
        if self.window > 0:
            visible &= stored > query - self.window
        for i, block in enumerate(m.blocks):
            x = block.norm1.forward(h)
            q, k, v = block.attn.project(x, cos, sin)
            k_cache, v_cache = self.buffer("k", i), self.buffer("v", i)
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
            out = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=visible,
                                                 enable_gqa=block.attn.gqa)
            h = h + block.attn.merge(out)
            if with_memory and block.memory is not None:
                h = h + self._read_memory(i, block.memory, x)
            h = h + block.ffn.forward(block.norm2.forward(h))
        return h

    def _read_memory(self, i: int, mem, x: Tensor) -> Tensor:
        q, content, out = mem.read_one(x, self.buffer("mkeys", i), self.buffer("mvalues", i))
        fill = self.pos % self.segment
        self.buffer("queries", i).index_copy_(2, fill, q.to(self.buffer("queries", i).dtype))
        self.buffer("contents", i).index_copy_(2, fill, content.to(self.buffer("contents", i).dtype))
        return out

    def write_memory(self) -> None:
        """The segment-completing write of every memory block (fixed shapes: a full segment of S tokens)."""
        for i in self.memory_blocks:
            mem = self.model.blocks[i].memory
            keys = self.buffer("mkeys", i)
            scores = mem.write_scores(self.buffer("queries", i), keys)
            bank, _, _, _ = mem.updated_bank(scores, self.buffer("contents", i), self.buffer("bank", i))
            new_keys, new_values = mem.bank_keys_values(bank)
            self.buffer("bank", i).copy_(bank)
            keys.copy_(new_keys)
            self.buffer("mvalues", i).copy_(new_values)

    def rmt_boundary(self) -> None:
        """RMT between segments: the write suffix [M] at positions m + S .. through the segment's cache gives
        the next memory M' = norm(last hidden states); then the next segment's read prefix."""
        m = self.model
        self.pos.fill_(self.n_mem_tokens + self.segment)
        self.rmt_memory.copy_(m.norm(self._blocks(self.rmt_memory.to(m.tok_emb.weight.dtype), False)))
        self.rmt_read_prefix()

    def rmt_read_prefix(self) -> None:
        """A fresh cache holding the read prefix [M] at positions 0 .. m - 1; the next token sits at m."""
        self.slot_pos.fill_(-1)
        self.pos.zero_()
        self._blocks(self.rmt_memory.to(self.model.tok_emb.weight.dtype), with_memory=False)
        self.pos.fill_(self.n_mem_tokens)
