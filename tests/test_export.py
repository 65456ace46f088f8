"""tools/export_bundle.py: a self-contained bundle that runs without this repository.

The export is unzipped into an empty folder and its inference config is run by MONAI's bundle runner
from another empty folder, in a Python where this repository's selfmedmae_components cannot be
imported (an import hook refuses every copy but the export's, whatever way the package is installed).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from bundle_runner import REPO
from test_bundle_conformance import CASES, SCHEMA_FILE, bundle, checkpoint, data  # noqa: F401 (fixtures)

# Runs argv[2:] as `python -m monai.bundle ...` with selfmedmae_components importable only from argv[1]
# (the export); prints where it was imported from.
ISOLATED_RUNNER = r"""
import atexit, importlib.abc, importlib.machinery, runpy, sys
allowed = sys.argv[1]

class OnlyFromExport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "selfmedmae_components":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # sys.path only, no other finder
        if spec is not None and not str(spec.origin).startswith(allowed):
            raise ModuleNotFoundError(f"{name!r} found outside the export, at {spec.origin}")
        if spec is None and "." not in name:
            raise ModuleNotFoundError(f"No module named {name!r} inside the export")
        return spec

sys.meta_path.insert(0, OnlyFromExport())
atexit.register(lambda: print("SELFMEDMAE_COMPONENTS_FROM", getattr(sys.modules.get("selfmedmae_components"), "__file__", None)))
sys.argv = ["monai.bundle"] + sys.argv[2:]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def isolated(export_root: Path, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", ISOLATED_RUNNER, str(export_root), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_settings(bundle: str) -> list[str]:
    """``--set`` arguments giving the exported configs the demo preset + tiny network of the test weights
    (the export loads the weights strictly into the exported inference network)."""
    inference = yaml.safe_load((REPO / "bundles" / bundle / "configs/inference.yaml").read_text())
    values = {**yaml.safe_load((REPO / "bundles" / bundle / "configs/demo.yaml").read_text()), **CASES[bundle].tiny}
    return [a for k, v in values.items() if k in inference for a in ("--set", f"{k}={json.dumps(v)}")]


def export(bundle: str, out: Path, weights: Path) -> Path:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/export_bundle.py"),
            bundle,
            "--out",
            str(out),
            "--weights",
            str(weights),
            *tiny_settings(bundle),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out / f"{bundle}.zip"


def test_export_runs_inference_from_an_empty_folder(bundle, data, checkpoint, tmp_path):
    case = CASES[bundle]
    _, inputs = data
    archive = export(bundle, tmp_path / "dist", checkpoint)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(archive) as zf:
        assert all(n.startswith(f"{bundle}/") for n in zf.namelist())  # the zip holds the folder <name>/
        zf.extractall(unpacked)
    root = unpacked / bundle
    # the multi-GPU overlays, written once for all bundles in the repository, travel in each export's configs/
    for overlay in ("multi_gpu_pretrain.yaml", "multi_gpu_finetune.yaml"):
        assert (root / "configs" / overlay).read_text() == (REPO / "bundles" / "common" / overlay).read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # the repository's package cannot be imported there...
    blocked = subprocess.run(
        [sys.executable, "-c", ISOLATED_RUNNER.split("sys.argv = ")[0] + "import selfmedmae_components", str(root)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert blocked.returncode != 0 and "inside the export" in blocked.stderr, blocked.stderr

    # ... and the export's inference config runs: bundle root, weights (models/model.pt) and code from the export
    configs = [str(root / "configs/inference.yaml"), str(root / "configs/demo.yaml")]
    args = ["run", "inference", "--config_file", repr(configs), "--input_dir", str(inputs)]
    for key, value in case.tiny.items():
        args += [f"--{key}", json.dumps(value)]
    proc = isolated(root, args, elsewhere)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"SELFMEDMAE_COMPONENTS_FROM {root / 'selfmedmae_components' / '__init__.py'}" in proc.stdout

    if case.segmentation:
        for image in sorted(inputs.glob("*.nii*")):
            pred = root / "predictions" / image.name.replace(".nii", "_seg.nii")
            assert pred.is_file(), f"no prediction for {image.name}: {sorted((root / 'predictions').glob('*'))}"
            img, seg = nib.load(image), nib.load(pred)
            assert seg.shape == img.shape[:3]
            np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
            # MONAI Label names the label values by the first output's channel_def: the map must use its keys
            first_output = next(
                iter(
                    json.loads((root / "configs/metadata.json").read_text())["network_data_format"]["outputs"].values()
                )
            )
            values = set(np.unique(np.asarray(seg.dataobj)).astype(int).tolist())
            assert values <= {int(k) for k in first_output["channel_def"]}, (values, first_output["channel_def"])
    else:
        rows = (root / "predictions" / "predictions.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + len(list(inputs.iterdir()))
    assert not list(elsewhere.iterdir()), "the run wrote into the working directory"


def test_exported_metadata_lists_every_package_the_code_imports(bundle, checkpoint, tmp_path):
    from monai.bundle import verify_metadata

    export(bundle, tmp_path, checkpoint)
    root = tmp_path / bundle
    meta_path = root / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_path), **SCHEMA_FILE)
    meta = json.loads(meta_path.read_text())
    required = {k.lower().replace("_", "-") for k in meta["required_packages_version"]}
    assert "selfmedmae-components" not in required  # it travels inside the bundle

    # every third-party module the exported code imports at module level comes from a listed package
    dists = importlib.metadata.packages_distributions()
    own = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}
    for py in (root / "selfmedmae_components").rglob("*.py"):
        for node in ast.parse(py.read_text()).body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            )
            for top in {n.split(".")[0] for n in names}:
                if top in sys.stdlib_module_names or top in ("selfmedmae_components", "__future__"):
                    continue
                if top in own:
                    assert own[top] in meta
                    continue
                providers = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                assert providers & required, f"{py.relative_to(root)} imports {top}, not in required_packages_version"

    # the included weights are listed with their hash
    entry = yaml.safe_load((root / "large_files.yml").read_text())["large_files"][0]
    assert entry["path"] == "models/model.pt" and len(entry["hash_val"]) == 64
    from monai.apps.utils import check_hash

    assert check_hash(str(root / "models/model.pt"), entry["hash_val"], "sha256")


def test_export_refuses_an_unsafe_checkpoint(tmp_path):
    import argparse

    import torch

    bad = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, bad)  # needs unpickling
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/export_bundle.py"),
            "btcv_seg",
            "--out",
            str(tmp_path / "o"),
            "--weights",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Refusing to load" in proc.stderr
    assert not (tmp_path / "o" / "btcv_seg").exists()
