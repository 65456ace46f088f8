"""Export a bundle as a self-contained MONAI bundle folder and zip, to share or to serve (MONAI Label).

    python tools/export_bundle.py btcv_seg --out dist/                        # dist/btcv_seg/ and dist/btcv_seg.zip
    python tools/export_bundle.py btcv_seg --out dist/ --weights bundles/btcv_seg/models/model.pt
    python tools/export_bundle.py --run demo_runs/btcv_seg --out dist/        # the weights of a training run

``--run`` takes the folder a training run wrote into (its ``bundle_root``): the fine-tuned weights
``models/model.pt``, the MAE pre-trained weights ``models/mae_pretrain.pt`` (shipped too, for further
fine-tuning, e.g. by MONAI Label) and the run record ``models/finetune_run.json``
(selfmedmae_components/run_record.py) with the network settings the run used. Those settings (and any
``--set key=value``) are written into the exported configs, so that they build that network; the
metadata describes it; and the weights must load into the exported inference network *strictly* (MONAI
Label loads non-strictly and would otherwise serve random layers in silence), else the export fails.

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
SHARED_CONFIGS = REPO / "bundles" / "common"  # the configs every bundle layers (multi_gpu_*.yaml), written once


class ExportError(RuntimeError):
    """The bundle cannot be exported; the message names what is missing or wrong."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def package_requirements(package: str = PACKAGE) -> dict[str, str]:
    """Distribution name -> installed version for every (non-extra) requirement of ``package``."""
    try:
        requires = importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ExportError(
            f"{package} is not installed (pip install -e .): its requirements name the packages to list."
        ) from e
    out = {}
    for req in requires:
        if "extra ==" in req.replace('"', " "):
            continue
        name = re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0]
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError as e:
            raise ExportError(
                f"{package} requires {name}, which is not installed here: install it before exporting."
            ) from e
    return out


def exported_metadata(meta: dict) -> dict:
    """The bundle's metadata with ``required_packages_version`` listing what the export needs to run."""
    meta = dict(meta)
    required = {
        k: v for k, v in meta.get("required_packages_version", {}).items() if _canonical(k) != _canonical(PACKAGE)
    }
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


def _record_weights(bundle: Path, hashes: dict[str, str]) -> None:
    """Set the hashes of the shipped models/*.pt in large_files.yml (they ship inside the export: no url);
    models/model.pt first."""
    lf_path = bundle / "large_files.yml"
    data = yaml.safe_load(lf_path.read_text()) if lf_path.is_file() else None
    data = data or {"large_files": []}
    paths = [f"models/{n}" for n in sorted(hashes, key=lambda n: n != "model.pt")]
    entries = [e for e in data.get("large_files", []) if e.get("path") not in paths]
    data["large_files"] = [
        {"path": p, "url": "", "hash_val": hashes[p[len("models/") :]], "hash_type": "sha256"} for p in paths
    ] + entries
    header = (
        "# Written by tools/export_bundle.py: the models/*.pt listed with an empty url ship inside this export;\n"
        "# hash_val is their sha256.\n"
    )
    lf_path.write_text(header + yaml.safe_dump(data, sort_keys=False))


# ---- the network a run trained: its settings into the exported configs, checked by a strict load

NOT_NETWORK_ARGS = ("drop_path_rate", "activation_checkpointing")  # training-only: inference sets its own
REF = re.compile(r"@([A-Za-z_][\w]*)")  # a whole value that is one reference: `img_size: '@roi_size'`


def network_ids(config: dict, roots: tuple[str, ...] = ("network_def", "preprocessing")) -> set[str]:
    """The top-level ids that ``roots`` read, directly or through other top-level ids."""
    from selfmedmae_components.run_record import top_level_refs

    seen: set[str] = set()
    todo = set().union(*(top_level_refs(config.get(r)) for r in roots))
    while todo:
        key = todo.pop()
        if key in seen or key not in config:
            continue
        seen.add(key)
        todo |= top_level_refs(config[key])
    return seen


