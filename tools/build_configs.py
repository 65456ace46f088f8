"""Write each bundle's configs from the layers they are made of.

    python tools/build_configs.py           # writes bundles/<bundle>/configs/<stage>.yaml, demo.yaml, ...
    python tools/build_configs.py --check   # fails, naming the files, when one is not what the layers give

The sources are written once, in bundles/common/: the layers (layers/*.yaml: the run settings every stage has, the
training skeleton, MAE pre-training, the 3-D segmentation and 2-D classification stages, the small demo networks,
the multi-GPU overlay) and one preset per bundle (presets/<bundle>.yaml: its dataset's settings). A preset names
the layers of each file it makes (``layers``) and holds sections of ids applied on top of them: ``all`` (the four
stages), ``training`` (pretrain and finetune) and one per file. A key may be a nested id
(``train#trainer#to_kwargs``) that replaces one entry. presets/common.yaml makes the overlays in bundles/common/.

The merge is MONAI's own (``monai.bundle.utils.merge_kv``, what ``--config_file "[a, b]"`` does); this tool adds
only the order of the keys and the comments, so that each generated file reads like a hand-written one: a new key
follows the key it follows in its layer, and the comments written above or beside an id in the layer that set it
travel with it. A generated file is read back and must give the merged config exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from monai.bundle import ConfigParser
from monai.bundle.utils import merge_kv

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "finetune", "evaluate", "inference")
SECTIONS = {
    "pretrain": ("all", "training", "pretrain"),
    "finetune": ("all", "training", "finetune"),
    "evaluate": ("all", "evaluate"),
    "inference": ("all", "inference"),
}
SEP = "#"
PLACEHOLDER = "__preset__"  # a layer's value for an id that every preset sets
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<dash>- +)?(?P<key>[^\s'\"#:][^:]*?|'[^']*'|\"[^\"]*\"):(?: +(?P<rest>.*))?$")
ITEM_LINE = re.compile(r"^(?P<indent> *)- +(?P<rest>.*)$")


@dataclass
class Comments:
    """The comment lines written above an id, and the one beside it (with its continuation lines)."""

    above: list[str] = field(default_factory=list)
    beside: list[str] = field(default_factory=list)
    column: int = 0
    blank: bool = False  # a blank line before it (top-level ids)


@dataclass
class Layer:
    name: str  # as the GENERATED line names it
    config: dict
    comments: dict[str, Comments]


def split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of a line's text: the comment starts at the first " #" outside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] == " "):
            return text[:i].rstrip(), text[i:]
    return text.rstrip(), ""


def read_comments(path: Path) -> dict[str, Comments]:
    """The comments of a layer, by the id of the key or list item they belong to.

    Reads the block YAML these configs are written in (mappings, lists of mappings or scalars, one-line values).
    """
    found: dict[str, Comments] = {}
    stack: list[tuple[int, str]] = []  # (indent of the children's keys, id) of the open mappings and lists
    counters: dict[str, int] = {}
    pending: list[str] = []
    last: Comments | None = None
    blank = False
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped:
            if not found:  # the file's own description, above its first blank line: no id's comment
                pending = []
            last = None
            blank = True
            continue
        indent = len(raw) - len(raw.lstrip())
        if stripped.startswith("#"):
            if last is not None and last.beside and indent == last.column:
                last.beside.append(stripped)
            else:
                pending.append(stripped)
                last = None
            continue
        value, comment = split_comment(raw)
        key_match = KEY_LINE.match(value)
        item_match = ITEM_LINE.match(value) if not key_match else None
        if not key_match and not item_match:  # the continuation of a multi-line flow value
            continue
        if (key_match and key_match["dash"]) or item_match:  # a list item: "- value" or "- key: value"
            while stack and stack[-1][0] > indent:
                stack.pop()
            parent = stack[-1][1] if stack else ""
            while stack and stack[-1][1] != parent:
                stack.pop()
            index = counters.get(parent, 0)
            counters[parent] = index + 1
            item_id = f"{parent}{SEP}{index}" if parent else str(index)
            ident = item_id
            if key_match:  # the item is a mapping: its keys sit after the dash
                child_indent = indent + len(key_match["dash"])
                stack.append((child_indent, item_id))
                ident = f"{item_id}{SEP}{key_match['key']}"
                found.setdefault(item_id, Comments()).above += pending
                pending = []
                entry = found.setdefault(ident, Comments())
                if not key_match["rest"]:
                    stack.append((child_indent + 1, ident))
            else:
                entry = found.setdefault(ident, Comments())
        else:
            while stack and stack[-1][0] > indent:
                stack.pop()
            parent = stack[-1][1] if stack else ""
            ident = f"{parent}{SEP}{key_match['key']}" if parent else key_match["key"]
            entry = found.setdefault(ident, Comments())
            if not key_match["rest"]:  # a mapping or a list follows, indented further
                stack.append((indent + 1, ident))
                counters.pop(ident, None)
        entry.above += pending
        entry.blank = blank and indent == 0
        pending, blank = [], False
        if comment:
            entry.beside = [comment]
            entry.column = raw.index(comment)
            last = entry
        else:
            last = None
    return found


def read_layer(path: Path, root: Path = REPO) -> Layer:
    if not path.is_file():
        raise ValueError(f"{path.relative_to(root)}: no such layer")
    config = ConfigParser.load_config_file(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path.relative_to(root)}: a layer must be a mapping of ids, got {type(config).__name__}")
    return Layer(path.relative_to(root).as_posix(), config, read_comments(path))


def section(preset: Layer, name: str) -> Layer:
    """One section of a preset as a layer of its own (ids and comments without the section's prefix)."""
    prefix = name + SEP
    comments = {k[len(prefix) :]: v for k, v in preset.comments.items() if k.startswith(prefix)}
    return Layer(f"{preset.name} ({name})", preset.config.get(name) or {}, comments)


def set_ordered(target: dict, path: list[str], value, after: str | None) -> None:
    """Set the entry at `path`; a new key goes right after `after` (its predecessor in the layer) where that is here."""
    *parents, key = path
    node = target
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(key)] = value
        return
    if key in node or after is None or after not in node:
        node[key] = value
        return
    items = list(node.items())
    node.clear()
    for k, v in items:
        node[k] = v
        if k == after:
            node[key] = value


