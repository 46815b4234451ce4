"""Where training numbers go: the console (tqdm bar on a terminal, plain lines otherwise), metrics.jsonl and
metrics.csv in the run directory, and TensorBoard when it is installed. Only rank 0 writes anything.

On resume, rows logged after the checkpoint's step are dropped from both files: the resumed run recomputes
those steps, so the files read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lm2cli.fileio import atomic_write_text

CSV_COLUMNS = ["kind", "step", "stage", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu",
               "elapsed_s", "epoch", "val_loss", "val_ppl", "val_bpb", "val_em"]


def truncate_after(run_dir: Path, step: int, stage: int = 1) -> None:
    """Drop metric rows after (`stage`, `step`): they belong to the part of a run that is being redone.

    Rows are ordered by (stage, step) because a curriculum stage's first validation shares its step number
    with the previous stage's last one. `step = -1` empties both files (a fresh start).
    """

    def keep(row_stage, row_step) -> bool:
        return (int(row_stage or 1), int(row_step)) <= (stage, step)

    jsonl, csv_path = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
    if jsonl.is_file():
        kept = []
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
            if keep(row.get("stage"), row.get("step", 0)):
                kept.append(line)
        atomic_write_text(jsonl, "".join(line + "\n" for line in kept))
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and keep(r.get("stage"), r["step"])]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_path, buf.getvalue())


class MetricsLog:
    """Append-only JSONL + CSV (+ TensorBoard) writer for one run directory."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        csv_path = run_dir / "metrics.csv"
        new = not csv_path.is_file() or csv_path.stat().st_size == 0
        self._csv_file = open(csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore",
                                   lineterminator="\n")
        if new:
            self._csv.writeheader()
        self._tb = _tensorboard_writer(run_dir) if tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in row.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        self._csv.writerow({k: ("" if v is None else v) for k, v in clean.items()})
        self._csv_file.flush()
        if self._tb is not None:
            prefix = "val" if row.get("kind") == "val" else "train"
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "stage"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, row.get("step", 0))

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class LossEMA:
    """Exponential moving average of the loss, debiased like Adam's moments (accurate from the first step)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.value, self.n = beta, 0.0, 0

    def update(self, x: float) -> float:
        self.n += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.value / (1 - self.beta ** self.n)


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Console:
    """Progress on the terminal: a tqdm bar when stderr is a TTY, else one plain line per log interval."""

    def __init__(self, enabled: bool, total_steps: int, first_step: int, desc: str):
        self.enabled = enabled
        self.total, self.first = total_steps, first_step
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc=desc, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def step(self, step: int, loss: float, lr: float, tok_s: float, mfu: float | None, stage: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        done = step - self.first
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        mfu_txt = f" | mfu {mfu:.1%}" if mfu is not None else ""
        eta_txt = fmt_duration(eta) if math.isfinite(eta) else "?"
        print(f"{stage}step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s{mfu_txt} | "
              f"eta {eta_txt}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
