"""msd_seg end to end on two generated MSD-format datasets of different kinds, with the same configs and no edit
between them:

    mr: 2-channel MR (T2, ADC), 2 labels, z-score    through the MONAI bundle runner, as a user runs it:
                                                     pretrain -> finetune -> evaluate -> inference; and the
                                                     evaluation of an untrained network, for comparison
    ct: 1-channel CT, 3 labels, HU window            the same four stages, shorter, through monai.bundle.run in
                                                     this process (no interpreter start-up per stage)

Everything dataset-specific (channels, classes, label names, intensity, spacing, ROI) comes from the datalist
that data.msd.prepare_datalist derives; the only overrides are the demo preset and a narrower ViT.
"""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import REPO, config_path, configs, read_losses, run_bundle

from selfmedmae_components.data import msd
from selfmedmae_components.data.demo import msd as demo

BUNDLE = "msd_seg"
TINY = {"hidden_size": 48}
LAYOUTS = {  # generator options, (pretrain, finetune) epochs
    "mr": (dict(layout="mr", num_cases=10, num_test_cases=1, shape=(40, 40, 20)), (8, 20)),
    "ct": (dict(layout="ct", num_cases=6, num_test_cases=1, shape=(36, 36, 24)), (2, 2)),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread per bundle run: far faster than two when other jobs share the CPU, and kinder to them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def run_here(run_id: str, *names: str, **overrides) -> None:
    """``monai.bundle.run`` in this process (the configs as the runner reads them, without its start-up)."""
    from monai.bundle import run

    files = [str(config_path(BUNDLE, n)) for n in names]
    run(run_id, config_file=files, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{layout: (dataset_dir, bundle_root)}: each layout generated, prepared and run through all four stages once."""
    out = {}
    for layout, (options, (pre_epochs, fine_epochs)) in LAYOUTS.items():
        root = tmp_path_factory.mktemp(f"msd_{layout}")
        dataset = Path(demo.make_demo(root / "data", **options))
        msd.prepare_datalist(dataset, eval_fraction=0.25, num_val_cases=1)
        bundle_root = root / "bundle"
        common = dict(dataset_dir=dataset, bundle_root=bundle_root, **TINY)
        # mask ratio 0.5: half the few tokens of the small ROI masked, a less noisy loss than the default's
        stages = [
            ("pretrain", dict(max_epochs=pre_epochs, mask_ratio=0.5)),
            ("finetune", dict(max_epochs=fine_epochs, val_interval=fine_epochs // 2)),
            ("evaluate", {}),
            ("inference", dict(input_dir=dataset / "imagesTs")),
        ]
        for stage, extra in stages:
            if layout == "mr":  # plain `run` (no id) for inference, as MONAI tools call a bundle
                run_bundle(None if stage == "inference" else stage, configs(BUNDLE, stage, "demo"), **common, **extra)
            else:
                run_here(stage, stage, "demo", **common, **extra)
        out[layout] = (dataset, bundle_root)
    return out


@pytest.fixture(scope="module")
def untrained_mr(runs) -> dict:
    """The evaluation summary of the MR layout's UNETR with random weights (the same configs and seed)."""
    from monai.bundle import ConfigParser

    dataset, bundle_root = runs["mr"]
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / BUNDLE / "configs" / f"{n}.yaml") for n in ("evaluate", "demo")])
    parser.update({"dataset_dir": str(dataset), "device": "$torch.device('cpu')", **TINY})
    torch.manual_seed(0)
    checkpoint = bundle_root / "untrained.pt"
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, checkpoint)
    out_dir = bundle_root / "eval_untrained"
    run_here(
        "evaluate",
        "evaluate",
        "demo",
        dataset_dir=dataset,
        bundle_root=bundle_root,
        checkpoint=checkpoint,
        output_dir=out_dir,
        **TINY,
    )
    return json.loads((out_dir / "summary.json").read_text())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_network_is_built_from_the_datalist(runs, layout):
    dataset, bundle_root = runs[layout]
    props = msd.dataset_properties(dataset / "datalist.json")
    expected = {"mr": (2, 3, "zscore"), "ct": (1, 4, "window")}[layout]
    assert (props["channels"], props["out_channels"], props["normalization"]) == expected
    network = json.loads((bundle_root / "models" / "finetune_run.json").read_text())["network"]
    assert (network["in_channels"], network["out_channels"]) == expected[:2]
    assert network["img_size"] == props["roi_size"] and all(v % 16 == 0 for v in props["roi_size"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pretrain_loss_falls(runs, layout):
    _, bundle_root = runs[layout]
    assert (bundle_root / "models" / "mae_pretrain.pt").is_file()
    losses = read_losses(bundle_root / "logs" / "pretrain" / "loss.csv")
    assert len(losses) == LAYOUTS[layout][1][0] and losses[-1] < losses[0], losses
    assert (bundle_root / "logs" / "pretrain" / "reconstruction_latest.png").is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_evaluation_names_the_datasets_labels(runs, layout):
    dataset, bundle_root = runs[layout]
    names = list(demo.LAYOUTS[layout]["labels"].values())[1:]
    with open(bundle_root / "eval" / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    evaluation = json.loads((dataset / "datalist.json").read_text())["evaluation"]
    assert [r["case"] for r in rows] == [Path(i["image"]).name for i in evaluation]
    assert set(rows[0]) == {"case"} | {f"{m}_{n}" for m in ("dice", "hd95") for n in names}
    summary = json.loads((bundle_root / "eval" / "summary.json").read_text())
    assert list(summary["per_class"]["dice"]) == names and summary["num_cases"] == len(evaluation)


def test_mr_dice_clearly_above_an_untrained_network(runs, untrained_mr):
    _, bundle_root = runs["mr"]
    trained = json.loads((bundle_root / "eval" / "summary.json").read_text())
    dice, chance = trained["groups"]["all labels"]["dice"], untrained_mr["groups"]["all labels"]["dice"]
    assert dice > max(0.5, chance + 0.3), f"mean Dice {dice:.3f}, untrained {chance:.3f}"
    assert all(np.isfinite(v) for v in trained["per_class"]["hd95"].values())
    losses = read_losses(bundle_root / "logs" / "finetune" / "loss.csv")
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_in_the_input_geometry(runs, layout):
    dataset, bundle_root = runs[layout]
    inputs = sorted((dataset / "imagesTs").glob("*.nii.gz"))
    assert sorted(p.name for p in (bundle_root / "predictions").iterdir()) == [
        p.name.replace(".nii.gz", "_seg.nii.gz") for p in inputs
    ]
    for image_file in inputs:
        image = nib.load(image_file)
        seg = nib.load(bundle_root / "predictions" / image_file.name.replace(".nii.gz", "_seg.nii.gz"))
        assert seg.shape == image.shape[:3] and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
        values = set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert values <= set(range(len(demo.LAYOUTS[layout]["labels"]))), values
        if layout == "mr":  # the trained one finds its labels in every input (an all-background map fails here)
            assert values & {1, 2}, (image_file.name, values)


def test_overrides_beat_the_derived_defaults(runs):
    """Each derived default is a top-level id: an override wins and what derives from it follows."""
    from monai.bundle import ConfigParser

    dataset, _ = runs["mr"]
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / BUNDLE / "configs" / f"{n}.yaml") for n in ("finetune", "demo")])
    parser.update(
        {
            "dataset_dir": str(dataset),
            "roi_size": [48, 48, 32],
            "normalization": "window",
            "hu_min": 0,
            "hu_max": 100,
            **TINY,
        }
    )
    assert parser.get_parsed_content("network_def#img_size") == [48, 48, 32]
    assert parser.get_parsed_content("train#augmentation#0#spatial_size") == [48, 48, 32]
    intensity = parser.get_parsed_content("preprocessing#3")
    assert type(intensity).__name__ == "ScaleIntensityRanged" and intensity.scaler.a_max == 100