def run_settings(inference: dict, record: dict) -> dict:
    """The values of the inference config's network and preprocessing ids under a run record: each
    ``network_def`` argument that is a plain ``@id`` takes the run's network argument, any other id the
    network or preprocessing reads takes the run's top-level setting where the run had one."""
    out = {}
    net = inference.get("network_def", {})
    for arg, raw in net.items():
        m = REF.fullmatch(raw) if isinstance(raw, str) else None
        if m and arg in record["network"] and arg not in NOT_NETWORK_ARGS:
            out[m.group(1)] = record["network"][arg]
    for key in sorted(network_ids(inference)):
        if key not in out and key in record["settings"]:
            out[key] = record["settings"][key]
    return out


def _set_top_level(text: str, key: str, value, note: str) -> str:
    """``text`` (a YAML config) with the top-level ``key`` set to ``value`` (a flow-style line), or appended."""
    line = f"{key}: {json.dumps(value)}   # {note}\n"
    pattern = re.compile(rf"^{re.escape(key)}:[^\n]*\n(?:[ \t]+[^\n]*\n)*", re.M)  # the line and its indented block
    if pattern.search(text):
        return pattern.sub(lambda _: line, text, count=1)
    return text.rstrip("\n") + "\n" + line


def apply_settings(configs: Path, settings: dict, note: str) -> list[str]:
    """Write ``settings`` into the exported configs: inference.yaml gets all of them (appended where it lacks
    one), every other YAML config those it already defines. Returns the files changed."""
    changed = []
    for cfg in sorted(configs.glob("*.yaml")):
        text = cfg.read_text()
        top = yaml.safe_load(text) or {}
        keys = [k for k in settings if (cfg.name == "inference.yaml" or k in top) and top.get(k) != settings[k]]
        if cfg.name == "demo.yaml" or not keys:  # the demo preset stays the demo preset
            continue
        for k in keys:
            text = _set_top_level(text, k, settings[k], note)
        loaded = yaml.safe_load(text)
        bad = [k for k in keys if loaded.get(k) != settings[k]]
        if bad:
            raise ExportError(f"Could not write {bad} into {cfg.name}.")
        cfg.write_text(text)
        changed.append(cfg.name)
    return changed


def _phrase(settings: dict) -> dict:
    return {
        k: settings[k]
        for k in ("hidden_size", "num_layers", "num_heads", "patch_size", "roi_size", "img_size", "pixdim")
        if k in settings
    }


def describe(meta: dict, defaults: dict, settings: dict, source: str) -> dict:
    """Metadata that describes the exported network: input shape from its crop size, and a description
    that no longer claims the paper's ViT-B/16 when the weights are another network."""
    meta = json.loads(json.dumps(meta))
    changed = {k: v for k, v in settings.items() if defaults.get(k) != v}
    if not changed:
        return meta
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    size = settings.get("roi_size", settings.get("img_size"))
    if size is not None and "spatial_shape" in image:
        image["spatial_shape"] = list(size) if isinstance(size, list) else [size] * len(image["spatial_shape"])
    d = {**defaults, **settings}
    vit = (
        f"ViT (width {d.get('hidden_size')}, {d.get('num_layers')} blocks, {d.get('num_heads')} heads, "
        f"patch {d.get('patch_size', 16)})"
    )
    text = meta.get("description", "").replace("ViT-B/16", vit)
    if isinstance(size, list) and len(set(size)) == 1:
        text = re.sub(r"\b\d+\^3\b", f"{size[0]}^3", text)
    elif isinstance(size, list):
        text = re.sub(r"\b\d+\^3\b", "x".join(map(str, size)), text)
    elif size is not None:
        text = re.sub(r"\b\d+x\d+\b", f"{size}x{size}", text)
    listed = ", ".join(f"{k} {json.dumps(v)}" for k, v in changed.items())
    meta["description"] = (
        f"{text} These weights come from {source}, whose settings differ from the paper's "
        f"(the bundle's defaults): {listed}."
    )
    return meta


