"""Export a bundle as a self-contained MONAI bundle folder and zip, to share or to serve (MONAI Label).

    python tools/export_bundle.py btcv_seg --out dist/                        # dist/btcv_seg/ and dist/btcv_seg.zip
    python tools/export_bundle.py btcv_seg --out dist/ --weights bundles/btcv_seg/models/model.pt

The export holds the bundle's configs, docs, LICENSE and large_files.yml, and a copy of the
``selfmedmae_components`` package at the bundle root: ``python -m monai.bundle run`` puts the bundle
root on the import path before ``run`` (the configs resolve nothing earlier), so the export runs
where only MONAI and the packages named in its metadata are installed. ``required_packages_version``
is rewritten to those packages (every requirement of selfmedmae_components, at the installed
versions) instead of selfmedmae_components itself. ``--weights`` copies a checkpoint (tensors only,
checked) to ``models/model.pt`` and records its sha256 in large_files.yml. The zip holds the folder
``<name>/``, as the MONAI bundle specification asks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "selfmedmae_components"
VERSION_KEYS = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}  # own metadata keys
BUNDLE_FILES = ("LICENSE", "large_files.yml")
BUNDLE_DIRS = ("configs", "docs")


class ExportError(RuntimeError):
    """The bundle cannot be exported; the message names what is missing or wrong."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_requirements(package: str = PACKAGE) -> dict[str, str]:
    """Distribution name -> installed version for every (non-extra) requirement of ``package``."""
    try:
        requires = importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ExportError(f"{package} is not installed (pip install -e .): its requirements name the packages to list.") from e
    out = {}
    for req in requires:
        if "extra ==" in req.replace('"', " "):
            continue
        name = re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0]
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as e:
            raise ExportError(f"{package} requires {name}, which is not installed here: install it before exporting.") from e
    return out


def exported_metadata(meta: dict) -> dict:
    """The bundle's metadata with ``required_packages_version`` listing what the export needs to run."""
    meta = dict(meta)
    required = {k: v for k, v in meta.get("required_packages_version", {}).items() if _canonical(k) != _canonical(PACKAGE)}
    for name, version in package_requirements().items():
        if _canonical(name) in VERSION_KEYS:
            continue
        existing = next((k for k in required if _canonical(k) == _canonical(name)), name)
        required[existing] = version
    meta["required_packages_version"] = dict(sorted(required.items(), key=lambda kv: kv[0].lower()))
    return meta


def _copy_package(dest: Path) -> None:
    src = REPO / PACKAGE
    shutil.copytree(src, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))


def _check_weights(path: Path) -> None:
    from selfmedmae_components.weights import load_state_dict

    load_state_dict(path)  # tensors only (weights_only=True), a model state dict: else a clear error


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record_weights(bundle: Path, sha256: str) -> None:
    """Set models/model.pt's hash in large_files.yml (the file ships inside the export: no url)."""
    lf_path = bundle / "large_files.yml"
    data = yaml.safe_load(lf_path.read_text()) if lf_path.is_file() else None
    data = data or {"large_files": []}
    entries = [e for e in data.get("large_files", []) if e.get("path") != "models/model.pt"]
    entries.insert(0, {"path": "models/model.pt", "url": "", "hash_val": sha256, "hash_type": "sha256"})
    data["large_files"] = entries
    header = (
        "# Written by tools/export_bundle.py: models/model.pt ships inside this export (no download url);\n"
        "# hash_val is its sha256.\n"
    )
    lf_path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def export_bundle(bundle: str | Path, out: str | Path, weights: str | Path | None = None, name: str | None = None,
                  force: bool = False, make_zip: bool = True) -> Path:
    """Write ``<out>/<name>/`` (and ``<out>/<name>.zip``); returns the bundle folder."""
    src = Path(bundle)
    if not src.is_dir():
        src = REPO / "bundles" / str(bundle)
    if not (src / "configs" / "metadata.json").is_file():
        raise ExportError(f"Not a bundle: {src} has no configs/metadata.json.")
    missing = [f for f in ("LICENSE", "docs/README.md") if not (src / f).is_file()]
    if missing:
        raise ExportError(f"{src} lacks {', '.join(missing)}: a shared bundle needs a licence and a model card.")
    if weights is not None:
        weights = Path(weights)
        _check_weights(weights)
    name = name or src.name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / name
    if dest.exists() and not force:
        raise ExportError(f"{dest} exists: remove it or pass --force.")

    with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}.") as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        for d in BUNDLE_DIRS:
            if (src / d).is_dir():
                shutil.copytree(src / d, stage / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in BUNDLE_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, stage / f)
        _copy_package(stage)
        meta = json.loads((src / "configs" / "metadata.json").read_text())
        (stage / "configs" / "metadata.json").write_text(json.dumps(exported_metadata(meta), indent=4) + "\n")
        if weights is not None:
            (stage / "models").mkdir()
            shutil.copy2(weights, stage / "models" / "model.pt")
            _record_weights(stage, _sha256(stage / "models" / "model.pt"))
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)

    if make_zip:
        archive = out / f"{name}.zip"
        tmp_zip = archive.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(dest.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(out).as_posix())
        tmp_zip.replace(archive)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle name under bundles/ (btcv_seg, brats_seg, cxr14_cls) or a bundle folder")
    parser.add_argument("--out", required=True, help="folder to write <name>/ and <name>.zip into")
    parser.add_argument("--weights", help="checkpoint to include as models/model.pt (tensors only)")
    parser.add_argument("--name", help="name of the exported bundle (default: the bundle's folder name)")
    parser.add_argument("--force", action="store_true", help="replace an existing export of the same name")
    parser.add_argument("--no-zip", action="store_true", help="write the folder only")
    args = parser.parse_args(argv)
    try:
        dest = export_bundle(args.bundle, args.out, args.weights, args.name, args.force, not args.no_zip)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export_bundle: {e}", file=sys.stderr)
        return 1
    print(f"exported {dest}" + ("" if args.no_zip else f" and {dest.parent / (dest.name + '.zip')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
