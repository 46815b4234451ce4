"""Nothing a file or a dataset name contains may choose what code runs (issue 9): a source scan for the
usual ways in, and the one library that can run downloaded code (datasets' loading scripts) kept off."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_nothing_in_the_package_imports_by_a_name_read_from_a_file():
    """The decoder must stay table-driven: no dynamic import or attribute lookup anywhere in lm2cli."""
    patterns = [r"\bimportlib\b", r"__import__\((?!\")", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
                r"\bimport (pickle|marshal|dill|shelve)\b", r"pickle\.loads?\(", r"allow_pickle\s*=\s*True",
                r"trust_remote_code\s*=\s*True", r"yaml\.(unsafe_)?load\(", r"torch\.load\((?![^)]*weights_only=True)"]
    # lazy.py imports module paths from the literal export tables of the package's own __init__ files (checked
    # below): code, never file contents, names what it imports
    allowed = {("lm2cli/lazy.py", "importlib")}
    offenders = []
    for path in (REPO / "lm2cli").rglob("*.py"):
        text = path.read_text()
        rel = str(path.relative_to(REPO))
        if "lazy_exports(" in text and rel != "lm2cli/lazy.py":
            assert re.search(r"lazy_exports\(__name__, \{", text), f"{rel}: lazy_exports takes a literal table"
        offenders += [f"{rel}: {m.group(0)}" for p in patterns for m in re.finditer(p, text)
                      if (rel, m.group(0)) not in allowed]
    assert not offenders, offenders


def test_datasets_never_runs_loading_scripts(monkeypatch, tmp_path):
    """datasets 2.x (allowed by our pin) ran a hub dataset's Python script by default; every call says no."""
    import datasets

    from lm2cli.data import babilong
    from lm2cli.data.corpus import FileCorpus, load_hub_dataset

    calls = []

    def fake(name, *args, **kwargs):
        calls.append((name, kwargs))
        if name == "json":
            return [{"text": "x"}]
        return {"qa1": [{"input": "a", "question": "b", "target": "c"}], "train": [{"text": "x"}]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    load_hub_dataset("someone/corpus", key="data.hub_name")
    babilong._load_from_hub("someone/babilong", "1k", "qa1")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    list(FileCorpus((tmp_path / "a.jsonl",), "text", "file", "fail").documents())
    assert [c[0] for c in calls] == ["someone/corpus", "someone/babilong", "json"]
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls)
