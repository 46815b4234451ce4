"""What `lm2 inspect-memory` keeps from one pass: per block, head-reduced matrices and per-slot statistics.

`TraceRecorder` extends `lm2cli.model.MemoryRecorder` (the model calls the same hooks). Instead of every full
matrix it keeps, for one sequence and the blocks asked for, with the heads reduced by `heads` (mean, max or
one head index):

    token series (one row per token, in order)           write series (one row per written segment)
      read           (T, N)  attention over the slots       write        (W, N, S) each slot's attention over
      out_gate_mean  (T,)    mean output gate                                      the segment's tokens
      out_gate_open  (T,)    share of its units above 0.5   write_end    (W,)  position just after the segment
      inputs         (T, d)  memory input (keep_inputs)     in_gate_mean / in_gate_open          (W, N)
                                                            forget_gate_mean / forget_gate_open  (W, N)
                                                            slot_norm    (W, N)  |M_s| after the write
                                                            slot_change  (W, N)  |M_s' - M_s| at the write

so a 16k-token text costs a few megabytes per block (T·N + W·N·S numbers) rather than heads × that plus the
d-wide gates and banks. `full=True` also keeps the per-head and full-width tensors (read_heads, write_heads,
out_gate, in_gate, forget_gate, bank).

The associative bank (memory.write = "delta") has no read weights and no slots. Its blocks keep every head:

    query          (T, h, dh)  each token's unit read query q̂
    write_key      (T_w, h, dh) each written token's unit key k̂      (T_w: tokens of the written segments)
    beta           (T_w, h)    its write strength β
    write_update   (T_w, h, dh) what it added under its key, u (S' = S + Σ k̂ᵀu over a segment)
    write_end      (W,)        position just after written segment w
    matrix_norm / matrix_change  (W, h)  |S| per head after write w and |S' - S| at it

so that a read q̂ S = Σ_t (q̂·k̂_t) u_t splits exactly over the written tokens (lm2cli/inspection/associative.py).

RMT has no bank: `recording()` attaches forward pre-hooks to its blocks that spell out the attention weights
(lm2cli/inspection/rmt.py). Its "slots" are the m memory tokens: `read` is each token's attention on the read
prefix, `write` the write suffix's attention on the segment's tokens, and `memory` (model-level) holds their
norm and change at each write.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

from lm2cli.model.recorder import MemoryRecorder

TOKEN_SERIES = {"read", "out_gate_mean", "out_gate_open", "inputs", "read_heads", "out_gate",
                "query", "write_key", "beta", "write_update"}


def reduce_heads(t: Tensor, heads: str | int) -> Tensor:
    """Reduce the leading head axis: "mean", "max", or keep one head (an index)."""
    if heads == "mean":
        return t.mean(0)
    if heads == "max":
        return t.amax(0)
    return t[heads]


class Trace:
    """One block's tensors, appended piece by piece: token series are concatenated, write series stacked."""

    def __init__(self):
        self.parts: dict[str, list[Tensor]] = defaultdict(list)
        self.tokens_read = 0  # tokens whose read has been recorded: the position the next read must start at

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().cpu()
        self.parts[name].append(value.float() if value.is_floating_point() else value)

    def get(self, name: str) -> Tensor:
        parts = self.parts[name]
        if not parts:
            raise KeyError(name)
        return torch.cat(parts) if name in TOKEN_SERIES else torch.stack(parts)

    def tensors(self) -> dict[str, Tensor]:
        return {name: self.get(name) for name, parts in self.parts.items() if parts}

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for parts in self.parts.values() for p in parts)


