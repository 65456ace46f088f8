"""tools/export_bundle.py --run: a training run's folder is exported with the network it trained.

A run records its network settings beside its weights (models/finetune_run.json,
selfmedmae_components/run_record.py); the export writes them into the exported configs and metadata and
loads the weights strictly into the exported inference network. The fast tests write the record the way
a run does (the config's own expression) beside random weights of the tiny network; the slow one trains a
tiny run with ``python -m monai.bundle run finetune`` and checks that the export, run on its own, predicts
what the bundle's own inference predicts in the run folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from bundle_runner import REPO, configs, run_bundle
from test_bundle_conformance import CASES, SCHEMA_FILE, bundle, configs_of, data, meta_file, tiny_network  # noqa: F401 (fixtures)
from test_export import isolated

EXPORT = [sys.executable, str(REPO / "tools/export_bundle.py")]


def _record(bundle: str, run: Path, layers: tuple[str, ...] = ("demo",)) -> dict:
    """models/finetune_run.json for the demo preset + tiny overrides, written by the finetune config's own
    ``record_run`` call (evaluated by a ConfigParser, as the bundle runner does)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs_of(bundle, "finetune", *layers))
    parser.read_meta(meta_file(bundle))
    parser.update(dict(CASES[bundle].tiny, bundle_root=str(run)))
    parser["record"] = "$selfmedmae_components.run_record.record_run(@ckpt_dir, 'finetune', @is_main_process)"
    path = parser.get_parsed_content("record")
    assert path == run / "models" / "finetune_run.json"
    return json.loads(path.read_text())


@pytest.fixture
def run(bundle, tmp_path) -> Path:
    """A run folder: random weights of the tiny network, an MAE checkpoint and the run record."""
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": tiny_network(bundle).state_dict()}, run / "models" / "model.pt")
    torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 48)}}, run / "models" / "mae_pretrain.pt")
    _record(bundle, run)
    return run


def test_a_run_records_its_network(bundle, tmp_path):
    record = _record(bundle, tmp_path)
    tiny = CASES[bundle].tiny
    assert record["stage"] == "finetune"
    assert record["configs"] is None or Path(record["configs"]).name == "configs"
    assert record["network"]["hidden_size"] == tiny["hidden_size"]
    assert record["network"]["_target_"].startswith("selfmedmae_components.networks.")
    for key, value in tiny.items():
        assert record["settings"][key] == value, key


def test_export_of_a_run_builds_the_trained_network(bundle, run, tmp_path):
    from monai.bundle import ConfigParser, verify_metadata

    proc = subprocess.run(
        [*EXPORT, bundle, "--run", str(run), "--out", str(tmp_path / "dist"), "--no-zip"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "dist" / bundle
    # the exported inference config alone (as MONAI Label reads it) builds the tiny network, and the weights fit it
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.yaml"))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(run / "models" / "model.pt", weights_only=True)["model"], strict=True)
    # so does the exported fine-tuning config (further training, e.g. by MONAI Label)
    finetune = yaml.safe_load((root / "configs" / "finetune.yaml").read_text())
    for key, value in CASES[bundle].tiny.items():
        if key in finetune and key != "num_workers":
            assert finetune[key] == value, key
    assert (root / "models" / "mae_pretrain.pt").is_file()
    listed = {e["path"] for e in yaml.safe_load((root / "large_files.yml").read_text())["large_files"]}
    assert {"models/model.pt", "models/mae_pretrain.pt"} <= listed
    # the metadata describes the exported network, not the paper's
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), **SCHEMA_FILE)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert "ViT-B/16" not in meta["description"] and "width 48" in meta["description"]
    size = CASES[bundle].input_shape[2:]
    assert tuple(meta["network_data_format"]["inputs"]["image"]["spatial_shape"]) == tuple(size)


