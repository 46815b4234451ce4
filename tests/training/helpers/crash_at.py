"""Run `lm2 ARGS...` in this process and SIGKILL it at a chosen point: a crash at a known moment, for tests.

    python crash_at.py after-step N ARGS...   killed right after optimizer step N (before its save, if any)
    python crash_at.py in-save N ARGS...      killed while writing checkpoint N: its model files are in
                                              step_N.tmp/, the rename that would publish it never happens

Only this script installs the callbacks; lm2 itself has no test hook.
"""

from __future__ import annotations

import os
import signal
import sys

from lm2cli.cli import main
from lm2cli.training import checkpoints as ck
from lm2cli.training import loop


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int) -> None:
    real = loop.optimizer_step

    def optimizer_step(s, *args, **kwargs):
        result = real(s, *args, **kwargs)
        if s.step == step:
            die()
        return result

    loop.optimizer_step = optimizer_step


def kill_in_save(step: int) -> None:
    real = ck.save_checkpoint

    def save_checkpoint(root, at, write_model_files, *args, **kwargs):
        def write(tmp):
            write_model_files(tmp)
            if at == step:
                die()

        return real(root, at, write, *args, **kwargs)

    ck.save_checkpoint = save_checkpoint


if __name__ == "__main__":
    where, step, *args = sys.argv[1:]
    {"after-step": kill_after_step, "in-save": kill_in_save}[where](int(step))
    sys.argv = ["lm2", *args]
    main()
