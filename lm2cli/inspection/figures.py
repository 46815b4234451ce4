"""PNG figures of an inspection (matplotlib, the optional extra `plot`: pip install 'lm2[plot]').

    read_L<l>.png         token x slot read heatmap: the most-attended tokens against the slot window
    before_after_L<l>.png the same tokens reading the memory after the text and after --generate's tokens
    write_L<l>.png        slot x token write attention of up to six segments (those with facts first)
    gates_L<l>.png        lm2: gates, memory norm and per-slot change across segments
    memory.png            rmt: each memory token's change and the memory norm across segments
    associative_L<l>.png  memory.write = "delta": each written token's strength β, its share of the answer's
                          read (lm2cli/inspection/associative.py), and each head's matrix norm across segments

Fact tokens are drawn in red (supporting facts bold), the answer position in blue. Drawn with matplotlib's
object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import torch

from lm2cli.inspection.analysis import written_positions
from lm2cli.inspection.associative import is_associative, read_shares
from lm2cli.inspection.recording import reduce_heads

MAX_WRITE_PANELS = 6
MAX_TOKEN_LABELS = 96  # per write panel; longer segments get no token labels
FACT, ANSWER = "#c0392b", "#1f5fbf"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw_all(ins, summary: dict, out_dir: Path) -> list[Path]:
    written = []
    for layer in sorted(ins.layers):
        if is_associative(ins.layers[layer]):
            written.append(_save(associative_panels(ins, layer, summary), out_dir / f"associative_L{layer}.png"))
            continue
        written.append(_save(read_heatmap(ins, layer), out_dir / f"read_L{layer}.png"))
        if layer in ins.reread:
            written.append(_save(before_after(ins, layer), out_dir / f"before_after_L{layer}.png"))
        if "write" in ins.layers[layer]:
            written.append(_save(write_panels(ins, layer), out_dir / f"write_L{layer}.png"))
        if "in_gate_mean" in ins.layers[layer]:
            written.append(_save(gates(ins, layer, summary), out_dir / f"gates_L{layer}.png"))
    if ins.memory:
        written.append(_save(rmt_memory(ins), out_dir / "memory.png"))
    return written


# ---------------------------------------------------------------------------------------------- figures


def read_heatmap(ins, layer: int):
    rows = ins.heatmap_rows[layer]
    a, b = ins.slot_window
    fig, ax = _figure(ncols=1, width=2.2 + 0.38 * (b - a), height=1.6 + 0.24 * len(rows))
    values = ins.layers[layer]["read"][rows][:, a:b]
    _heat(fig, ax, values, f"block {layer}: read attention ({_heads(ins)})")
    _token_axis(ax, ins, rows, axis="y")
    _slot_axis(ax, ins, axis="x")
    return fig


def before_after(ins, layer: int):
    rows = ins.heatmap_rows[layer]
    a, b = ins.slot_window
    fig, axes = _figure(ncols=2, width=3.6 + 0.7 * (b - a), height=2.2 + 0.24 * len(rows))
    reread = ins.reread[layer]
    both = torch.cat([reread["before"][:, a:b], reread["after"][:, a:b]])
    generated = len(ins.tokens) - ins.n_prompt
    writes = int((ins.layers[layer]["write_end"] > ins.n_prompt).sum()) if "write_end" in ins.layers[layer] else 0
    after = f"after {generated} generated tokens ({writes} write{'s' if writes != 1 else ''}" + (
        f"; none until a segment of {ins.segment_len} completes)" if writes == 0 else ")")
    for ax, when, title in ((axes[0], "before", "memory after the text"), (axes[1], "after", after)):
        _heat(fig, ax, reread[when][:, a:b], title, vmin=float(both.min()), vmax=float(both.max()))
        _token_axis(ax, ins, rows, axis="y", labels=ax is axes[0])
        _slot_axis(ax, ins, axis="x")
    text = textwrap.shorten(ins.generated_text.replace("\n", " "), 160, placeholder=" ...")
    fig.suptitle(f"block {layer}: the same tokens read the memory before / after generating ({_heads(ins)})\n"
                 f"generated: {text!r}", fontsize=9)
    return fig


def write_panels(ins, layer: int):
    tensors = ins.layers[layer]
    a, b = ins.slot_window
    positions = written_positions(tensors["write_end"], ins.segment_len)
    chosen = _segments_to_show(ins, positions)
    fig, axes = _figure(nrows=len(chosen), width=3 + 0.11 * ins.segment_len, height=1.2 + len(chosen) *
                        (0.9 + 0.2 * (b - a)), squeeze=False)
    for ax, w in zip(axes[:, 0], chosen, strict=True):
        pos = positions[w].tolist()
        _heat(fig, ax, tensors["write"][w, a:b], f"segment {w}: tokens {pos[0]}-{pos[-1]}")
        _slot_axis(ax, ins, axis="y")
        if ins.segment_len <= MAX_TOKEN_LABELS:
            _token_axis(ax, ins, pos, axis="x")
        else:
            ax.set_xlabel("token in segment")
    what = "write suffix attention on the segment's tokens" if ins.arch == "rmt" else "write attention"
    fig.suptitle(f"block {layer}: {what} ({_heads(ins)})", fontsize=10)
    return fig


def gates(ins, layer: int, summary: dict):
    segments = [s for s in summary["layers"][str(layer)]["segments"] if not s.get("open")]
    x = [s["segment"] for s in segments]
    fig, axes = _figure(nrows=3, width=7.5, height=8.0)
    for key, color in (("in_gate", "tab:green"), ("forget_gate", "tab:orange"), ("out_gate", "tab:purple")):
        axes[0].plot(x, [s[key] for s in segments], color=color, marker=".", label=f"{key} mean")
        axes[0].plot(x, [s[f"{key}_open"] for s in segments], color=color, ls="--", marker="x",
                     label=f"{key} > 0.5")
    axes[0].set_ylim(0, 1)
    _segment_ticks(axes)
    axes[0].set_title(f"block {layer}: gates per segment", fontsize=10)
    axes[0].legend(fontsize=7, ncols=3)
    axes[1].plot(x, [s["memory_norm"] for s in segments], color="black", marker=".", label="memory norm (rms slot)")
    axes[1].plot(x, [s["mean_change"] for s in segments], color="tab:red", marker=".", label="mean slot change")
    axes[1].legend(fontsize=7)
    a, b = ins.slot_window
    _heat(fig, axes[2], ins.layers[layer]["slot_change"][:, a:b].T, "change of each slot at each write")
    _slot_axis(axes[2], ins, axis="y")
    axes[2].set_xlabel("segment")
    return fig


def rmt_memory(ins):
    fig, axes = _figure(nrows=2, width=7.5, height=5.5)
    change = ins.memory["slot_change"]
    _heat(fig, axes[0], change.T, "change of each memory token at each write")
    axes[0].set_ylabel("memory token")
    axes[1].plot(change.pow(2).mean(-1).sqrt(), marker=".", label="rms change")
    axes[1].plot(ins.memory["slot_norm"].pow(2).mean(-1).sqrt(), marker=".", label="rms norm")
    axes[1].set_xlabel("segment")
    axes[1].legend(fontsize=7)
    _segment_ticks(axes)
    return fig


def associative_panels(ins, layer: int, summary: dict):
    tensors = ins.layers[layer]
    entry = summary["layers"][str(layer)]
    pos = entry["read"]["position"]
    beta = reduce_heads(tensors["beta"].T, ins.heads)
    shares = reduce_heads(read_shares(tensors, pos), ins.heads)
    fig, axes = _figure(nrows=3, width=9, height=8.5)
    facts = _marked(ins.fact_mask, len(beta))
    support = _marked(ins.support_mask, len(beta))
    axes[0].plot(range(len(beta)), beta.numpy(), color="0.55", lw=0.6, label="β")
    axes[0].scatter(facts, beta[facts].numpy(), s=8, color=FACT, label="fact tokens", zorder=3)
    axes[0].scatter(support, beta[support].numpy(), s=16, color=FACT, edgecolors="black", lw=0.6,
                    label="supporting facts", zorder=4)
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"block {layer}: write strength β of each written token ({_heads(ins)})", fontsize=9)
    axes[0].legend(fontsize=7, ncols=3)
    colors = ["0.55"] * len(shares)
    for p in facts:
        if p < len(shares):
            colors[p] = FACT
    # stems, not bars: a bar one position wide is thinner than a pixel on a long text and may not be drawn
    axes[1].vlines(range(len(shares)), 0, shares.numpy(), colors=colors, lw=1.2)
    axes[1].axhline(0, color="black", lw=0.5)
    for rank, item in enumerate(entry["read"]["top"][:5]):
        axes[1].annotate(f"{item['token'].strip() or repr(item['token'])}@{item['position']}",
                         (item["position"], item["share"]), fontsize=7, xytext=(3, 2 + 7 * rank),
                         textcoords="offset points")
    what = "the answer position" if pos == ins.answer_pos else "the last token"
    axes[1].set_title(f"share of each written token in the read of {what} (position {pos}, "
                      f"{len(shares)} tokens held; fact tokens red)", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlim(-0.5, max(len(beta), 1) - 0.5)
        ax.set_xlabel("text position", fontsize=8)
    norms = tensors["matrix_norm"]  # (W, h)
    for head in range(norms.shape[1]):
        axes[2].plot(norms[:, head].numpy(), marker=".", lw=0.8, label=f"head {head}")
    gate = [s["out_gate"] for s in entry["segments"] if not s.get("open") and "out_gate" in s]
    if gate:
        twin = axes[2].twinx()
        twin.plot(gate, color="tab:purple", ls="--", label="output gate mean")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=7, loc="lower right")
    axes[2].set_title("|S| of each head after each write", fontsize=9)
    axes[2].set_xlabel("segment", fontsize=8)
    axes[2].legend(fontsize=7, ncols=4, loc="upper left")
    _segment_ticks(axes[2:])
    return fig


# ---------------------------------------------------------------------------------------------- helpers


def _marked(mask: list[bool] | None, n: int) -> list[int]:
    """Positions below n where `mask` is set."""
    return [] if mask is None else [p for p in range(min(n, len(mask))) if mask[p]]



def _figure(nrows: int = 1, ncols: int = 1, width: float = 6, height: float = 4, squeeze: bool = True):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, 30), min(height, 40)), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _heat(fig, ax, values: torch.Tensor, title: str, vmin: float | None = None, vmax: float | None = None) -> None:
    # The colour scale spans the values shown (the colour bar gives it): near-uniform attention still shows
    # its structure instead of one flat colour.
    image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ax.set_title(title, fontsize=9)


def _token_axis(ax, ins, positions: list[int], axis: str, labels: bool = True) -> None:
    setter = ax.set_yticks if axis == "y" else ax.set_xticks
    if not labels:
        setter(range(len(positions)), [""] * len(positions))
        return
    texts = [f"{p} {ins.pieces[p]!r}"[:28] if axis == "y" else repr(ins.pieces[p])[:12] for p in positions]
    setter(range(len(positions)), texts, fontsize=6 if axis == "x" else 7, rotation=90 if axis == "x" else 0)
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    for tick, p in zip(ticks, positions, strict=True):
        if ins.fact_mask is not None and p < len(ins.fact_mask) and ins.fact_mask[p]:
            tick.set_color(FACT)
            if ins.support_mask is not None and ins.support_mask[p]:
                tick.set_fontweight("bold")
        if p == ins.answer_pos:
            tick.set_color(ANSWER)
        if p >= ins.n_prompt:
            tick.set_fontstyle("italic")


def _slot_axis(ax, ins, axis: str) -> None:
    a, b = ins.slot_window
    step = max(1, (b - a) // 20)
    ticks = list(range(0, b - a, step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [str(a + t) for t in ticks], fontsize=7)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)("memory token" if ins.arch == "rmt" else "slot", fontsize=8)


def _segment_ticks(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:  # segments are whole numbers, even when there is only one
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _heads(ins) -> str:
    return f"head {ins.heads}" if isinstance(ins.heads, int) else f"{ins.heads} over heads"


def _segments_to_show(ins, positions: torch.Tensor) -> list[int]:
    """Segments with fact tokens first (evenly thinned to MAX_WRITE_PANELS), else evenly spaced ones."""
    n = positions.shape[0]
    with_facts = []
    if ins.fact_mask is not None:
        mask = ins.fact_mask
        with_facts = [w for w in range(n) if any(p < len(mask) and mask[p] for p in positions[w].tolist())]
    pool = with_facts or list(range(n))
    if len(pool) <= MAX_WRITE_PANELS:
        return pool
    step = (len(pool) - 1) / (MAX_WRITE_PANELS - 1)
    return sorted({pool[round(i * step)] for i in range(MAX_WRITE_PANELS)})


def _save(fig, path: Path) -> Path:
    """savefig through a temporary name, so a figure on disk is always complete."""
    from lm2cli.fileio import temp_file_for

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
