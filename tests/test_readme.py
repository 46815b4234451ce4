"""The README states the truth: its recipe reference matches the schema and CI runs its commands."""

from __future__ import annotations

import re
from pathlib import Path

from lm2cli.recipe import reference_markdown

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_recipe_reference_matches_schema():
    m = re.search(r"<!-- recipe-reference:start -->\n(.*)<!-- recipe-reference:end -->", README, re.S)
    assert m, "README lost its recipe-reference markers"
    assert m.group(1) == reference_markdown(), "README recipe reference is stale: run `python -m lm2cli.recipe`"


def _bash_blocks_after(heading: str) -> list[str]:
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_exactly_the_readme_commands():
    install, test = _bash_blocks_after("## Set up")
    ci = (REPO / ".ci" / "run").read_text()
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert test in ci_commands
    assert install in ci_commands