def test_a_computed_preprocessing_setting_travels_too(tmp_path):
    """cxr14_cls under paper.yaml normalises with the original's mean/std, an expression (`$[0.5] * @in_channels`):
    the record holds its value and the export writes it into the inference config."""
    run = tmp_path / "run"
    record = _record("cxr14_cls", run, ("demo", "paper"))
    assert record["settings"]["pixel_mean"] == [0.5, 0.5, 0.5] and record["settings"]["pixel_std"] == [0.225] * 3
    torch.manual_seed(0)
    torch.save({"model": tiny_network("cxr14_cls").state_dict()}, run / "models" / "model.pt")
    proc = subprocess.run(
        [*EXPORT, "cxr14_cls", "--run", str(run), "--out", str(tmp_path / "dist"), "--no-zip"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    inference = yaml.safe_load((tmp_path / "dist" / "cxr14_cls" / "configs" / "inference.yaml").read_text())
    assert inference["pixel_mean"] == [0.5, 0.5, 0.5] and inference["pixel_std"] == [0.225] * 3


def test_export_refuses_weights_that_do_not_fit(bundle, run, tmp_path):
    # the run's weights with the bundle's default (paper) configs: a ViT-B, where MONAI Label would serve
    # the misfit layers random
    proc = subprocess.run(
        [*EXPORT, bundle, "--weights", str(run / "models" / "model.pt"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "does not fit the network" in proc.stderr and "--run" in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / bundle).exists()
    # a folder without a run record is named as such
    (run / "models" / "finetune_run.json").unlink()
    proc = subprocess.run(
        [*EXPORT, bundle, "--run", str(run), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "finetune_run.json" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_export_of_a_trained_run_predicts_as_the_run(bundle, data, tmp_path):
    """Train a tiny run (1 epoch), export it with --run alone, and run the export's inference config by
    itself (no preset, no overrides) from an empty folder: the same predictions as the bundle's own
    inference config with the run's settings in the run folder."""
    dataset_dir, inputs = data
    run = tmp_path / "run"
    tiny = dict(CASES[bundle].tiny)
    run_bundle(
        "finetune",
        configs(bundle, "finetune", "demo"),
        dataset_dir=dataset_dir,
        bundle_root=run,
        init_mode="scratch",
        max_epochs=1,
        validation_mode="none",
        **{k: json.dumps(v) for k, v in tiny.items()},
    )
    proc = subprocess.run(
        [*EXPORT, "--run", str(run), "--out", str(tmp_path / "dist"), "--no-zip"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "dist" / bundle
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exported = isolated(
        root,
        [
            "run",
            "inference",
            "--config_file",
            str(root / "configs/inference.yaml"),
            "--input_dir",
            str(inputs),
            "--num_workers",
            "0",
        ],
        elsewhere,
    )
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-6000:]
    own = run / "own"
    overrides = {
        "input_dir": inputs,
        "output_dir": own,
        "bundle_root": run,
        **{k: json.dumps(v) for k, v in tiny.items()},
    }
    if not CASES[bundle].segmentation:
        overrides["output_file"] = own / "predictions.csv"
    run_bundle("inference", configs(bundle, "inference", "demo"), **overrides)
    if CASES[bundle].segmentation:
        for image in sorted(inputs.glob("*.nii*")):
            name = image.name.replace(".nii", "_seg.nii")
            a, b = nib.load(root / "predictions" / name), nib.load(own / name)
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    else:
        assert (root / "predictions" / "predictions.csv").read_text() == (own / "predictions.csv").read_text()


# what monailabel 0.8.5's BundleTrainTask does with configs/train.yaml (tasks/train/bundle.py: __call__ with
# val_split 0 and pretrained false, then run_single_gpu), in a subprocess: argv = bundle folder, datalist JSON
MONAILABEL_TRAIN = r"""
import json, sys, torch, monai.bundle
from monai.bundle import ConfigParser
bundle, data = sys.argv[1], json.loads(open(sys.argv[2]).read())
config = ConfigParser()
config.read_config(f"{bundle}/configs/train.yaml")
config.config.update({"bundle_root": bundle})
overrides = {"bundle_root": bundle, "train#trainer#max_epochs": 1, "train#dataset#data": data, "device": torch.device("cpu"),
             "train#handlers": config.get("train#handlers", []), "validate#dataset#data": [],
             "init_mode": "scratch", "num_workers": 0}  # (not MONAI Label's: random weights here, a quick run)
sys.path.insert(0, bundle)
monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=f"{bundle}/configs/metadata.json",
                 config_file=f"{bundle}/configs/train.yaml", **overrides)
"""


def test_exported_train_config_runs_as_monailabel_runs_it(bundle, run, data, tmp_path):
    """Segmentation bundles export configs/train.yaml for MONAI Label's bundle trainer: given the ids it sets
    (datastore images and labels, max epochs, device, handlers), it trains and publishes models/model.pt."""
    proc = subprocess.run(
        [*EXPORT, bundle, "--run", str(run), "--out", str(tmp_path / "dist"), "--no-zip"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "dist" / bundle
    if not CASES[bundle].segmentation:
        assert not (root / "configs" / "train.yaml").exists()  # MONAI Label trains bundles on label maps
        return
    dataset_dir, _ = data
    cases = json.loads((dataset_dir / "datalist.json").read_text())["training"][:2]
    datalist = tmp_path / "datastore.json"
    datalist.write_text(json.dumps([{k: str(dataset_dir / c[k]) for k in ("image", "label")} for c in cases]))
    before = (root / "models" / "model.pt").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", MONAILABEL_TRAIN, str(root), str(datalist)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (root / "models" / "model.pt").read_bytes() != before
    net = tiny_network(bundle)
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True)["model"], strict=True)
