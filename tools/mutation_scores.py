"""Mutation score per module from a mutmut run (docs/TESTING.md): killed / (all - equivalent), as a Markdown table.

    mutmut run --max-children 2 && python tools/mutation_scores.py [--survivors] [--save FILE] [--baseline FILE]

Mutants that cannot change behaviour are listed, with the reason, in docs/TESTING.md's table of equivalent mutants
(a row whose first cell is the mutant's name in backticks); they count neither as killed nor as survived. A mutant
that no selected test reaches ("no tests") counts as survived. ``--baseline`` fills the mutants this run did not
check with the statuses ``--save`` kept of an earlier run of the same code (adding tests kills more, never fewer:
rerun only what survived, ``mutmut run NAME ...``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLED = {"killed", "timeout"}


def equivalent_mutants(doc: Path = REPO / "docs" / "TESTING.md") -> set[str]:
    return set(re.findall(r"^\| `([\w.ǁ]+__mutmut_\d+)` \|", doc.read_text(), re.MULTILINE)) if doc.is_file() else set()


def statuses(mutants: Path = REPO / "mutants") -> dict[str, dict[str, str]]:
    """{module: {mutant name: status}} from mutmut's per-file results (mutants/<path>.meta)."""
    from mutmut.__main__ import status_by_exit_code

    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if codes:
            module = str(meta.relative_to(mutants)).removesuffix(".meta")
            out[module] = {k: "not checked" if c is None else status_by_exit_code[c] for k, c in codes.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list each module's surviving mutants")
    parser.add_argument("--save", type=Path, help="write the statuses (JSON) for a later --baseline")
    parser.add_argument("--baseline", type=Path, help="statuses of an earlier run for the mutants not checked now")
    parser.add_argument("--load", type=Path, help="score statuses --save kept, instead of mutants/")
    args = parser.parse_args(argv)
    equivalent = equivalent_mutants()
    results = json.loads(args.load.read_text()) if args.load else statuses()
    if args.baseline:
        for module, earlier in json.loads(args.baseline.read_text()).items():
            for name, status in earlier.items():
                if results.get(module, {}).get(name) == "not checked":
                    results[module][name] = status
    if args.save:
        args.save.write_text(json.dumps(results, indent=1))
    print("| module | mutants | equivalent | killed | survived | no tests | not checked | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for module, by_name in results.items():
        counts = Counter("equivalent" if name in equivalent else s for name, s in by_name.items())
        killed = sum(counts[s] for s in KILLED)
        scored = len(by_name) - counts["equivalent"] - counts["not checked"]
        score = f"{100 * killed / scored:.1f} %" if scored else "-"
        print(
            f"| {module} | {len(by_name)} | {counts['equivalent']} | {killed} | {counts['survived']} "
            f"| {counts['no tests']} | {counts['not checked']} | {score} |"
        )
    if args.survivors:
        for module, by_name in results.items():
            left = sorted(n for n, s in by_name.items() if s in ("survived", "no tests") and n not in equivalent)
            print(f"\n{module}: {len(left)}", *left, sep="\n  ")


if __name__ == "__main__":
    main()
