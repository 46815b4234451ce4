"""An inspection on disk: tensors.safetensors, its JSON index, summary.json and slots.jsonl.

    tensors.safetensors   every recorded tensor, keyed "layer<L>.<name>", "memory.<name>" and "tokens"
    index.json            what each key holds (shape, axes, meaning) and the token facts (pieces, positions)
    summary.json          the analysis (lm2cli/inspection/analysis.py)
    slots.jsonl           one line per (block, slot): rankings and top written tokens, for an explainer
                          (associative bank: one line per (block, head): top written and top read tokens)

`load(directory)` gives back the `Inspection`, so the analysis and the figures can be redone from files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm2cli.errors import Lm2Error
from lm2cli.inspection.capture import Inspection

FORMAT, VERSION = "lm2-inspect-memory", 1
TENSORS, INDEX, SUMMARY, SLOTS = "tensors.safetensors", "index.json", "summary.json", "slots.jsonl"

MEANINGS = {
    "read": "(T, N) each token's read attention over the slots (rmt: attention on the read-prefix memory "
            "tokens), heads reduced",
    "out_gate_mean": "(T,) mean of the token's output gate g_out",
    "out_gate_open": "(T,) share of the token's output-gate units above 0.5",
    "write": "(W, N, S) each slot's write attention over the S tokens of written segment w (rmt: the write "
             "suffix's attention on the segment's tokens), heads reduced",
    "write_end": "(W,) text position just after written segment w",
    "write_split": "(W, N, 3) rmt: the write suffix's attention mass on read prefix, segment tokens, suffix",
    "in_gate_mean": "(W, N) mean input gate g_in of each slot at write w",
    "in_gate_open": "(W, N) share of each slot's input-gate units above 0.5 at write w",
    "forget_gate_mean": "(W, N) mean forget gate g_f of each slot at write w",
    "forget_gate_open": "(W, N) share of each slot's forget-gate units above 0.5 at write w",
    "slot_norm": "(W, N) norm of each slot (rmt: memory token) after write w",
    "slot_change": "(W, N) norm of each slot's change at write w",
    "heatmap_rows": "(K,) text positions of the tokens in the read heatmap",
    "reread_before": "(K, N) heatmap tokens' read attention against the memory after the text",
    "reread_after": "(K, N) the same tokens against the memory after the generated tokens",
    "query": "(T, h, dh) associative bank: each token's unit read query, every head",
    "write_key": "(T_w, h, dh) associative bank: each written token's unit write key",
    "beta": "(T_w, h) associative bank: each written token's write strength",
    "write_update": "(T_w, h, dh) associative bank: what each written token added under its key (S' = S + K^T U)",
    "matrix_norm": "(W, h) associative bank: norm of each head's matrix after write w",
    "matrix_change": "(W, h) associative bank: norm of each head's matrix change at write w",
    "bank": "(W, ...) the memory after write w (full recording only; associative bank: (W, h, dh, dh))",
    "tokens": "(T,) token ids of the text (BOS first) and of the generated tokens",
    "fact_mask": "(T_text,) 1 where the token lies inside a bAbI fact",
    "fact_index": "(T_text,) which fact (0, 1, ... in the story's order) the token lies inside, -1 for none",
    "support_mask": "(T_text,) 1 where the token lies inside a supporting fact of the question",
}
FIELDS = ("arch", "checkpoint", "heads", "slots", "segment_len", "n_prompt", "answer_pos", "target", "facts_note",
          "generated_text")
OPTIONAL_FIELDS = ("read_at",)  # absent from the index of an earlier version: None


def flat_tensors(ins: Inspection) -> dict[str, torch.Tensor]:
    out = {"tokens": torch.tensor(ins.tokens, dtype=torch.long)}
    for name in ("fact_mask", "support_mask"):
        if getattr(ins, name) is not None:
            out[name] = torch.tensor(getattr(ins, name), dtype=torch.uint8)
    if ins.fact_index is not None:
        out["fact_index"] = torch.tensor(ins.fact_index, dtype=torch.int32)
    for layer, tensors in ins.layers.items():
        out |= {f"layer{layer}.{name}": t for name, t in tensors.items()}
        if layer in ins.heatmap_rows:
            out[f"layer{layer}.heatmap_rows"] = torch.tensor(ins.heatmap_rows[layer], dtype=torch.long)
        out |= {f"layer{layer}.reread_{when}": t for when, t in ins.reread.get(layer, {}).items()}
    out |= {f"memory.{name}": t for name, t in ins.memory.items()}
    return {k: v.contiguous() for k, v in out.items()}


def save(ins: Inspection, summary: dict, records, out_dir: Path, draw=None) -> list[Path]:
    """Write the tensors, the summary, the explainer records, the figures (`draw()` returns their paths) and,
    last, the index listing them all; returns the paths. What an earlier inspection wrote here goes first, so
    no stale figure survives a rerun with other blocks."""
    from safetensors.torch import save as to_bytes

    from lm2cli.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

    remove_previous(out_dir)
    tensors = flat_tensors(ins)
    atomic_write_bytes(out_dir / TENSORS, to_bytes(tensors, metadata={"format": FORMAT}))
    atomic_write_json(out_dir / SUMMARY, summary)
    atomic_write_text(out_dir / SLOTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    written = [out_dir / name for name in (TENSORS, SUMMARY, SLOTS)] + (draw() if draw is not None else [])
    index = {"format": FORMAT, "version": VERSION, **{f: getattr(ins, f) for f in FIELDS + OPTIONAL_FIELDS},
             "slot_window": list(ins.slot_window), "layers": sorted(ins.layers), "pieces": ins.pieces,
             "files": [p.name for p in written],
             "tensors": {key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                               "meaning": MEANINGS[key.rsplit(".", 1)[-1]]} for key, t in tensors.items()}}
    atomic_write_json(out_dir / INDEX, index)
    return [written[0], out_dir / INDEX, *written[1:]]


def remove_previous(out_dir: Path) -> None:
    """Delete the files an earlier inspection's index lists (only plain names inside `out_dir`)."""
    try:
        old = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        return
    (out_dir / INDEX).unlink(missing_ok=True)
    for name in old.get("files", []):
        if isinstance(name, str) and name == Path(name).name and name not in (".", ".."):
            (out_dir / name).unlink(missing_ok=True)


