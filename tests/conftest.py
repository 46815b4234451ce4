"""Suite-wide settings and shared fixtures.

* One compute thread for the whole suite (and its subprocesses): on 2 shared CPU cores, more threads than free
  cores make every parallel op wait at OpenMP barriers for descheduled threads (the model tests took 107 s
  instead of ~30 s with torch's default).
* Hypothesis: the `ci` profile (loaded when CI is set, or with HYPOTHESIS_PROFILE=ci) is derandomized, so a CI
  run draws the same examples every time; locally the default profile keeps exploring.
* Reference data under `shared/` (real bAbI, books) is optional: tests/data/conftest.py finds it through
  LM2_SHARED_DIR (default: `shared/` beside the checkout); tests that need it skip with the path they looked
  at (listed by -ra), and the report header says which directory was used.
* Fixtures that run the CLI in-process (fast) or as a real subprocess (signals, exit codes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the subprocesses the tests start

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
settings.load_profile(HYPOTHESIS_PROFILE)


def pytest_report_header(config):
    root = Path(os.environ.get("LM2_SHARED_DIR") or REPO.parent / "shared")  # as tests/data/conftest.py
    return f"lm2 reference data: {root} ({'found' if root.is_dir() else 'missing: tests that need it skip'}); " \
           f"hypothesis profile {HYPOTHESIS_PROFILE}; torch threads {torch.get_num_threads()}"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip on a machine without a CUDA GPU (torch is imported only if there are any)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
        for item in marked:
            item.add_marker(skip)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """cli("pretrain", "recipes/tiny.toml", ...) -> CliResult, running lm2 in this process."""
    from lm2cli.cli import run

    def _run(*args: str) -> CliResult:
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return _run


def lm2_subprocess(*args: str, cwd: Path | None = None, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m lm2cli ARGS` from this checkout (not whatever lm2 is installed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "lm2cli", *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, **kw)


@pytest.fixture
def lm2_proc():
    return lm2_subprocess
