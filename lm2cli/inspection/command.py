"""`lm2 inspect-memory`: check the options, record one pass, write tensors, summary, slot records, figures.

Every option is checked before the model runs, and each mistake is one line naming the option, the value and
what would be valid (exit 2).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lm2cli.errors import Lm2Error

DEFAULT_WINDOW = 20  # slots shown by default, as the paper's figure


# ------------------------------------------------------------------------------------------- options


def parse_heads(spec: str) -> str | int:
    if spec in ("mean", "max"):
        return spec
    if re.fullmatch(r"\d+", spec):
        return int(spec)
    raise Lm2Error(f"--heads {spec}: expected mean, max or a head index such as 0")


def parse_slots(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", spec)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise Lm2Error(f"--slots {spec}: expected A:B with A < B, e.g. 0:20 (slots A ... B-1)")
    return int(m.group(1)), int(m.group(2))


def parse_layers(specs: list[str]) -> list[int]:
    out = []
    for spec in specs:
        if not re.fullmatch(r"\d+", spec):
            raise Lm2Error(f"--layer {spec}: expected a block index such as 0 (repeat --layer for several)")
        out.append(int(spec))
    return sorted(set(out))


def inspectable_blocks(model, where: Path) -> list[int]:
    """Blocks with something to show: lm2's memory blocks, or every block of an RMT. Vanilla is refused."""
    arch = model.args.arch
    if arch == "rmt":
        return list(range(model.args.n_layers))
    blocks = [b.layer for b in model.blocks if b.memory is not None]
    if arch == "vanilla" or not blocks:
        raise Lm2Error(f"{where}: model.arch = {arch} has no memory to inspect; inspect-memory reads lm2 and rmt "
                       f"runs")
    return blocks


def check_against_model(model, layers: list[int], heads, window, where: Path) -> tuple[list[int], tuple]:
    """The blocks, head and slot window, checked against the model; defaults filled in."""
    blocks = inspectable_blocks(model, where)
    a = model.args
    kind = "memory blocks" if a.arch == "lm2" else "blocks"
    for layer in layers:
        if layer not in blocks:
            raise Lm2Error(f"--layer {layer}: not one of this model's {kind} ({', '.join(map(str, blocks))})")
    n_heads = a.memory_heads if a.arch == "lm2" else a.n_heads
    if isinstance(heads, int) and heads >= n_heads:
        raise Lm2Error(f"--heads {heads}: the {'memory ' if a.arch == 'lm2' else ''}attention has {n_heads} heads "
                       f"(0 ... {n_heads - 1}); or use mean or max")
    if a.arch == "lm2" and a.memory_write == "delta" and window is not None:
        raise Lm2Error(f'--slots {window[0]}:{window[1]}: memory.write = "delta" keeps an associative matrix, '
                       f'not slots; its reads are taken apart token by token (leave out --slots)')
    if window is None:
        window = (0, min(a.slots, DEFAULT_WINDOW))
    elif window[1] > a.slots:
        what = "slots" if a.arch == "lm2" else "memory tokens"
        raise Lm2Error(f"--slots {window[0]}:{window[1]}: the model has {a.slots} {what}; expected A:B with "
                       f"0 <= A < B <= {a.slots}")
    return layers or blocks, window


def one_text(prompt: str | None, file: Path | None, babilong: str | None):
    """The one text source, checked before anything is loaded: (prompt text or file text, babilong spec)."""
    from lm2cli.inspection import inputs

    given = [name for name, v in (("--prompt", prompt), ("--file", file), ("--babilong", babilong)) if v is not None]
    if len(given) != 1:
        which = "no text given" if not given else f"give one text, not {' and '.join(given)}"
        raise Lm2Error(f"{which}: use --prompt TEXT, --file PATH or --babilong DIR_OR_HUB:TASK:LENGTH[:INDEX]")
    if babilong is not None:
        return None, inputs.parse_babilong_spec(babilong)
    return (prompt if prompt is not None else inputs.read_text_file(file)), None


def text_input(raw: str | None, spec, prompt, file, babilong, tokenizer, generator):
    from lm2cli.inspection import inputs

    if spec is not None:
        return inputs.babilong_input(spec, tokenizer, f"--babilong {babilong}")
    where, name = ("--prompt", inputs.text_name(raw)) if prompt is not None else (f"--file {file}", file.stem)
    return inputs.TextInput(name, generator.encode_prompt(raw, where), where)


# ------------------------------------------------------------------------------------------- command


