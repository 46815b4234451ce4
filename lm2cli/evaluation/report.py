"""Results files of `lm2 eval`, all derived from one JSON-ready dict:

    results.json       every number with its settings (format "lm2-eval-results"); "complete": false until the
                       run has finished, so an interrupted run never looks complete
    results.csv        one row per number (long format)
    results.md         the tables (BABILong as the paper's Table 1: rows = tasks, columns = lengths, plus the
                       qa1-qa5 and qa1-qa10 averages), rendered from results.json (`render_markdown`)
    predictions.jsonl  one line per answer: model, task, length, question, target, output, correct (and
                       support_last where the row says whether its newest supporting fact is the last fact)
    *.png              accuracy against length (one line per model), loss against position (extra "plot")

Every file is written atomically after each finished cell, so whatever is on disk is consistent.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lm2cli.errors import Lm2Error
from lm2cli.fileio import atomic_write_text

FORMAT = "lm2-eval-results"
FILES = ("results.json", "results.csv", "results.md", "predictions.jsonl")


def read_results(directory: str | Path) -> dict:
    path = Path(directory) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Lm2Error(f"{path}: not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Lm2Error(f"{path}: unreadable ({e})") from None
    if results.get("format") != FORMAT:
        raise Lm2Error(f"{path}: not an lm2 eval results file")
    return results


def write_results(directory: Path, results: dict, predictions: list[dict]) -> None:
    atomic_write_text(directory / "predictions.jsonl",
                      "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    atomic_write_text(directory / "results.csv", render_csv(results))
    atomic_write_text(directory / "results.md", render_markdown(results))
    # results.json last: it says whether the others are complete
    atomic_write_text(directory / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------- markdown


def fmt_accuracy(cell: dict) -> str:
    lo, hi = cell["ci95"]
    return f"{cell['accuracy']:.1f} ({lo:.0f}–{hi:.0f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def babilong_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the BABILong table: rows = tasks (then the averages), one row per model and task
    when several models are compared, columns = lengths; each cell is accuracy % (95 % interval)."""
    b = results["babilong"]
    entries = {(c["model"], c["task"], c["length"]): c for c in b["cells"] + b["averages"]}
    models = [m for m in b["variants"] if any(k[0] == m for k in entries)]
    several = len(models) > 1
    header = ["task"] + (["model"] if several else []) + list(b["lengths"])
    rows = []
    for task in list(b["tasks"]) + list(dict.fromkeys(a["task"] for a in b["averages"])):
        for model in models:
            cells = [entries.get((model, task, length)) for length in b["lengths"]]
            if all(c is None for c in cells):
                continue
            label = f"**{task}**" if task.startswith("qa1-") else task
            rows.append([label] + ([model] if several else []) + [fmt_accuracy(c) if c else "—" for c in cells])
    return header, rows


def support_section(cells: list[dict]) -> list[str]:
    """Accuracy split by where the newest supporting fact lies, for the cells whose rows say (built sets)."""
    split = [c for c in cells if c.get("by_support")]
    if not split:
        return []
    def group(part: dict | None) -> str:
        return f"{fmt_accuracy(part)}, {part['n']} rows" if part else "—"

    rows = [[c["task"], c["model"], c["length"], group(c["by_support"].get("last")),
             group(c["by_support"].get("earlier"))] for c in split]
    return ["", "### Where the supporting fact lies", "",
            "Accuracy % (95 % interval) where the newest supporting fact is the story's last fact, and where other "
            "facts follow it. A model that keeps only the latest fact answers the first kind and fails the second.",
            ""] + _table(["task", "model", "length", "supporting fact = last fact", "other facts follow"], rows)


