"""benchmarks/gpu_check.sh works: its dry version (every stage at toy sizes on the CPU) runs each stage, writes
each result file and prints the summary table with a row for every check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    bad = subprocess.run(["bash", SCRIPT, "--nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_prints_the_summary(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", SCRIPT, "--dry"], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("stages.jsonl", "cuda_tests.xml", "train.json", "generate.json", "summary.md"):
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in summary
    for row in ("CUDA-marked tests", "training MFU LM2", "LM2 / vanilla step ratio", "bf16 vs fp32 loss",
                "decode batch 1, lm2 eager vs HF generate", "decode batch 2 tok/s", "prefill 512 tokens", "stage train",
                "all stages"):
        assert row in summary, row
    assert "FAILED" not in summary and "NOT MET" not in summary