def checked_fact_index(t: torch.Tensor, ins: Inspection, where: Path) -> list[int]:
    """The stored per-token fact index, refused unless it is what `save` writes: one integer >= -1 per text
    token, agreeing with the fact mask."""
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool or len(t) > ins.n_prompt:
        raise Lm2Error(f"{where}: fact_index should be one integer per text token (at most {ins.n_prompt}), got "
                       f"{t.dtype} of shape {list(t.shape)}")
    index = t.tolist()
    if any(i < -1 for i in index) or (ins.fact_mask is not None and [i >= 0 for i in index] != ins.fact_mask):
        raise Lm2Error(f"{where}: fact_index should be -1 or a fact number per token and agree with fact_mask")
    return index


def load(out_dir: str | Path) -> Inspection:
    """The Inspection that `save` wrote into `out_dir`."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    try:
        index = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
        tensors = load_file(out_dir / TENSORS)
    except (OSError, ValueError) as e:
        raise Lm2Error(f"{out_dir}: not a readable inspection ({e})") from None
    if index.get("format") != FORMAT:
        raise Lm2Error(f"{out_dir / INDEX}: not an lm2 inspect-memory index")
    layers: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in index["layers"]}
    ins = Inspection(**{f: index[f] for f in FIELDS}, **{f: index.get(f) for f in OPTIONAL_FIELDS},
                     slot_window=tuple(index["slot_window"]),
                     tokens=tensors["tokens"].tolist(), pieces=index["pieces"], layers=layers)
    if ins.read_at is not None and not (type(ins.read_at) is int and 0 <= ins.read_at < ins.n_prompt):
        raise Lm2Error(f"{out_dir / INDEX}: read_at = {ins.read_at!r}: expected a text position 0 ... "
                       f"{ins.n_prompt - 1} or null")
    for name in ("fact_mask", "support_mask"):
        if name in tensors:
            setattr(ins, name, [bool(v) for v in tensors[name].tolist()])
    if "fact_index" in tensors:  # absent from an earlier version's inspection
        ins.fact_index = checked_fact_index(tensors["fact_index"], ins, out_dir / TENSORS)
    for key, t in tensors.items():
        group, _, name = key.partition(".")
        if group == "memory":
            ins.memory[name] = t
        elif group.startswith("layer"):
            layer = int(group.removeprefix("layer"))
            if name == "heatmap_rows":
                ins.heatmap_rows[layer] = t.tolist()
            elif name.startswith("reread_"):
                ins.reread.setdefault(layer, {})[name.removeprefix("reread_")] = t
            else:
                layers[layer][name] = t
    return ins
