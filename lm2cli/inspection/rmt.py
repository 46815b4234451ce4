"""RMT through what it has: attention weights on the memory tokens, spelled out by a block pre-hook.

An RMT segment runs as [M ; tokens ; M] (docs/architecture.md §3): key positions 0..m-1 are the read prefix,
m..m+S-1 the segment's tokens and m+S..2m+S-1 the write suffix, whose final hidden states become the next
memory. The backbone uses fused attention, which never forms the weights, so the hook recomputes them from
the block's own inputs (norm, fused q/k/v projection, RoPE, cached keys, mask), exactly as
`Attention.forward` does; a test checks that these weights reproduce the block's attention output.

    token queries  -> `read`:  attention mass on each read-prefix memory token        (t, m)
    write suffix   -> `write`: each memory token's attention on the segment's tokens  (m, S), and
                      `write_split`: its mass on prefix / segment tokens / suffix      (m, 3)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lm2cli.inspection.recording import reduce_heads
from lm2cli.model.model import apply_rope


def attention_weights(block, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, causal: bool,
                      cached_k: Tensor | None, cached_v: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax weights (B, heads, t, keys) of `block`'s self-attention for input `h`, and the values
    (B, heads, keys, dh) they weigh (key/value heads repeated for grouped-query attention)."""
    attn = block.attn
    b, t, _ = h.shape
    heads, kv_heads, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv = attn.wqkv.forward(block.norm1.forward(h)).view(b, t, heads + 2 * kv_heads, dh)
    qk, v = qkv.split([heads + kv_heads, kv_heads], dim=2)
    q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([heads, kv_heads], dim=1)
    v = v.transpose(1, 2)
    if cached_k is not None:
        k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
    k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        n_keys = k.shape[2]
        future = torch.ones(t, n_keys, dtype=torch.bool, device=h.device).triu(n_keys - t + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.float().softmax(dim=-1), v


def record_block(recorder, args, block, call: dict) -> None:
    """Pre-hook body for one RMT block call (`call`: Block.forward's arguments by name)."""
    if call.get("recorder") is not recorder:
        return
    h, st, start = call["h"], call["st"], call["start_pos"]
    probs, _ = attention_weights(block, h, call["cos"], call["sin"], call["mask"], call["causal"], st.k, st.v)
    probs = reduce_heads(probs[0], recorder.heads).float().cpu()  # (t, keys): small, indexed on the CPU
    t, m, seg = h.shape[1], args.slots, args.segment_len
    n_cached = 0 if st.k is None else st.k.shape[2]
    key_pos = torch.arange(start - n_cached, start + t)
    query_pos = torch.arange(start, start + t)
    prefix, tokens, suffix = key_pos < m, (key_pos >= m) & (key_pos < m + seg), key_pos >= m + seg
    if start == m + seg:  # the write suffix: its m queries gather the segment into the next memory
        write = torch.zeros(t, seg)
        write[:, key_pos[tokens] - m] = probs[:, tokens]
        split = torch.stack([probs[:, part].sum(-1) for part in (prefix, tokens, suffix)], dim=-1)
        recorder.pending_writes[block.layer] = {"write": write, "write_split": split}
        return
    rows = query_pos >= m  # token queries (the first call of a segment also runs the read prefix itself)
    read = torch.zeros(int(rows.sum()), m)
    read[:, key_pos[prefix]] = probs[rows][:, prefix]
    recorder.traces[block.layer].add("read", read)