def name_classes(meta: dict, record: dict) -> dict:
    """Metadata whose output ``channel_def`` names the run's classes, where its datalist holds them (msd_seg, scans:
    ``properties.labels`` from dataset.json or the Slicer segments). MONAI Label shows these names, and writes them
    into the DICOM SEG it stores; the bundle's own metadata can only say "label 1 of dataset.json"."""
    datalist = Path(str(record["settings"].get("datalist_file", "")))
    try:
        labels = json.loads(datalist.read_text()).get("properties", {}).get("labels")
    except (OSError, ValueError):
        labels = None  # moved or deleted since training: the bundle's generic names stay
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    if not labels or pred.get("type") != "image" or len(labels) != record["settings"].get("out_channels"):
        return meta
    meta = json.loads(json.dumps(meta))
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {str(k): v for k, v in labels.items()}
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = len(labels)
    return meta


def check_strict(bundle: Path, weights: Path, shown: Path | None = None) -> None:
    """Build the exported inference ``network_def`` and load ``weights`` into it strictly (``shown``: the
    name of the weights in the error)."""
    from monai.bundle import ConfigParser

    from selfmedmae_components.weights import load_state_dict

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    state = load_state_dict(weights)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"{shown or weights} does not fit the network the exported configs/inference.yaml builds (MONAI Label would load it "
            f"non-strictly and serve the misfit layers random). Export the run folder with --run (its recorded "
            f"settings), or give the settings with --set key=value. PyTorch says: {str(e)[:1500]}"
        ) from e


# ---- MONAI Label's training: configs/train.yaml for the stock monaibundle app's BundleTrainTask

# MONAI Label (monailabel 0.8.5, tasks/train/bundle.py) runs `run` of configs/train.yaml (one file, no
# layering) and overrides bundle_root, device, train#trainer#max_epochs, train#dataset#data (the
# datastore's labelled images), validate#dataset#data (a split of them) and train#handlers (a
# CheckpointLoader of models/model.pt is put first when the request says pretrained=true). The layer below
# makes finetune.yaml read those ids: the datalist file is the default of train#dataset#data instead of
# train#data's, max_epochs follows the trainer's, the warm-up fits a few epochs, and the last weights are
# published as models/model.pt (no holdout selection: the labelled images are few), which MONAI Label's
# next /infer loads. init_mode stays `mae`: the encoder starts from models/mae_pretrain.pt (the run's MAE
# weights, shipped by --run) unless the request continues from model.pt (pretrained=true).
MONAILABEL_TRAIN = {
    "train#data": "@train#dataset#data",
    "validate#data": "@validate#dataset#data",
    "train#trainer#max_epochs": 50,
    "max_epochs": "@train#trainer#max_epochs",
    "warmup_epochs": "$max(1, @max_epochs // 10)",
    "validation_mode": "none",
}