class TraceRecorder(MemoryRecorder):
    """Reduced recording of one sequence (batch size 1) for the blocks in `layers` (None = all)."""

    def __init__(self, layers: list[int] | None = None, heads: str | int = "mean", keep_inputs: bool = False,
                 full: bool = False):
        super().__init__()
        self.wanted = None if layers is None else set(layers)
        self.heads, self.keep_inputs, self.full = heads, keep_inputs, full
        self.traces: dict[int, Trace] = defaultdict(Trace)
        self.memory = Trace()  # RMT memory tokens at each write (model-level)
        self._previous: dict[int, Tensor] = {}  # bank (or RMT memory) before the next write, to measure change
        self.pending_writes: dict[int, dict[str, Tensor]] = {}  # RMT: suffix attention waiting for its write

    def records(self, layer: int) -> bool:
        return self.wanted is None or layer in self.wanted

    # hooks called by the model ------------------------------------------------------------------------
    def _reading_trace(self, layer: int, start_pos: int, tokens: int) -> Trace | None:
        """The block's trace for the reads of `tokens` tokens from `start_pos` on (None: the block is not
        recorded); they must follow the reads recorded so far."""
        if not self.records(layer):
            return None
        trace = self.traces[layer]
        if start_pos != trace.tokens_read:
            raise RuntimeError(f"block {layer}: read at position {start_pos} after {trace.tokens_read} tokens; a "
                               f"TraceRecorder follows one sequence from its start")
        trace.tokens_read += tokens
        return trace

    def on_read(self, layer: int, start_pos: int, probs: Tensor) -> None:
        trace = self._reading_trace(layer, start_pos, probs.shape[2])
        if trace is None:
            return
        p = _one(probs)  # (h, t, N)
        trace.add("read", reduce_heads(p, self.heads))
        if self.full:
            trace.add("read_heads", p.transpose(0, 1))

    def on_out_gate(self, layer: int, start_pos: int, gate: Tensor) -> None:
        if not self.records(layer):
            return
        g = _one(gate)  # (t, d)
        trace = self.traces[layer]
        trace.add("out_gate_mean", g.mean(-1))
        trace.add("out_gate_open", (g > 0.5).float().mean(-1))
        if self.full:
            trace.add("out_gate", g)

    def on_write(self, layer: int, end_pos: int, attention: Tensor, in_gate: Tensor, forget_gate: Tensor,
                 bank: Tensor) -> None:
        if not self.records(layer):
            return
        trace = self.traces[layer]
        a, g_in, g_f, m = _one(attention), _one(in_gate), _one(forget_gate), _one(bank).float()
        trace.add("write", reduce_heads(a, self.heads))
        trace.add("write_end", torch.tensor(end_pos))
        for name, g in (("in_gate", g_in), ("forget_gate", g_f)):
            trace.add(f"{name}_mean", g.mean(-1))
            trace.add(f"{name}_open", (g > 0.5).float().mean(-1))
        self._add_bank_change(trace, layer, m)
        if self.full:
            for name, value in (("write_heads", a), ("in_gate", g_in), ("forget_gate", g_f), ("bank", m)):
                trace.add(name, value)

    def on_delta_read(self, layer: int, start_pos: int, queries: Tensor) -> None:
        trace = self._reading_trace(layer, start_pos, queries.shape[2])
        if trace is None:
            return
        trace.add("query", _one(queries).transpose(0, 1))  # (t, h, dh): every head, the analysis needs them

    def on_delta_write(self, layer: int, end_pos: int, keys: Tensor, beta: Tensor, updates: Tensor,
                       bank: Tensor) -> None:
        if not self.records(layer):
            return
        trace = self.traces[layer]
        trace.add("write_key", _one(keys).transpose(0, 1))  # (S, h, dh)
        trace.add("beta", _one(beta)[..., 0].T)  # (S, h)
        trace.add("write_update", _one(updates).transpose(0, 1))  # (S, h, dh)
        trace.add("write_end", torch.tensor(end_pos))
        heads = _one(keys).shape[0]
        matrix = _one(bank).float().reshape(heads, -1, bank.shape[-1])  # (h, dh, dh)
        before = self._previous[layer].reshape(matrix.shape)
        trace.add("matrix_norm", matrix.flatten(1).norm(dim=-1))
        trace.add("matrix_change", (matrix - before).flatten(1).norm(dim=-1))
        self._previous[layer] = matrix.detach().cpu()
        if self.full:
            trace.add("bank", matrix)

    def on_rmt_write(self, end_pos: int, memory: Tensor) -> None:
        self.memory.add("write_end", torch.tensor(end_pos))
        self._add_bank_change(self.memory, -1, _one(memory).float())
        for layer, pending in sorted(self.pending_writes.items()):
            trace = self.traces[layer]
            for name, value in pending.items():
                trace.add(name, value)
            trace.add("write_end", torch.tensor(end_pos))
        self.pending_writes.clear()

    def _add_bank_change(self, trace: Trace, key: int, bank: Tensor) -> None:
        bank = bank.detach().float().cpu()
        trace.add("slot_norm", bank.norm(dim=-1))
        trace.add("slot_change", (bank - self._previous[key]).norm(dim=-1))
        self._previous[key] = bank

    # attaching to a model -----------------------------------------------------------------------------
    def seed(self, banks: dict[int, Tensor]) -> None:
        """The memory before the first write, per block (-1: RMT's memory tokens), to measure its change."""
        self._previous |= {key: bank.detach().float().cpu() for key, bank in banks.items()}

    @contextmanager
    def recording(self, model, state):
        """Follow `model` from `state` (a fresh sequence): remember the starting banks (to measure each write's
        change) and, where the hooks above are not enough, attach forward pre-hooks for the duration."""
        if model.args.arch == "rmt":
            self.seed({-1: _one(state.rmt_memory)})
        else:
            self.seed({block.layer: _one(layer.memory.bank)
                       for block, layer in zip(model.blocks, state.layers, strict=True) if block.memory is not None})
        handles = []
        for block in model.blocks:
            if not self.records(block.layer):
                continue
            if model.args.arch == "rmt":
                from lm2cli.inspection.rmt import record_block

                hook = partial(_bound_hook, block, partial(record_block, self, model.args, block))
                handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            elif self.keep_inputs and block.memory is not None and model.args.memory_write != "delta":
                hook = partial(_bound_hook, block.memory, partial(self._record_input, block.layer))
                handles.append(block.memory.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _record_input(self, layer: int, args: dict) -> None:
        if args.get("recorder") is self:
            self.traces[layer].add("inputs", _one(args["x"]))

    # sizes --------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor this recorder holds (the base class's lists stay empty)."""
        held = [*self.traces.values(), self.memory]
        return (sum(t.nbytes() for t in held) + sum(b.numel() * b.element_size() for b in self._previous.values())
                + sum(v.numel() * v.element_size() for p in self.pending_writes.values() for v in p.values()))

    @property
    def layers(self) -> list[int]:
        return sorted(self.traces)


def _one(t: Tensor) -> Tensor:
    if t.shape[0] != 1:
        raise ValueError(f"TraceRecorder follows one sequence; got a batch of {t.shape[0]}")
    return t[0]


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bound_hook(module, record, _module, args, kwargs) -> None:
    """A forward pre-hook that hands `record` the call's arguments by name (robust to their order)."""
    sig = _SIGNATURES.get(type(module))
    if sig is None:
        sig = _SIGNATURES[type(module)] = inspect.signature(type(module).forward)
    record(sig.bind(module, *args, **kwargs).arguments)