def inspect_command(target: Path | None, *, prompt: str | None = None, file: Path | None = None,
                    babilong: str | None = None, generate: int = 0, layers: list[str] | None = None,
                    heads: str = "mean", slots: str | None = None, top_tokens: int = 20, read_at: int | None = None,
                    out: Path | None = None,
                    json_output: bool = False, verify_checksums: bool = True) -> Path:
    # Syntax first: nothing is loaded for a malformed option.
    head_mode = parse_heads(heads)
    window = parse_slots(slots) if slots is not None else None
    wanted = parse_layers(layers or [])
    raw, spec = one_text(prompt, file, babilong)
    if generate < 0 or top_tokens < 1:
        raise Lm2Error(f"--generate {generate}: expected 0 or more tokens" if generate < 0 else
                       f"--top-tokens {top_tokens}: expected 1 or more")
    if read_at is not None and read_at < 0:
        raise Lm2Error(f"--read-at {read_at}: expected a text position, 0 (the BOS token) or more")

    import torch

    from lm2cli.checkpoint import load_for_inference, resolve_target
    from lm2cli.generation.generator import Generator, prefill_chunk_len
    from lm2cli.generation.sampling import SamplingParams
    from lm2cli.inspection.capture import capture

    resolved = resolve_target(target)
    checkpoint = resolved.checkpoint
    model, tokenizer, recipe = load_for_inference(checkpoint, verify_checksums=verify_checksums)
    wanted, window = check_against_model(model, wanted, head_mode, window, checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = Generator(model.to(device), tokenizer, recipe, device)
    text = text_input(raw, spec, prompt, file, babilong, tokenizer, generator)
    generator.check_length(len(text.ids), SamplingParams(max_new_tokens=generate), text.where)
    if read_at is not None and read_at >= len(text.ids):
        raise Lm2Error(f"--read-at {read_at}: {text.where} has {len(text.ids)} tokens (positions 0 ... "
                       f"{len(text.ids) - 1}, BOS first)")
    print(f"lm2 inspect-memory: {checkpoint} ({model.args.arch}), {len(text.ids)} tokens from {text.where}"
          + (f", then {generate} generated" if generate else "") + f", blocks {', '.join(map(str, wanted))}",
          file=sys.stderr)
    ins = capture(model, tokenizer, text, checkpoint=str(checkpoint), layers=wanted, heads=head_mode,
                  slot_window=window, top_tokens=top_tokens, generate=generate, read_at=read_at,
                  chunk_len=prefill_chunk_len(model.args.segment_len), device=device)
    out_dir = out if out is not None else resolved.run_dir / "inspect" / text.name
    written, summary, note = write_outputs(ins, tokenizer, top_tokens, out_dir)
    if json_output:
        print(json.dumps(summary | {"out": str(out_dir), "files": [p.name for p in written]}, ensure_ascii=False))
    else:
        print(summary_table(summary))
        print(f"written to {out_dir}/: {', '.join(p.name for p in written)}")
    if note:
        print(note, file=sys.stderr)
    return out_dir


def write_outputs(ins, tokenizer, top_tokens: int, out_dir: Path) -> tuple[list[Path], dict, str]:
    """Tensors, index, summary, slot records and (with matplotlib) figures; returns (paths, summary, note)."""
    from lm2cli.inspection import analysis, figures, store

    summary = analysis.summarize(ins, top_tokens)
    records = analysis.explainer_records(ins, summary, tokenizer.decode, top_tokens)
    if not figures.have_matplotlib():
        return store.save(ins, summary, records, out_dir), summary, (
            "figures skipped: matplotlib is not installed; `pip install 'lm2[plot]'` (the plot extra) draws "
            "them; the tensors and summary are written")
    return store.save(ins, summary, records, out_dir, lambda: figures.draw_all(ins, summary, out_dir)), summary, ""


# --------------------------------------------------------------------------------------------- table


def summary_table(summary: dict) -> str:
    """A few lines per block: top slots by read and by change, gate means, fact numbers."""
    if any(entry.get("memory") == "associative" for entry in summary["layers"].values()):
        return associative_table(summary)
    rmt = summary["arch"] == "rmt"
    head = ["block", "top read " + ("memory tokens" if rmt else "slots") + " (share)", "top change"]
    head += ["write on prefix/segment/suffix"] if rmt else ["g_in", "g_f", "g_out"]
    facts = any(entry.get("facts") for entry in summary["layers"].values())
    if facts:
        head += ["fact ratio", "answer on fact slots (even)"]
    rows = []
    for layer, entry in summary["layers"].items():
        ranking = entry["ranking"]
        top_read = " ".join(f"{s}:{ranking['read_mass'][s]:.2f}" for s in ranking["by_read"][:3])
        top_change = " ".join(f"{s}:{ranking['change'][s]:.2f}" for s in ranking["by_change"][:3])
        row = [layer, top_read, top_change]
        if rmt:
            split = entry.get("write_split")
            row.append("/".join(f"{v:.2f}" for v in split.values()) if split else "-")
        else:  # means over the segments (the output gate also over the open one)
            for gate in ("in_gate", "forget_gate", "out_gate"):
                values = [s[gate] for s in entry["segments"] if gate in s]
                row.append(f"{sum(values) / len(values):.2f}" if values else "-")
        if facts:
            f = entry.get("facts") or {}
            row.append(f"{f['ratio']:.2f}" if "ratio" in f else "-")
            row.append(f"{f['answer_read_on_fact_slots']:.2f} ({f['answer_read_even']:.2f})"
                       if "answer_read_on_fact_slots" in f else "-")
        rows.append([str(c) for c in row])
    return "\n".join(aligned(head, rows, f"{summary['arch']} | {summary['prompt_tokens']} tokens | heads: "
                                       f"{summary['heads']} | slot window {summary['slot_window'][0]}:"
                                       f"{summary['slot_window'][1]}") + summary_tail(summary))


PER_FACT_SHOWN = 4  # facts listed per block under the associative table (summary.json has all)


def associative_table(summary: dict) -> str:
    """memory.write = "delta": per block the mean write strength β, the output gate, the tokens the read of the
    answer position (else the last token) takes most from, and with facts the write ratio and the read's share
    on (supporting) facts against their share of the tokens held."""
    facts = any(entry.get("facts") for entry in summary["layers"].values())
    head = ["block", "β", "g_out", "top read tokens (share)"]
    head += ["write ratio facts", "read on facts (even)", "on supporting facts (even)"] if facts else []
    rows = []
    for layer, entry in summary["layers"].items():
        gate = [s["out_gate"] for s in entry["segments"] if "out_gate" in s]
        row = [layer, "-" if entry["beta_mean"] is None else f"{entry['beta_mean']:.2f}",
               f"{sum(gate) / len(gate):.2f}" if gate else "-",
               " ".join(f"{t['token'].strip() or repr(t['token'])}@{t['position']}:{t['share']:.2f}"
                        for t in entry["read"]["top"][:3]) or "-"]
        if facts:
            f, s = entry.get("facts") or {}, entry.get("supporting_facts") or {}
            row.append(f"{f['write_ratio']:.2f}" if "write_ratio" in f else "-")
            row += [f"{x['answer_read_on_facts']:.2f} ({x['answer_read_even']:.2f})" if "answer_read_on_facts" in x
                    else "-" for x in (f, s)]
        rows.append([str(c) for c in row])
    read_at = next(iter(summary["layers"].values()))["read"]["position"] if summary["layers"] else "-"
    per_fact = [line for layer, entry in summary["layers"].items() for line in per_fact_line(layer, entry)]
    title = (f"{summary['arch']} (associative memory) | {summary['prompt_tokens']} tokens | heads: "
             f"{summary['heads']} | read taken apart at position {read_at}")
    return "\n".join(aligned(head, rows, title) + per_fact + summary_tail(summary))


def per_fact_line(layer, entry: dict, k: int = PER_FACT_SHOWN) -> list[str]:
    """The facts with the largest shares of the answer read, by size whatever the sign (* = supporting): a
    negative share is a fact the bank has overwritten, and it cancels part of the others."""
    facts = sorted(entry.get("per_fact") or [], key=lambda f: -abs(f["share"]))[:k]
    if not facts:
        return []
    return [f"block {layer} answer read per fact: " + " | ".join(
        f"#{f['fact']}{'*' if f['supporting'] else ''} {f['share']:+.2f} {f['text']!r}" for f in facts)]


def aligned(head: list[str], rows: list[list[str]], title: str) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [title] + ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]


def summary_tail(summary: dict) -> list[str]:
    lines = []
    if "generated_text" in summary:
        lines.append(f"generated ({summary['generated_tokens']} tokens): {summary['generated_text']!r}")
    if "target" in summary:
        lines.append(f"target: {summary['target']!r}")
    if "facts" in summary:
        lines.append(f"facts: {summary['facts']}")
    return lines
