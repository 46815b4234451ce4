"""Mutation score per module from the results `mutmut run` left in mutants/ (see docs/testing.md).

    python tests/mutation_report.py                 every checked mutant
    python tests/mutation_report.py --names FILE    only the mutants named in FILE (one per line), e.g. a sample
    python tests/mutation_report.py --survivors     also list each surviving mutant (then `mutmut show NAME`)

A mutant counts as killed when a test failed on it, or when it made the tests hang (mutmut's timeout, by CPU
time). Survived and "no tests" (no fast test runs that function) count against the score; unchecked mutants
are left out. Not a test module: pytest collects test_*.py only.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "type check"}
NOT_KILLED = {0: "survived", 5: "no tests", 33: "no tests"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=Path, help="only these mutants (one name per line)")
    parser.add_argument("--survivors", action="store_true", help="list the mutants not killed")
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working directory")
    args = parser.parse_args()
    wanted = set(args.names.read_text().split()) if args.names else None
    total: Counter = Counter()
    survivors = []
    print(f"{'module':44} {'checked':>8} {'killed':>7} {'timeout':>8} {'survived':>9} {'score':>7}")
    for meta in sorted(args.mutants.glob("lm2cli/**/*.py.meta")):
        results = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter = Counter()
        for name, code in results.items():
            if (wanted is not None and name not in wanted) or code is None:
                continue
            counts["checked"] += 1
            if code in KILLED:
                counts["timeout" if KILLED[code] == "timeout" else "killed"] += 1
            else:
                counts["survived"] += 1
                survivors.append((name, NOT_KILLED.get(code, f"exit {code}")))
        if counts["checked"]:
            total.update(counts)
            print(row(str(meta.relative_to(args.mutants))[:-5], counts))
    print(row("all", total))
    if args.survivors:
        for name, why in survivors:
            print(f"  {why:9} {name}")


def row(label: str, c: Counter) -> str:
    score = (c["killed"] + c["timeout"]) / c["checked"] if c["checked"] else float("nan")
    return f"{label:44} {c['checked']:8} {c['killed']:7} {c['timeout']:8} {c['survived']:9} {score:7.1%}"


if __name__ == "__main__":
    main()