def test_missing_datalist_names_the_prepare_tool(tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(RuntimeError) as raised:  # MONAI's "Failed to evaluate ...", from our error
        run_here("pretrain", "pretrain", "demo", dataset_dir=tmp_path, bundle_root=tmp_path)
    cause = raised.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, FileNotFoundError) and "tools/prepare.py msd" in str(cause), cause


# ---- model-zoo conformance, with the checks tests/test_bundle_conformance.py runs on the other bundles


def test_bundle_files_and_metadata_conform():
    import test_bundle_conformance as conformance  # its checks, called here (its parametrisation is the fixed bundles')

    conformance.test_metadata_matches_the_schema(BUNDLE)
    conformance.test_licence_model_card_and_data_licence(BUNDLE)
    conformance.test_large_files_lists_the_weights_in_model_zoo_format(BUNDLE)
    conformance.test_no_config_resolves_anything_before_run(BUNDLE)


def test_network_takes_the_metadata_input_shape():
    """The metadata's shapes (one channel, one label, the largest ROI) given as the ids the datalist would set."""
    from monai.bundle import verify_net_in_out

    meta_file = REPO / "bundles" / BUNDLE / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())["network_data_format"]
    image, pred = meta["inputs"]["image"], meta["outputs"]["pred"]
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(meta_file),
        device="cpu",
        hidden_size=48,
        config_file=str(REPO / "bundles" / BUNDLE / "configs" / "inference.yaml"),
        in_channels=image["num_channels"],
        out_channels=pred["num_channels"],
        roi_size=image["spatial_shape"],
    )


@pytest.mark.parametrize("workflow_type, config", [("train", "finetune"), ("infer", "inference")])
def test_workflow_has_the_properties_monai_checks(runs, tmp_path, workflow_type, config):
    from monai.bundle import ConfigWorkflow

    dataset, bundle_root = runs["mr"]
    overrides = dict(TINY, bundle_root=str(tmp_path), dataset_dir=str(dataset))
    if workflow_type == "train":
        overrides.update(init_mode="scratch", cache_rate=0.0)
    else:
        overrides.update(input_dir=str(dataset / "imagesTs"), checkpoint=str(bundle_root / "models" / "model.pt"))
    files = [str(REPO / "bundles" / BUNDLE / "configs" / f"{n}.yaml") for n in (config, "demo")]
    wf = ConfigWorkflow(config_file=files, workflow_type=workflow_type, **overrides)
    wf.initialize()
    assert wf.check_properties() == []


