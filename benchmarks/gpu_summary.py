"""The summary table of benchmarks/gpu_check.sh: reads the stage results in a directory and prints one Markdown
table of what was measured against the issue-14 targets.

    python benchmarks/gpu_summary.py OUT_DIR [--dry]

Exit status 0 when every stage ran and every target was met, 1 otherwise. With --dry (toy sizes on a CPU) the
numbers only show that each stage produced its results: targets are not judged, and the exit status says
whether every stage ran and produced its file.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIME_BUDGET_S = 8 * 60


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_counts(path: Path) -> dict | None:
    """passed / failed / skipped / errors of a JUnit XML report (pytest --junitxml)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failures - errors - skipped, "failed": failures, "errors": errors, "skipped": skipped}


class Table:
    def __init__(self, dry: bool):
        self.dry = dry
        self.rows: list[tuple[str, str, str, str]] = []
        self.ok = True

    def add(self, check: str, measured: str, target: str = "reported", met: bool | None = None,
            judged_when_dry: bool = False) -> None:
        """`met`: None = nothing to judge (a reported number), False/True = a target missed/met. A dry run judges
        only what checks the script itself (`judged_when_dry`: a stage ran, its tests passed or skipped)."""
        if self.dry and not judged_when_dry and met is not None:
            self.rows.append((check, measured, target, "(dry run: not judged)"))
            return
        if met is False:
            self.ok = False
        self.rows.append((check, measured, target, "" if met is None else ("met" if met else "NOT MET")))

    def missing(self, check: str, why: str) -> None:
        self.ok = False
        self.rows.append((check, f"no result ({why})", "", "FAILED"))

    def markdown(self) -> str:
        lines = ["| check | measured | target | status |", "| --- | --- | --- | --- |"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def summarise(out: Path, dry: bool) -> Table:
    t = Table(dry)
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "stages.jsonl").exists() else []
    failed = {s["stage"]: s for s in stages if s["rc"] != 0}

    tests = pytest_counts(out / "cuda_tests.xml")
    if tests is None:
        t.missing("CUDA-marked tests", "no pytest report")
    else:
        broken = tests["failed"] + tests["errors"]
        t.add("CUDA-marked tests", f"{tests['passed']} passed, {tests['skipped']} skipped, {broken} failed",
              "all pass" if not dry else "collected; skip without a GPU",
              broken == 0 and (tests["skipped"] > 0 if dry else tests["passed"] > 0), judged_when_dry=True)

    train = read_json(out / "train.json")
    if train is None:
        t.missing("training (recipe mode)", f"stage train {why(failed.get('train'))}")
    else:
        where = f"{train['device']}, batch {train['batch']} x {train['seq']}, compile {train['compile']}"
        t.add("training tokens/s LM2 / vanilla", f"{train['lm2_tokens_per_s']:,.0f} / "
              f"{train['vanilla_tokens_per_s']:,.0f} ({where})")
        t.add("training MFU LM2 (bf16 peak measured in this run)",
              f"{100 * train['lm2_mfu']:.1f}% of {train['matmul_peak_tflops']:.0f} TFLOP/s", ">= 40%",
              train["lm2_mfu"] >= 0.40)
        if "lm2_mfu_datasheet" in train:
            t.add("training MFU LM2 (datasheet bf16 peak)", f"{100 * train['lm2_mfu_datasheet']:.1f}%")
        t.add("training MFU vanilla (measured peak)", f"{100 * train['vanilla_mfu']:.1f}%")
        t.add("LM2 / vanilla step ratio", f"{train['lm2_vanilla_step_ratio']:.2f}")
        t.add("peak GPU memory, training LM2 / vanilla",
              f"{train['lm2_peak_mb']:,.0f} / {train['vanilla_peak_mb']:,.0f} MB")
        if "precision_max_rel_diff" in train:
            t.add(f"bf16 vs fp32 loss over {train['precision_steps']} steps",
                  f"largest relative difference {train['precision_max_rel_diff']:.2e} (final loss "
                  f"{train['loss_fp32'][-1]:.3f} fp32, {train['loss_bf16'][-1]:.3f} bf16)", "<= 0.02",
                  train["precision_ok"])

    gen = read_json(out / "generate.json")
    if gen is None:
        t.missing("generation", f"stage generate {why(failed.get('generate'))}")
    else:
        sides = [s for s in ("compiled", "eager") if f"lm2_{s}_decode_vs_hf" in gen]
        for side in sides:
            compiled = side == "compiled"
            hf = "HF generate (static cache)" if gen["device"] != "cpu" else "HF generate"
            t.add(f"decode batch 1, lm2 {side} vs {hf}",
                  f"{gen[f'lm2_{side}_decode_tok_s']:,.0f} vs {gen['lm2_hf_decode_tok_s']:,.0f} tok/s = "
                  f"{gen[f'lm2_{side}_decode_vs_hf']:.2f}x", ">= 3x" if compiled else "reported",
                  gen[f"lm2_{side}_decode_vs_hf"] >= 3.0 if compiled else None)
        if "lm2_compiled_compile_s" in gen:
            t.add("compiling the static-shape decode step", f"{gen['lm2_compiled_compile_s']:.0f} s")
        batch = {k: v for k, v in gen.items() if k.startswith("batch") and k.endswith("_decode_tok_s")}
        if batch:
            n = next(iter(batch)).split("_")[0][len("batch"):]
            t.add(f"decode batch {n} tok/s", ", ".join(f"{k.split('_')[1]} {v:,.0f}" for k, v in batch.items()))
        rows = gen.get("prefill", [])
        if len(rows) >= 2:
            first, last = rows[0], rows[-1]
            if "peak_mb" in last:
                bounded = last["peak_mb"] <= 1.25 * first["peak_mb"] + 64
                t.add(f"prefill {last['tokens']:,} tokens with a window: peak GPU memory",
                      f"{last['peak_mb']:,.0f} MiB ({first['peak_mb']:,.0f} MiB at {first['tokens']:,}); "
                      f"{last['us_per_token']:.1f} vs {first['us_per_token']:.1f} us/token",
                      "bounded (<= 1.25x the short prompt's)", bounded)
            else:
                t.add(f"prefill {last['tokens']:,} tokens with a window: peak RSS",
                      f"{last['rss_peak_mb']:,.0f} MB ({first['rss_peak_mb']:,.0f} MB at {first['tokens']:,})")

    total = sum(s["seconds"] for s in stages)
    for s in stages:
        t.add(f"stage {s['stage']}", f"{s['seconds']} s" + (f", {why(s)}" if s["rc"] else ""),
              f"<= {s['limit']} s", s["rc"] == 0, judged_when_dry=True)
    t.add("all stages", f"{total} s ({total / 60:.1f} min)", f"<= {TIME_BUDGET_S // 60} min",
          total <= TIME_BUDGET_S)
    return t


def why(stage: dict | None) -> str:
    if stage is None:
        return "wrote no results"
    return "timed out" if stage["rc"] in (124, 137) else f"failed (exit {stage['rc']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dry", action="store_true", help="toy sizes on a CPU: check the plumbing, judge no target")
    args = ap.parse_args()
    table = summarise(args.out, args.dry)
    title = "lm2 GPU check" + (" — DRY RUN (CPU, toy sizes: these numbers say nothing about a GPU)" if args.dry else "")
    print(f"\n## {title}\n\n{table.markdown()}\n")
    if args.dry:
        print("dry run: every stage ran and wrote its results" if table.ok else "dry run: some stage failed")
    else:
        print("all stages ran and every target was met" if table.ok else "some stage failed or some target was not met")
    return 0 if table.ok else 1


if __name__ == "__main__":
    sys.exit(main())