def write_monailabel_train(configs: Path) -> Path:
    """configs/train.yaml: finetune.yaml with the ids MONAI Label's bundle trainer sets (one merged file)."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_file(str(configs / "finetune.yaml"))
    header = (
        "# MONAI Label's training config (written by tools/export_bundle.py): finetune.yaml with the ids the\n"
        "# monaibundle app's BundleTrainTask sets (train#dataset#data, train#trainer#max_epochs, ...).\n"
        "# Outside MONAI Label it runs as finetune.yaml does (--dataset_dir ...), keeping the last weights.\n"
    )
    parser = ConfigParser(config)
    layer = dict(MONAILABEL_TRAIN)
    layer["train#dataset#data"] = parser["train"]["data"]
    layer["validate#dataset#data"] = parser["validate"]["data"]
    for key, value in layer.items():
        parser[key] = value
    out = {k: v for k, v in parser.get().items() if k != "_meta_"}
    path = configs / "train.yaml"
    path.write_text(header + yaml.safe_dump(out, sort_keys=False, width=120))
    return path


def bundle_of_run(run: Path) -> str:
    """The bundle a run folder was trained with (the record's config folder), for ``--run`` without a bundle."""
    from selfmedmae_components.run_record import read_record, record_path

    configs = read_record(record_path(run / "models", "finetune")).get("configs")
    if not configs:
        raise ExportError(f"The run record in {run / 'models'} does not name its bundle: give the bundle name too.")
    return str(Path(configs).parent)


def export_bundle(
    bundle: str | Path | None,
    out: str | Path,
    weights: str | Path | None = None,
    name: str | None = None,
    force: bool = False,
    make_zip: bool = True,
    run: str | Path | None = None,
    settings: dict | None = None,
) -> Path:
    """Write ``<out>/<name>/`` (and ``<out>/<name>.zip``); returns the bundle folder.

    ``run``: a training run's folder (its models/model.pt, models/mae_pretrain.pt and models/finetune_run.json);
    ``settings``: top-level ids to set in the exported configs (after the run's). With weights, the export
    fails unless they load strictly into the exported inference network."""
    from selfmedmae_components.run_record import read_record, record_path

    record, extra = None, []
    if run is not None:
        run = Path(run)
        if not run.is_dir():
            raise ExportError(f"--run {run}: no such folder (the bundle_root of a training run).")
        try:
            record = read_record(record_path(run / "models", "finetune"))
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(
                f"--run {run}: {e} A run made before run records existed: give its settings with --set "
                "key=value (those of configs/demo.yaml for the README demo) or run fine-tuning again."
            ) from e
        weights = weights or run / "models" / "model.pt"
        if (run / "models" / "mae_pretrain.pt").is_file():
            extra.append(run / "models" / "mae_pretrain.pt")
        bundle = bundle or bundle_of_run(run)
    if bundle is None:
        raise ExportError("Name the bundle (btcv_seg, brats_seg, cxr14_cls or a folder), or give --run.")
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
        for shared in sorted(SHARED_CONFIGS.glob("*.yaml")):  # a shared bundle carries them in its own configs/
            shutil.copy2(shared, stage / "configs" / shared.name)
        _copy_package(stage)
        meta = exported_metadata(json.loads((src / "configs" / "metadata.json").read_text()))
        inference = yaml.safe_load((src / "configs" / "inference.yaml").read_text())
        chosen = run_settings(inference, record) if record is not None else {}
        chosen.update(settings or {})
        if chosen:
            source = f"the training run {run}" if run is not None else "settings given at export"
            apply_settings(stage / "configs", chosen, f"set by tools/export_bundle.py: {source}")
            meta = describe(meta, {k: inference.get(k) for k in chosen}, chosen, source)
        if record is not None:
            meta = name_classes(meta, record)
        (stage / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        if (stage / "configs" / "finetune.yaml").is_file() and any(o.get("type") == "image" for o in outputs.values()):
            write_monailabel_train(stage / "configs")  # segmentation: MONAI Label trains on its saved label maps
        if weights is not None:
            (stage / "models").mkdir()
            shutil.copy2(weights, stage / "models" / "model.pt")
            check_strict(stage, stage / "models" / "model.pt", weights)
            for path in extra:
                _check_weights(path)
                shutil.copy2(path, stage / "models" / path.name)
            _record_weights(stage, {p.name: _sha256(p) for p in sorted((stage / "models").glob("*.pt"))})
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
    from selfmedmae_components import errors

    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "bundle",
        nargs="?",
        help="bundle name under bundles/ (btcv_seg, brats_seg, cxr14_cls) or a bundle "
        "folder; optional with --run (the run record names it)",
    )
    parser.add_argument(
        "--run", help="a training run's folder (its bundle_root): its weights, MAE weights and recorded settings"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a top-level id in the exported configs (VALUE as JSON, e.g. --set hidden_size=96)",
    )
    parser.add_argument("--out", required=True, help="folder to write <name>/ and <name>.zip into")
    parser.add_argument("--weights", help="checkpoint to include as models/model.pt (tensors only)")
    parser.add_argument("--name", help="name of the exported bundle (default: the bundle's folder name)")
    parser.add_argument("--force", action="store_true", help="replace an existing export of the same name")
    parser.add_argument("--no-zip", action="store_true", help="write the folder only")
    args = parser.parse_args(argv)
    try:
        settings = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ExportError(f"--set {item!r}: expected KEY=VALUE")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        dest = export_bundle(
            args.bundle, args.out, args.weights, args.name, args.force, not args.no_zip, args.run, settings
        )
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"export_bundle: {e}", file=sys.stderr)
        return 1
    print(f"exported {dest}" + ("" if args.no_zip else f" and {dest.parent / (dest.name + '.zip')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