def merge(layers: list[Layer], overlay: bool = False) -> tuple[dict, dict[str, Comments]]:
    """The layers merged in order: MONAI's merge gives the values, this one the order and the comments.

    An overlay (a file users layer on a stage config) keeps its nested ids as keys, for MONAI to apply then.
    """
    parser = {} if overlay else ConfigParser(config={})
    ordered: dict = {}
    comments: dict[str, Comments] = {}
    for layer in layers:
        previous = None
        for key, value in layer.config.items():
            if key.startswith("+"):
                raise ValueError(f"{layer.name}: '{key}': write the whole value (a '+' merge has no place in a layer)")
            try:
                merge_kv(parser, key, copy.deepcopy(value))
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"{layer.name}: '{key}' names an entry the layers below do not have ({error})"
                ) from None
            ident = key.replace("::", SEP)
            if overlay:
                set_ordered(ordered, [ident], copy.deepcopy(value), previous)
            else:
                same_parent = previous is not None and previous.rpartition(SEP)[0] == ident.rpartition(SEP)[0]
                after = previous.rpartition(SEP)[2] if same_parent else None
                set_ordered(ordered, ident.split(SEP), copy.deepcopy(value), after)
            previous = ident
            for old in [k for k in comments if k == ident or k.startswith(ident + SEP)]:
                del comments[old]
            comments.update({k: v for k, v in layer.comments.items() if k == ident or k.startswith(ident + SEP)})
    values = parser if overlay else parser.get()
    if values != ordered:
        raise AssertionError("the ordered merge differs from MONAI's merge_kv (a bug in tools/build_configs.py)")
    return ordered, comments


def scalar(value) -> str:
    """A value as one line of YAML: floats as MONAI's YAML reads them (``1.0e-6``, never ``1e-06``, a string there),
    strings in double quotes where they need quotes and hold a single one."""
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent):+d}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {scalar(v)}" for k, v in value.items()) + "}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    if text.startswith("'") and "''" in text:
        text = json.dumps(value, ensure_ascii=False)
    return text


def one_line(value, ident: str, comments: dict[str, Comments]) -> bool:
    """Whether a value is written on its key's line: scalars, empty containers, and short lists of scalars whose
    items carry no comments."""
    if not isinstance(value, (dict, list)) or not value:
        return True
    if any(isinstance(v, (dict, list)) for v in (value.values() if isinstance(value, dict) else value)):
        return False
    if isinstance(value, dict) and len(value) > 1:
        return False
    prefix = ident + SEP
    return len(scalar(value)) <= 80 and not any(k.startswith(prefix) for k in comments)


def emit(node, ident: str, indent: int, comments: dict[str, Comments], lines: list[str], lead: str = "") -> None:
    """Write `node`'s entries as block YAML; `lead` is the "- " of a list item whose first key shares its line."""
    entries = node.items() if isinstance(node, dict) else enumerate(node)
    pad = " " * indent
    for position, (key, value) in enumerate(entries):
        child = f"{ident}{SEP}{key}" if ident else str(key)
        note = comments.get(child, Comments())
        first = lead if position == 0 else " " * len(lead)
        if indent == 0 and (note.above or note.blank) and lines:
            lines.append("")
        lines += [pad + ("" if position == 0 else first) + text for text in note.above]
        head = f"{pad}{first}{key}:" if isinstance(node, dict) else f"{pad}{first}-"
        if one_line(value, child, comments):
            beside(f"{head} {scalar(value)}", note, lines)
        elif isinstance(node, list) and isinstance(value, dict):  # a mapping item: its first key on the dash's line
            emit(value, child, indent + len(first), comments, lines, lead="- ")
        else:
            beside(head, note, lines)
            emit(value, child, indent + len(first) + 2, comments, lines)