def test_ckpt_export_gives_torchscript_equal_to_the_eager_network(runs, tmp_path):
    from monai.bundle import ConfigParser, ckpt_export
    from monai.data import load_net_with_metadata

    dataset, bundle_root = runs["mr"]
    files = [str(REPO / "bundles" / BUNDLE / "configs" / f"{n}.yaml") for n in ("inference", "demo")]
    roi = msd.dataset_properties(dataset / "datalist.json")["roi_size"]
    ts_file, checkpoint = tmp_path / "model.ts", bundle_root / "models" / "model.pt"
    # the best-validation model.pt holds the state dict itself (CheckpointSaver with one object)
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(checkpoint),
        key_in_ckpt="",
        meta_file=str(REPO / "bundles" / BUNDLE / "configs" / "metadata.json"),
        config_file=files,
        use_trace=True,
        input_shape=[1, 2, *roi],
        dataset_dir=str(dataset),
        **TINY,
    )
    scripted, _, _ = load_net_with_metadata(str(ts_file))
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"dataset_dir": str(dataset), "device": "$torch.device('cpu')", **TINY})
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(checkpoint, weights_only=True))
    eager.eval()
    x = torch.rand(1, 2, *roi, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-4, atol=1e-5)


def test_exported_run_needs_no_datalist(runs, tmp_path):
    """tools/export_bundle.py --run writes the run's derived settings (channels, classes, ROI, spacing, intensity) into
    the exported configs: the export segments as the bundle did, with no datalist anywhere."""
    import subprocess
    import sys

    dataset, bundle_root = runs["ct"]
    proc = subprocess.run(
        [sys.executable, "tools/export_bundle.py", "--run", str(bundle_root), "--out", str(tmp_path), "--no-zip"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    exported, out = tmp_path / BUNDLE, tmp_path / "predictions"
    # the task's class names (MONAI Label shows them and writes them into DICOM SEG), not the bundle's generic ones
    pred = json.loads((exported / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]
    labels = json.loads((dataset / "datalist.json").read_text())["properties"]["labels"]
    assert pred["channel_def"] == labels and pred["num_channels"] == len(labels)
    assert "spleen" in labels.values()
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        "configs/inference.yaml",
        "--input_dir",
        str(dataset / "imagesTs"),
        "--output_dir",
        str(out),
        "--dataset_dir",
        str(tmp_path / "none"),
        "--datalist_file",
        str(tmp_path / "none" / "datalist.json"),
    ]
    proc = subprocess.run(cmd, cwd=exported, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for seg in sorted((bundle_root / "predictions").glob("*_seg.nii.gz")):
        np.testing.assert_array_equal(np.asarray(nib.load(out / seg.name).dataobj), np.asarray(nib.load(seg).dataobj))


# ---- scale out and resume, as for the other bundles (slow: torchrun start-up and several runs)


@pytest.mark.slow
def test_torchrun_two_processes_and_resume(tmp_path):
    import os
    import subprocess
    import sys

    dataset = Path(demo.make_demo(tmp_path / "data", layout="ct", num_cases=6, num_test_cases=1, shape=(36, 36, 24)))
    msd.prepare_datalist(dataset, eval_fraction=0.25, num_val_cases=1)
    out = tmp_path / "ddp"
    common = dict(dataset_dir=dataset, bundle_root=out, batch_size=1, **TINY)

    def torchrun(stage: str, **overrides) -> str:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "monai.bundle",
            "run",
            stage,
            "--config_file",
            configs(BUNDLE, stage, f"multi_gpu_{stage}", "demo"),
        ]
        for key, value in {**common, **overrides}.items():
            cmd += [f"--{key}", str(value)]
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        return proc.stdout + proc.stderr

    log = torchrun("pretrain", max_epochs=3, save_interval=1)
    assert len(read_losses(out / "logs/pretrain/loss.csv")) == 3  # rank 0 alone writes the log
    # both ranks ran: the 5 pre-training images (3 training, 1 validation, 1 test) padded to 3 per rank, batch 1
    assert "Epoch: 3/3, Iter: 3/3" in log
    torchrun("finetune", max_epochs=2, val_interval=1)
    assert (out / "models" / "model.pt").is_file()  # best validation model, saved by rank 0

    # resume: continue the single-process pre-training from its newest checkpoint
    log = run_bundle(
        "pretrain", configs(BUNDLE, "pretrain", "demo"), max_epochs=5, save_interval=1, resume=True, **common
    ).stdout
    assert "Resuming from" in log and "Epoch: 4/5" in log and "Epoch: 1/5" not in log
    assert len(read_losses(out / "logs/pretrain/loss.csv")) == 5
