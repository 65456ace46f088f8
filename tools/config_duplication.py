#!/usr/bin/env python
"""How much of the bundle configs repeats another config file, and in which blocks.

A line counts as duplicated when a window of 4 consecutive lines holding it (comments and blank lines dropped,
indentation kept) also occurs in another config file. Prints the total, then the duplicated lines per config block
(top-level settings, transforms, the train/validate skeleton, ...), each with the test that holds its copies together.

    python tools/config_duplication.py            # the bundle configs of this checkout
    python tools/config_duplication.py --root /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

WINDOW = 4
TRANSFORM_KEYS = {"preprocessing", "augmentation", "crops", "crop_centres", "label_crop_centres", "transforms"}
SKELETON_KEYS = {"handlers", "trainer", "state", "seeder", "checkpoint_saver", "lr_scheduler", "iteration",
                 "dataloader", "dataset", "evaluator", "handler", "inferer", "key_metric", "postprocessing"}  # fmt: skip
GUARD = {
    "train/validate skeleton": "tests/test_skeleton_drift.py",
    "transforms": "tests/test_stage_drift.py",
    "top-level settings": "tests/test_config_consistency.py",
}


def config_files(root: Path) -> list[Path]:
    """The bundle configs: every YAML under bundles/, and the JSON configs but metadata.json (the model zoo's card)."""
    files = list(root.glob("bundles/**/*.yaml")) + list(root.glob("bundles/**/configs/*.json"))
    return sorted(f for f in files if f.name != "metadata.json")


def config_lines(path: Path) -> list[str]:
    """The lines that count: comments (whole-line or after " #") and blank lines dropped, indentation kept."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = "" if line.lstrip().startswith("#") else line.split(" #")[0].rstrip()
        if text.strip():
            out.append(text)
    return out


def duplicated(lines: dict[str, list[str]]) -> dict[str, list[bool]]:
    """For each file, which of its lines sit in a window that another file also has."""
    where = collections.defaultdict(set)
    for name, ls in lines.items():
        for i in range(len(ls) - WINDOW + 1):
            where[tuple(ls[i : i + WINDOW])].add(name)
    marks = {}
    for name, ls in lines.items():
        mark = [False] * len(ls)
        for i in range(len(ls) - WINDOW + 1):
            if len(where[tuple(ls[i : i + WINDOW])]) > 1:
                mark[i : i + WINDOW] = [True] * WINDOW
        marks[name] = mark
    return marks


def block_of(line: str, top: str, sub: str | None) -> str:
    """The config block a line belongs to, from its top-level key and (under train/validate) its second-level key."""
    if not line.startswith(" ") and ":" in line and line.split(":", 1)[1].strip():
        return "top-level settings"
    if top in TRANSFORM_KEYS or sub in TRANSFORM_KEYS:
        return "transforms"
    if top in ("train", "validate") and sub in SKELETON_KEYS:
        return "train/validate skeleton"
    return f"{top}#{sub}" if top in ("train", "validate") and sub else top


def report(root: Path) -> tuple[int, int, int, collections.Counter, collections.Counter]:
    """(files, lines, duplicated lines, duplicated lines per block, lines per block) of root's bundle configs."""
    lines = {str(f.relative_to(root)): config_lines(f) for f in config_files(root)}
    marks = duplicated(lines)
    dup, total = collections.Counter(), collections.Counter()
    for name, ls in lines.items():
        top, sub = "", None
        for line, is_dup in zip(ls, marks[name]):
            if not line.startswith(" "):
                top, sub = line.split(":")[0], None
            elif top in ("train", "validate") and line.startswith("  ") and not line.startswith("   "):
                sub = None if line.strip().startswith("-") else line.strip().split(":")[0]
            block = block_of(line, top, sub)
            total[block] += 1
            dup[block] += is_dup
    return len(lines), sum(total.values()), sum(dup.values()), dup, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    n_files, lines, dup, per_block, totals = report(args.root)
    print(f"{n_files} config files, {lines} lines, {dup} in {WINDOW}-line windows found in another file "
          f"({100 * dup / max(lines, 1):.0f}%); {lines - dup} lines occur in no other file")  # fmt: skip
    for block, n in per_block.most_common():
        if n:
            print(f"  {block:26s} {n:5d} of {totals[block]:5d}  {GUARD.get(block, '')}")


if __name__ == "__main__":
    main()