def beside(line: str, note: Comments, lines: list[str]) -> None:
    if not note.beside:
        lines.append(line)
        return
    column = max(note.column, len(line) + 2) if note.column else len(line) + 2
    lines.append(line.ljust(column) + note.beside[0])
    lines += [" " * column + text for text in note.beside[1:]]


def walk(node, prefix: str = ""):
    """(id, value) of every entry, nested ones included."""
    entries = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in entries:
        ident = f"{prefix}{SEP}{key}" if prefix else str(key)
        yield ident, value
        yield from walk(value, ident)


def header(sources: list[str]) -> str:
    return f"# GENERATED by tools/build_configs.py from {', '.join(sources)}: edit those, then run it\n"


def outputs(bundle: str, root: Path = REPO) -> list[str]:
    """The files a preset makes: the keys of its ``layers``."""
    layers = ConfigParser.load_config_file(root / "bundles" / "common" / "presets" / f"{bundle}.yaml").get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"bundles/common/presets/{bundle}.yaml: 'layers' must map each file it makes to its layers")
    return list(layers)


def target(bundle: str, name: str, root: Path = REPO) -> Path:
    """Where a generated file goes: the bundle's configs/, or bundles/common/ for presets/common.yaml."""
    folder = root / "bundles" / "common" if bundle == "common" else root / "bundles" / bundle / "configs"
    return folder / f"{name}.yaml"


LAST = ("run", "initialize", "finalize")


def in_reading_order(config: dict) -> dict:
    """The top-level ids as a hand-written config orders them: imports, the settings (one-line values), the
    components, then what runs (`run`, and the stage's name for it)."""

    def rank(item):
        key, value = item
        if key == "imports":
            return 0
        if key in LAST or value == "@run":
            return 3
        return 1 if not isinstance(value, (dict, list)) or not value or is_scalar_list(value) else 2

    return dict(sorted(config.items(), key=rank))  # stable: the merge's order within each group


def is_scalar_list(value) -> bool:
    return isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value)


def build(bundle: str, stage: str, root: Path = REPO) -> str:
    """The text of one generated config (a stage, or another file the preset makes, such as demo)."""
    common = root / "bundles" / "common"
    preset = read_layer(common / "presets" / f"{bundle}.yaml", root)
    names = preset.config.get("layers", {}).get(stage)
    if names is None or (not names and stage in STAGES):
        raise ValueError(f"{preset.name}: 'layers' names no layers for the {stage} stage")
    layers = [read_layer(common / "layers" / f"{name}.yaml", root) for name in names]
    layers += [section(preset, name) for name in SECTIONS.get(stage, (stage,)) if name in preset.config]
    config, comments = merge(layers, overlay=bundle == "common")
    unset = [ident for ident, value in walk(config) if value == PLACEHOLDER]
    if unset:
        raise ValueError(
            f"{preset.name}: the {stage} stage leaves {', '.join(unset)} at {PLACEHOLDER}: a layer leaves "
            "these to the preset, which must set them"
        )
    config = in_reading_order(config)
    title = preset.comments.get(stage, Comments()).above  # the comment above the stage's section: the file's own
    lines: list[str] = []
    emit(config, "", 0, comments, lines)
    text = header([p.name for p in [*layers[: len(names)], preset]]) + "".join(t + "\n" for t in title)
    text += "\n".join(lines) + "\n"
    if yaml.safe_load(text) != config:
        raise AssertionError(f"{bundle}/{stage}: the written YAML does not read back as the merged config")
    return text


def bundles(root: Path = REPO) -> list[str]:
    return sorted(p.stem for p in (root / "bundles" / "common" / "presets").glob("*.yaml"))


def main(argv: list[str] | None = None, root: Path = REPO) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is not current")
    args = parser.parse_args(argv)
    stale = []
    for bundle in bundles(root):
        try:
            texts = {target(bundle, name, root): build(bundle, name, root) for name in outputs(bundle, root)}
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for path, text in texts.items():
            current = path.read_text(encoding="utf-8") if path.exists() else None
            if current == text:
                continue
            if args.check:
                stale.append(path.relative_to(root).as_posix())
            else:
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path.relative_to(root)}")
    if stale:
        print(
            "error: not what the layers in bundles/common give (edit the layers, then run "
            f"python tools/build_configs.py): {', '.join(stale)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
