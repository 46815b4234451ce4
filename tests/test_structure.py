"""The module map of docs/internals.md, enforced by reading imports (top-level and inside functions).

Commands that read a trained model (generate, eval, inspect-memory) import `checkpoint`, `data`, `model`,
`generation` and the shared bottom layer, never `training`: only `pretrain` and `finetune` train. The bottom
layer imports no command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lm2cli"
TRAINING = "lm2cli.training"
COMMANDS = ("lm2cli.generation", "lm2cli.evaluation", "lm2cli.inspection")  # the last two where present
BOTTOM = ("lm2cli.checkpoint", "lm2cli.data", "lm2cli.model", "lm2cli.scoring", "lm2cli.recipe", "lm2cli.errors",
          "lm2cli.fileio", "lm2cli.resources", "lm2cli.outdir", "lm2cli.version", "lm2cli.lazy")
TRAINING_COMMANDS = {"pretrain", "finetune"}  # the cli.py functions that may import lm2cli.training


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imports(tree: ast.AST, package: str) -> list[tuple[str, str]]:
    """(imported module, enclosing function or "") of every import in `tree`, relative ones resolved against
    `package` (the package the module is in)."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not function \
                else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                found.extend((f"{base}.{alias.name}" if base == "lm2cli" else base, function) for alias in child.names)
            visit(child, inner)

    visit(tree, "")
    return found


def within(name: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(name == p or name.startswith(p + ".") for p in packages)


def all_imports() -> dict[str, list[tuple[str, str]]]:
    return {module_name(p): imports(ast.parse(p.read_text(encoding="utf-8")), package_of(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def violations(table: dict[str, list[tuple[str, str]]]) -> list[str]:
    bad = []
    for module, found in table.items():
        for name, function in found:
            if not within(name, "lm2cli"):
                continue
            where = f"{module}{f' ({function})' if function else ''} imports {name}"
            if within(name, TRAINING) and not within(module, TRAINING):
                if not (module == "lm2cli.cli" and function in TRAINING_COMMANDS):
                    bad.append(f"{where}: only training and `lm2 pretrain`/`lm2 finetune` may import training")
            if within(module, BOTTOM) and within(name, (*COMMANDS, "lm2cli.cli", TRAINING)):
                bad.append(f"{where}: the bottom layer imports no command")
            if within(module, TRAINING) and within(name, (*COMMANDS, "lm2cli.cli")):
                bad.append(f"{where}: training imports no other command")
    return bad


def test_commands_never_import_training_and_the_bottom_layer_no_command():
    table = all_imports()
    assert table["lm2cli.cli"] and table["lm2cli.generation.command"]  # the walk found the modules
    assert ("lm2cli.training.pretrain", "pretrain") in table["lm2cli.cli"]  # and imports inside functions
    assert violations(table) == []


@pytest.mark.parametrize("module,package,line,function", [
    ("lm2cli.generation.command", "lm2cli.generation", "from lm2cli.training.loop import evaluate", ""),
    ("lm2cli.generation.command", "lm2cli.generation", "import lm2cli.training.checkpoints as ck", "_generate"),
    ("lm2cli.generation.command", "lm2cli.generation", "from ..training import loop", "pick_device"),
    ("lm2cli.checkpoint", "lm2cli", "from .training import checkpoints", ""),
    ("lm2cli.data", "lm2cli.data", "from .. import training", ""),
    ("lm2cli.cli", "lm2cli", "from lm2cli.training.finetune import load_partial", "generate"),
    ("lm2cli.data.examples", "lm2cli.data", "from lm2cli.generation.command import read_prompts", "load_examples"),
    ("lm2cli.model.model", "lm2cli.model", "from lm2cli.cli import run", ""),
    ("lm2cli.training.loop", "lm2cli.training", "from lm2cli.generation import Generator", "save"),
])
def test_the_rule_catches_a_forbidden_import(module, package, line, function):
    """The checker itself: each of these added imports is reported (at module level or inside a function)."""
    source = f"def {function}():\n    {line}\n" if function else line + "\n"
    table = all_imports()
    table[module] = table[module] + imports(ast.parse(source), package)
    found = violations(table)
    assert found and all(v.startswith(module) for v in found), found
