"""The associative bank (memory.write = "delta") taken apart: which tokens write, and where a read comes from.

Each segment's write adds Kᵀ U to a head's matrix (unit keys k̂_t, updates u_t; lm2cli/model/memory.py) and
the matrix starts at zero, so a token reading after the first n written tokens reads

    r = q̂ S = Σ_{t < n} (q̂ · k̂_t) u_t            (per head; q̂ its unit read query)

exactly. Token t's *share* of the read is the projection of its term on r, (q̂ · k̂_t)(u_t · r) / |r|²: the
shares of the written tokens sum to 1 per head (a negative share cancels part of the others). The shares of
the answer position, summed over the fact tokens and over the supporting-fact tokens and set against those
tokens' share of what was written ("even"), say whether the question's read draws on the facts, and on the
right ones: a register of the latest fact puts its read on the last fact whoever is asked about. The shares
are signed, so the facts' sum can hide a cancellation: the delta rule overwrites a person's earlier place by
writing its negative, and both facts then carry large shares of opposite sign. The per-fact shares show it.

Write ratio: the mean write strength β of the fact tokens over that of the other written tokens (1: facts are
written like any haystack token).

Reads only the recorded tensors (lm2cli/inspection/recording.py), never the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lm2cli.inspection.analysis import _round, segment_stats
from lm2cli.inspection.recording import reduce_heads


def is_associative(tensors: dict[str, Tensor]) -> bool:
    return "query" in tensors


def tokens_written_before(tensors: dict[str, Tensor], pos: int) -> int:
    """How many tokens (positions 0 ... n-1) the matrix read at `pos` holds: those of the segments that ended
    at or before `pos`."""
    ends = [e for e in tensors["write_end"].long().tolist() if e <= pos] if "write_end" in tensors else []
    return max(ends, default=0)


def read_terms(tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, Tensor]:
    """(coefficients q̂·k̂_t (h, n), the read r (h, dh)) of the token at `pos` over the n tokens written before
    its segment."""
    n = tokens_written_before(tensors, pos)
    q = tensors["query"][pos]  # (h, dh)
    keys, updates = tensors["write_key"][:n], tensors["write_update"][:n]  # (n, h, dh)
    coefficients = torch.einsum("hd,nhd->hn", q, keys)
    return coefficients, torch.einsum("hn,nhd->hd", coefficients, updates)


def read_shares(tensors: dict[str, Tensor], pos: int) -> Tensor:
    """(h, n): each written token's share of the read at `pos`, per head (module doc); each row sums to 1 (0 for
    a head whose read is zero, e.g. before the first write)."""
    coefficients, read = read_terms(tensors, pos)
    n = coefficients.shape[1]
    updates = tensors["write_update"][:n]
    along = torch.einsum("nhd,hd->hn", updates, read)  # u_t · r
    norm2 = read.pow(2).sum(-1, keepdim=True)
    return torch.where(norm2 > 0, coefficients * along / norm2.clamp_min(1e-30), torch.zeros_like(along))


def read_position(ins) -> int:
    """The token whose read is taken apart: --read-at, else the answer position of a BABILong row, else the
    text's last token."""
    if ins.read_at is not None:
        return ins.read_at
    return ins.answer_pos if ins.answer_pos is not None else ins.n_prompt - 1


def summary_entry(ins, tensors: dict[str, Tensor], k: int) -> dict:
    """A block's summary: segments (β, matrix norm and change, output gate), the read of `read_position` (its
    top tokens by share) and, with facts marked, the write ratio and the read's share on (supporting) facts."""
    beta = reduce_heads(tensors["beta"].T, ins.heads) if "beta" in tensors else torch.zeros(0)  # (T_w,)
    pos = read_position(ins)
    shares = reduce_heads(read_shares(tensors, pos), ins.heads)  # (n,)
    top = shares.topk(min(k, len(shares))) if len(shares) else None
    entry = {"memory": "associative", "segments": segment_stats(tensors, ins.segment_len, len(ins.tokens)),
             "beta_mean": _round(beta.mean()) if len(beta) else None,
             "read": {"position": pos, "tokens_held": len(shares),
                      "top": [] if top is None else [
                          {"position": p, "token": ins.pieces[p], "share": _round(s)}
                          for s, p in zip(top.values.tolist(), top.indices.tolist(), strict=True)]}}
    for key, mask in (("facts", ins.fact_mask), ("supporting_facts", ins.support_mask)):
        if mask is not None:
            entry[key] = fact_numbers(beta, shares, mask)
    if ins.fact_index is not None:
        entry["per_fact"] = per_fact_shares(ins, shares)
    return entry


def per_fact_shares(ins, shares: Tensor) -> list[dict]:
    """For each fact the read holds (story order): its share of the answer read (the sum over its tokens),
    whether the answer rests on it, and its text."""
    held = min(len(shares), len(ins.fact_index))
    tokens: dict[int, list[int]] = {}
    for p in range(held):
        if ins.fact_index[p] >= 0:
            tokens.setdefault(ins.fact_index[p], []).append(p)
    support = ins.support_mask or []
    return [{"fact": i, "supporting": any(p < len(support) and support[p] for p in ps),
             "share": _round(shares[ps].sum()), "text": "".join(ins.pieces[p] for p in ps).strip()}
            for i, ps in sorted(tokens.items())]


def fact_numbers(beta: Tensor, shares: Tensor, mask: list[bool]) -> dict | None:
    """Write ratio and the read's share on the masked tokens against their share of the tokens it holds.
    None when no masked token was written."""
    written = len(beta)
    is_fact = torch.zeros(written, dtype=torch.bool)
    inside = min(written, len(mask))  # generated tokens (after the text) are never facts
    is_fact[:inside] = torch.tensor(mask[:inside], dtype=torch.bool)
    if not is_fact.any():
        return None
    out = {"fact_tokens_written": int(is_fact.sum()), "tokens_written": written}
    if (~is_fact).any():
        out["write_ratio"] = _round(beta[is_fact].mean() / beta[~is_fact].mean().clamp_min(1e-12))
    held = is_fact[:len(shares)]
    if held.any():
        out["answer_read_on_facts"] = _round(shares[held].sum())
        out["answer_read_even"] = _round(held.float().mean())
    return out


def head_records(ins, layer: int, tensors: dict[str, Tensor], k: int, context):
    """One JSON-able record per (block, head) for an explainer: the tokens it writes most strongly (β) and the
    tokens the read of `read_position` takes most from, each with context (`context(pos)`)."""
    pos = read_position(ins)
    shares = read_shares(tensors, pos)  # (h, n)
    beta = tensors.get("beta", torch.zeros(0, shares.shape[0]))
    for head in range(shares.shape[0]):
        record = {"layer": layer, "head": head, "beta_mean": _round(beta[:, head].mean()) if len(beta) else None,
                  "read_position": pos}
        for name, values in (("top_written", beta[:, head]), ("top_read", shares[head])):
            if not len(values):
                record[name] = []
                continue
            top = values.topk(min(k, len(values)))
            key = "beta" if name == "top_written" else "share"
            record[name] = [{"position": p, "token": ins.pieces[p], key: _round(v, 5), "context": context(p)}
                            for v, p in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        yield record
