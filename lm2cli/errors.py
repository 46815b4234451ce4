"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, a corrupt checkpoint) is raised as `Lm2Error`.
The CLI prints its message as one line and exits with code 2; a traceback is shown only with `--debug`.
Programming errors stay ordinary exceptions so they are never disguised as user mistakes.
"""

from __future__ import annotations


class Lm2Error(Exception):
    """An error caused by the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message)


class RecipeError(Lm2Error):
    """One or more problems in a recipe file or its overrides; each problem is its own line."""

    def __init__(self, problems: list[str]):
        super().__init__(problems[0] if len(problems) == 1 else "; ".join(problems), problems=problems)
