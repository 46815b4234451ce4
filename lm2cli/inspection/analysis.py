"""Numbers from a recorded pass: slot rankings, what each slot was written with, gates per segment, facts.

Everything here reads an `Inspection` (tensors and token facts), never the model, so it can be rerun on the
files an inspection wrote and tested on hand-made tensors.

Fact attention ratio (per block): over the written segments, the share of write mass that lands on fact
tokens divided by the fact tokens' share of those segments' tokens. 1 means the writes ignore whether a token
is a fact; 3 means fact tokens get three times their share. A slot is a *fact slot* when its own ratio, over
the segments that contain facts, is at least FACT_SLOT_RATIO (a clear preference, not noise around 1); the
answer position's read mass on the fact slots is compared with what a reader that spreads its attention
evenly would give them (their count / N). No slot above the threshold: no answer number.

The associative bank (memory.write = "delta") has no slots: its blocks are summarised by
lm2cli/inspection/associative.py (write strengths, and the answer's read taken apart token by token).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FACT_SLOT_RATIO = 1.25


def written_positions(write_end: Tensor, segment_len: int) -> Tensor:
    """(W, S) text positions of the tokens of each written segment."""
    return write_end.long()[:, None] - segment_len + torch.arange(segment_len)[None, :]


def slot_ranking(tensors: dict[str, Tensor], n_tokens: int) -> dict[str, list]:
    """Each slot's share of the read mass of the first `n_tokens` tokens and its total change over the
    writes, and the slots in decreasing order of each."""
    read_mass = tensors["read"][:n_tokens].sum(0)
    read_mass = read_mass / read_mass.sum().clamp_min(1e-12)
    change = tensors["slot_change"].sum(0) if "slot_change" in tensors else torch.zeros_like(read_mass)
    return {"read_mass": read_mass.tolist(), "change": change.tolist(),
            "by_read": read_mass.argsort(descending=True, stable=True).tolist(),
            "by_change": change.argsort(descending=True, stable=True).tolist()}


def top_written_tokens(tensors: dict[str, Tensor], segment_len: int, k: int) -> list[list[tuple[int, float]]]:
    """For each slot, its k largest write weights over all segments as (text position, weight)."""
    if "write" not in tensors:
        return []
    write = tensors["write"]  # (W, N, S)
    positions = written_positions(tensors["write_end"], segment_len)  # (W, S)
    flat = write.permute(1, 0, 2).reshape(write.shape[1], -1)  # (N, W*S)
    weights, where = flat.topk(min(k, flat.shape[1]), dim=-1)
    pos = positions.reshape(-1)[where]
    return [list(zip(pos[s].tolist(), weights[s].tolist(), strict=True)) for s in range(write.shape[1])]


def segment_stats(tensors: dict[str, Tensor], segment_len: int, n_tokens: int) -> list[dict]:
    """Per written segment: gates (mean and share of units above 0.5; the output gate over the segment's
    tokens), memory norm (root mean square slot norm; associative bank: over the heads' |S|) and mean change,
    the associative bank's mean write strength β; then the open segment, if any."""
    rows = []
    ends = tensors["write_end"].long().tolist() if "write_end" in tensors else []
    for w, end in enumerate(ends):
        row = {"segment": w, "tokens": [end - segment_len, end]}
        for gate in ("in_gate", "forget_gate"):
            if f"{gate}_mean" in tensors:
                row[gate] = _round(tensors[f"{gate}_mean"][w].mean())
                row[f"{gate}_open"] = _round(tensors[f"{gate}_open"][w].mean())
        if "beta" in tensors:  # the associative bank: its tokens' mean write strength
            row["beta"] = _round(tensors["beta"][end - segment_len:end].mean())
        row |= _out_gate(tensors, end - segment_len, end)
        # slot bank: per slot; associative bank: |S| per head
        norm, change = ((tensors["matrix_norm"], tensors["matrix_change"]) if "matrix_norm" in tensors else
                        (tensors["slot_norm"], tensors["slot_change"]))
        row["memory_norm"] = _round(norm[w].pow(2).mean().sqrt())
        row["mean_change"] = _round(change[w].mean())
        rows.append(row)
    last = ends[-1] if ends else 0
    if last < n_tokens:
        rows.append({"segment": len(ends), "tokens": [last, n_tokens], "open": True}
                    | _out_gate(tensors, last, n_tokens))
    return rows


def _out_gate(tensors: dict[str, Tensor], start: int, end: int) -> dict:
    if "out_gate_mean" not in tensors:
        return {}
    return {"out_gate": _round(tensors["out_gate_mean"][start:end].mean()),
            "out_gate_open": _round(tensors["out_gate_open"][start:end].mean())}


def fact_attention(tensors: dict[str, Tensor], segment_len: int, fact_mask: list[bool],
                   answer_pos: int | None) -> dict | None:
    """The fact attention ratio, the fact slots and the answer position's read mass on them (module doc).
    None when no fact token was written."""
    if "write" not in tensors or not fact_mask:
        return None
    write = tensors["write"]  # (W, N, S)
    positions = written_positions(tensors["write_end"], segment_len)
    inside = positions < len(fact_mask)  # generated tokens (after the text) are never facts
    is_fact = torch.zeros(positions.shape)
    is_fact[inside] = torch.tensor(fact_mask, dtype=torch.float)[positions[inside]]
    n_fact = is_fact.sum()
    if n_fact == 0:
        return None
    on_facts = (write * is_fact[:, None, :]).sum()
    ratio = (on_facts / write.sum()) / (n_fact / is_fact.numel())
    with_facts = is_fact.sum(-1) > 0  # segments that hold at least one fact token
    w, f = write[with_facts], is_fact[with_facts]
    slot_share = (w * f[:, None, :]).sum((0, 2)) / w.sum((0, 2)).clamp_min(1e-12)
    slot_ratio = slot_share / (f.sum() / f.numel())
    fact_slots = (slot_ratio >= FACT_SLOT_RATIO).nonzero().flatten().tolist()
    out = {"ratio": _round(ratio), "fact_tokens_written": int(n_fact), "tokens_written": is_fact.numel(),
           "slot_ratio": [_round(r) for r in slot_ratio], "fact_slots": fact_slots}
    if fact_slots and answer_pos is not None and answer_pos < len(tensors["read"]):
        read = tensors["read"][answer_pos]
        out["answer_read_on_fact_slots"] = _round(read[fact_slots].sum())
        out["answer_read_even"] = _round(read.sum() * len(fact_slots) / len(read))
    return out


def summarize(ins, top_tokens: int) -> dict:
    """The summary written to summary.json (and printed): per block, rankings, segments and fact numbers."""
    summary = {"checkpoint": ins.checkpoint, "arch": ins.arch, "heads": ins.heads, "slots": ins.slots,
               "segment_len": ins.segment_len, "slot_window": list(ins.slot_window),
               "prompt_tokens": ins.n_prompt, "generated_tokens": len(ins.tokens) - ins.n_prompt, "layers": {}}
    if len(ins.tokens) > ins.n_prompt:
        summary["generated_text"] = ins.generated_text
    if ins.target is not None:
        summary["target"] = ins.target
        summary["answer_position"] = ins.answer_pos
    if ins.facts_note:
        summary["facts"] = ins.facts_note
    from lm2cli.inspection import associative

    for layer, tensors in sorted(ins.layers.items()):
        if associative.is_associative(tensors):  # memory.write = "delta": no slots, its own numbers
            summary["layers"][str(layer)] = associative.summary_entry(ins, tensors, top_tokens)
            continue
        # rmt: the memory tokens' norm and change are the model's, shared by every block
        per_segment = tensors | {k: v for k, v in ins.memory.items() if k in ("slot_norm", "slot_change")}
        entry = {"ranking": slot_ranking(per_segment, ins.n_prompt),
                 "segments": segment_stats(per_segment, ins.segment_len, len(ins.tokens))}
        if ins.fact_mask is not None:
            entry["facts"] = fact_attention(tensors, ins.segment_len, ins.fact_mask, ins.answer_pos)
            if ins.support_mask is not None:
                support = fact_attention(tensors, ins.segment_len, ins.support_mask, ins.answer_pos)
                entry["supporting_facts"] = support
        if "write_split" in tensors:  # rmt: where the write suffix looks
            split = tensors["write_split"].mean((0, 1))
            entry["write_split"] = dict(zip(("read_prefix", "segment", "write_suffix"),
                                            (_round(v) for v in split), strict=True))
        summary["layers"][str(layer)] = entry
    if ins.memory:
        summary["memory_tokens"] = {"change": [_round(v) for v in ins.memory["slot_change"].mean(-1)],
                                    "norm": [_round(v) for v in ins.memory["slot_norm"].pow(2).mean(-1).sqrt()]}
    return summary


def explainer_records(ins, summary: dict, tokenizer_decode, k: int, context: int = 8):
    """One JSON-able record per (block, slot) for an automatic explainer: the slot's rankings and its top
    written tokens with their weights, each with a few tokens of context around it ([[token]] marked)."""
    from lm2cli.inspection import associative

    for layer, tensors in sorted(ins.layers.items()):
        if associative.is_associative(tensors):  # one record per head instead of per slot
            yield from associative.head_records(ins, layer, tensors, k,
                                                lambda p: _context(ins.tokens, p, context, tokenizer_decode))
            continue
        ranking = summary["layers"][str(layer)]["ranking"]
        facts = (summary["layers"][str(layer)].get("facts") or {}).get("slot_ratio")
        by_read = {s: r for r, s in enumerate(ranking["by_read"])}
        by_change = {s: r for r, s in enumerate(ranking["by_change"])}
        for slot, top in enumerate(top_written_tokens(tensors, ins.segment_len, k)):
            record = {"layer": layer, "slot": slot, "read_mass": _round(ranking["read_mass"][slot]),
                      "read_rank": by_read[slot], "change": _round(ranking["change"][slot]),
                      "change_rank": by_change[slot]}
            if facts is not None:
                record["fact_ratio"] = facts[slot]
            record["top_written"] = [
                {"position": p, "token": ins.pieces[p], "weight": _round(wt, 5),
                 "context": _context(ins.tokens, p, context, tokenizer_decode)} for p, wt in top]
            yield record


def _context(tokens: list[int], pos: int, width: int, decode) -> str:
    # Decode growing prefixes of one window, so the token keeps the space that starts its word.
    start = max(0, pos - width)
    before, through = decode(tokens[start:pos]), decode(tokens[start:pos + 1])
    after = decode(tokens[start:pos + 1 + width // 2])[len(through):]
    return f"{before}[[{through[len(before):]}]]{after}"


def _round(value, digits: int = 4) -> float:
    value = float(value)
    return value if math.isnan(value) else round(value, digits)
