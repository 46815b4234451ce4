"""Record what the memory does during a forward pass, for `lm2 inspect-memory` and for analysis.

Pass `recorder=MemoryRecorder()` to the model's forward. Each memory block reports its read attention for every
chunk of tokens, its output gate, and at every segment write its write attention, input and forget gates and the
new bank. The associative bank (memory.write = "delta") has no read weights: it reports each token's unit read
query, and at every write the tokens' keys, strengths and updates (on_delta_read / on_delta_write), from which
every read can be taken apart token by token. With no recorder the model computes nothing extra (the hooks are
plain `if recorder is not None`).
Tensors are detached and moved to the CPU as they arrive.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class WriteRecord:
    end_pos: int  # absolute position just after the segment that was written
    attention: Tensor  # (B, h, N, S) each slot's attention over the segment's tokens
    in_gate: Tensor  # (B, N, d_m)
    forget_gate: Tensor  # (B, N, d_m)
    bank: Tensor  # (B, N, d_m) memory after the write


@dataclass
class DeltaWriteRecord:
    end_pos: int
    keys: Tensor  # (B, h, S, dh) unit write keys
    beta: Tensor  # (B, h, S, 1) write strengths
    updates: Tensor  # (B, h, S, dh) what each token added under its key (S' = S + Kᵀ U)
    bank: Tensor  # (B, h·dh, dh) the matrix after the write


@dataclass
class MemoryRecorder:
    reads: dict[int, list[tuple[int, Tensor]]] = field(default_factory=lambda: defaultdict(list))
    out_gates: dict[int, list[tuple[int, Tensor]]] = field(default_factory=lambda: defaultdict(list))
    writes: dict[int, list[WriteRecord]] = field(default_factory=lambda: defaultdict(list))
    rmt_memory: list[tuple[int, Tensor]] = field(default_factory=list)
    delta_reads: dict[int, list[tuple[int, Tensor]]] = field(default_factory=lambda: defaultdict(list))
    delta_writes: dict[int, list[DeltaWriteRecord]] = field(default_factory=lambda: defaultdict(list))

    # hooks called by the model -------------------------------------------------------------------------
    def on_read(self, layer: int, start_pos: int, probs: Tensor) -> None:
        self.reads[layer].append((start_pos, probs.detach().float().cpu()))

    def on_out_gate(self, layer: int, start_pos: int, gate: Tensor) -> None:
        self.out_gates[layer].append((start_pos, gate.detach().float().cpu()))

    def on_write(self, layer: int, end_pos: int, attention: Tensor, in_gate: Tensor, forget_gate: Tensor,
                 bank: Tensor) -> None:
        self.writes[layer].append(WriteRecord(end_pos, attention.detach().float().cpu(),
                                              in_gate.detach().float().cpu(), forget_gate.detach().float().cpu(),
                                              bank.detach().float().cpu()))

    def on_delta_read(self, layer: int, start_pos: int, queries: Tensor) -> None:
        """memory.write = "delta": the unit read queries (B, h, t, dh) of t tokens from `start_pos` on."""
        self.delta_reads[layer].append((start_pos, queries.detach().float().cpu()))

    def on_delta_write(self, layer: int, end_pos: int, keys: Tensor, beta: Tensor, updates: Tensor,
                       bank: Tensor) -> None:
        """memory.write = "delta": a segment's unit keys and updates (B, h, S, dh), strengths β (B, h, S, 1) and the
        matrix after the write (B, h·dh, dh); the write added Kᵀ U to each head's matrix."""
        self.delta_writes[layer].append(DeltaWriteRecord(end_pos, *(t.detach().float().cpu()
                                                                    for t in (keys, beta, updates, bank))))

    def on_rmt_write(self, end_pos: int, memory: Tensor) -> None:
        self.rmt_memory.append((end_pos, memory.detach().float().cpu()))

    # views ---------------------------------------------------------------------------------------------
    def read_attention(self, layer: int) -> Tensor:
        """(B, h, T, N): every recorded token's attention over the slots, in token order."""
        return torch.cat([p for _, p in sorted(self.reads[layer], key=lambda r: r[0])], dim=2)

    def output_gate(self, layer: int) -> Tensor:
        """(B, T, d): the output gate of every recorded token."""
        return torch.cat([g for _, g in sorted(self.out_gates[layer], key=lambda r: r[0])], dim=1)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.reads) | set(self.writes) | set(self.delta_reads) | set(self.delta_writes))