def render_markdown(results: dict) -> str:
    lines = ["# lm2 eval", ""]
    if not results.get("complete"):
        lines += [f"**INCOMPLETE** — {results.get('status', 'interrupted')}: only the numbers below were measured; "
                  f"this is not a finished evaluation.", ""]
    lines += _table(["model", "checkpoint", "step", "weights sha256", "arch"],
                    [[m["name"], m["checkpoint"], str(m["step"]), m["sha256"][:12], m["arch"]]
                     for m in results["models"]])
    b = results.get("babilong")
    if b and (b["cells"] or b["averages"]):
        data = b["data"]
        source = data.get("name") or data.get("path")
        tokenizer = (data.get("tokenizer") or {}).get("sha256", "")[:12]
        lines += ["", "## BABILong", "",
                  f"Mode `{b['mode']}` ({b['metric']}), {b['decoding']} decoding, prompt: {b['prompt']}. Data: "
                  f"{source} ({data['kind']}{', tokenizer ' + tokenizer if tokenizer else ''}), up to "
                  f"{b['samples_requested']} samples per cell. Accuracy % with its 95 % Wilson interval.", ""]
        if data.get("note"):
            lines[-2] += f" {data['note']}."
        lines += _table(*babilong_rows(results))
        lines += support_section(b["cells"])
    p = results.get("perplexity")
    if p and p["results"]:
        labels = p["data"]["buckets"]
        lines += ["", "## Perplexity", "",
                  f"{p['data']['kind']} ({p['data'].get('path') or ', '.join(p['data'].get('files', []))}), "
                  f"sequences of {p['data']['seq_len']} tokens fed through the model state. Loss in nats per "
                  f"token; the last columns are the loss by position of the predicted token.", ""]
        rows = []
        for r in p["results"]:
            by_bucket = {x["bucket"]: f"{x['loss']:.4f}" for x in r["buckets"]}
            rows.append([r["model"], str(r["tokens"]), f"{r['loss']:.4f}", f"{r['ppl']:.3f}",
                         "—" if r["bpb"] is None else f"{r['bpb']:.4f}"] + [by_bucket.get(b, "—") for b in labels])
        lines += _table(["model", "tokens", "loss", "ppl", "bits/byte"] + labels, rows)
    mc = results.get("multiple_choice")
    if mc and mc["results"]:
        groups = list(dict.fromkeys(g["name"] for r in mc["results"] for g in r["groups"]))
        lines += ["", "## Multiple choice", "",
                  f"{mc['data'].get('name') or mc['data'].get('path')}, {mc['data']['shots']}-shot, "
                  f"{mc['data']['questions']} questions. Accuracy % (95 % interval); per subject in results.json.",
                  ""]
        rows = []
        for r in mc["results"]:
            by_group = {g["name"]: fmt_accuracy(g) for g in r["groups"]}
            rows.append([r["model"]] + [by_group.get(g, "—") for g in groups] + [fmt_accuracy(r["overall"])])
        lines += _table(["model"] + groups + ["overall"], rows)
    h = results.get("harness")
    if h and h["results"]:
        lines += ["", "## lm-evaluation-harness", ""]
        rows = [[r["model"], r["task"], r["metric"], f"{r['value']:.4f}",
                 "—" if r.get("stderr") is None else f"{r['stderr']:.4f}"] for r in h["results"]]
        lines += _table(["model", "task", "metric", "value", "stderr"], rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ csv


CSV_COLUMNS = ["section", "model", "task", "length", "metric", "value", "n", "correct", "ci95_low", "ci95_high",
               "complete"]


def csv_rows(results: dict) -> list[dict]:
    done = bool(results.get("complete"))
    rows = []

    def add(section, model, task, length, metric, value, n=None, correct=None, ci=None):
        rows.append({"section": section, "model": model, "task": task, "length": length, "metric": metric,
                     "value": value, "n": n, "correct": correct, "ci95_low": ci[0] if ci else None,
                     "ci95_high": ci[1] if ci else None, "complete": done})

    b = results.get("babilong")
    if b:
        for c in b["cells"] + b["averages"]:
            add("babilong", c["model"], c["task"], c["length"], f"accuracy ({b['mode']})", c["accuracy"], c["n"],
                c["correct"], c["ci95"])
            for where, part in c.get("by_support", {}).items():
                add("babilong", c["model"], c["task"], c["length"], f"accuracy ({b['mode']}), support {where}",
                    part["accuracy"], part["n"], part["correct"], part["ci95"])
    p = results.get("perplexity")
    if p:
        for r in p["results"]:
            for metric in ("loss", "ppl", "bpb"):
                add("perplexity", r["model"], "all", "", metric, r[metric], r["tokens"])
            for x in r["buckets"]:
                add("perplexity", r["model"], x["bucket"], "", "loss", x["loss"], x["tokens"])
    mc = results.get("multiple_choice")
    if mc:
        for r in mc["results"]:
            for a in [r["overall"]] + r["groups"] + r["subjects"]:
                add("multiple-choice", r["model"], a["name"], "", "accuracy", a["accuracy"], a["n"], a["correct"],
                    a["ci95"])
    h = results.get("harness")
    if h:
        for r in h["results"]:
            add("harness", r["model"], r["task"], "", r["metric"], r["value"])
    return rows


def render_csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(results))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- plots


def write_plots(directory: Path, results: dict) -> list[Path]:
    """PNG plots (needs matplotlib, extra "plot"); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    b = results.get("babilong")
    if b and b["cells"]:
        entries = {(c["model"], c["task"], c["length"]): c for c in b["cells"] + b["averages"]}
        panels = list(b["tasks"]) + list(dict.fromkeys(a["task"] for a in b["averages"]))
        cols = min(4, len(panels))
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
        for ax, task in zip(axes.flat, panels, strict=False):
            for model in b["variants"]:
                xs = [i for i, n in enumerate(b["lengths"]) if (model, task, n) in entries]
                if xs:
                    ax.plot(xs, [entries[(model, task, b["lengths"][i])]["accuracy"] for i in xs], marker="o",
                            label=model)
            ax.set_title(task)
            ax.set_xticks(range(len(b["lengths"])), b["lengths"])
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].set_ylabel(f"accuracy % ({b['mode']})")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, directory / "accuracy_vs_length.png"))
        plt.close(fig)
    p = results.get("perplexity")
    if p and p["results"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for r in p["results"]:
            ax.plot([x["bucket"] for x in r["buckets"]], [x["loss"] for x in r["buckets"]], marker="o",
                    label=r["model"])
        ax.set_xlabel("position of the predicted token")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, directory / "loss_vs_position.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    from lm2cli.fileio import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())
    return path
