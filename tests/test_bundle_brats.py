"""brats_seg end to end through the MONAI bundle runner, as a user runs it, on tiny synthetic MSD data.

pretrain -> finetune -> evaluate -> inference run once (module-scoped fixtures) with the CPU demo preset
plus tiny overrides: 8 cases of 32 x 32 x 24 voxels (6 mm), 32^3 ROI (8 tokens).
"""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_runner import configs, read_losses, run_bundle, run_bundle_expect_error

from selfmedmae_components.data import brats
from selfmedmae_components.data.demo import brats as brats_demo

BUNDLE = "brats_seg"
TINY = {"roi_size": [32, 32, 32], "pixdim": [6.0, 6.0, 6.0]}  # the tiny demo data's own 6 mm grid
PRETRAIN_EPOCHS = 8
FINETUNE_EPOCHS = 30


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One thread per bundle run: far faster than two when other jobs share the CPU, and kinder to them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = Path(brats_demo.make_demo(tmp_path_factory.mktemp("msd"), num_cases=8, num_test_cases=1, shape=(32, 32, 24)))
    brats.prepare_datalist(root, eval_fraction=0.25, num_val_cases=1)  # 5 training, 1 validation, 2 evaluation
    return root


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("brats_bundle")


@pytest.fixture(scope="module")
def pretrained(dataset, bundle_root) -> Path:
    # mask ratio 0.5: 4 of the 8 tokens masked, a less noisy loss than the default's single token
    run_bundle(
        "pretrain",
        configs(BUNDLE, "pretrain", "demo"),
        dataset_dir=dataset,
        bundle_root=bundle_root,
        max_epochs=PRETRAIN_EPOCHS,
        mask_ratio=0.5,
        **TINY,
    )
    return bundle_root / "models" / "mae_pretrain.pt"


@pytest.fixture(scope="module")
def finetuned(dataset, bundle_root, pretrained) -> Path:
    run_bundle(
        "finetune",
        configs(BUNDLE, "finetune", "demo"),
        dataset_dir=dataset,
        bundle_root=bundle_root,
        max_epochs=FINETUNE_EPOCHS,
        val_interval=10,
        **TINY,
    )
    return bundle_root / "models" / "model.pt"


@pytest.fixture(scope="module")
def evaluated(dataset, bundle_root, finetuned) -> Path:
    run_bundle("evaluate", configs(BUNDLE, "evaluate", "demo"), dataset_dir=dataset, bundle_root=bundle_root, **TINY)
    return bundle_root / "eval"


def _chance_wt_dice(dataset: Path) -> float:
    """Dice of the trivial prediction "the whole brain is tumour" on the evaluation cases."""
    datalist = json.loads((dataset / "datalist.json").read_text())
    dices = []
    for item in datalist["evaluation"]:
        brain = np.asarray(nib.load(dataset / item["image"]).dataobj).max(-1) > 0
        wt = np.asarray(nib.load(dataset / item["label"]).dataobj) > 0
        dices.append(2 * (brain & wt).sum() / (brain.sum() + wt.sum()))
    return float(np.mean(dices))


def test_pretrain_loss_falls(pretrained, bundle_root):
    assert pretrained.is_file()
    losses = read_losses(bundle_root / "logs" / "pretrain" / "loss.csv")
    assert len(losses) == PRETRAIN_EPOCHS
    assert losses[-1] < losses[0], losses
    assert (bundle_root / "logs" / "pretrain" / "reconstruction_latest.png").is_file()


def test_finetune_learns(finetuned, bundle_root):
    assert finetuned.is_file() and (bundle_root / "models" / "model_final.pt").is_file()
    losses = read_losses(bundle_root / "logs" / "finetune" / "loss.csv")
    assert len(losses) == FINETUNE_EPOCHS
    assert losses[-1] < 0.9 * losses[0], losses


def test_evaluate_report(evaluated, dataset):
    with open(evaluated / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    evaluation = json.loads((dataset / "datalist.json").read_text())["evaluation"]
    assert [r["case"] for r in rows] == [Path(i["image"]).name for i in evaluation]
    assert set(rows[0]) == {"case"} | {f"{m}_{r}" for m in ("dice", "hd95") for r in ("WT", "TC", "ET")}
    summary = json.loads((evaluated / "summary.json").read_text())
    assert set(summary["per_class"]["dice"]) == set(summary["per_class"]["hd95"]) == {"WT", "TC", "ET"}
    assert summary["num_cases"] == 2 and "mean (WT, TC, ET)" in summary["groups"]
    wt, chance = summary["per_class"]["dice"]["WT"], _chance_wt_dice(dataset)
    assert wt > max(0.5, chance + 0.2), f"WT Dice {wt:.3f}, whole-brain prediction {chance:.3f}"
    assert np.isfinite(summary["per_class"]["hd95"]["WT"])


def test_inference_label_map(finetuned, dataset, bundle_root, tmp_path):
    # an input folder as copied from a Mac: the image and its "._" resource file, which must be skipped
    shutil.copy(dataset / "imagesTs" / "BRATS_485.nii.gz", tmp_path)
    shutil.copy(dataset / "imagesTr" / "._BRATS_001.nii.gz", tmp_path / "._BRATS_485.nii.gz")
    # plain `run` (no id), as MONAI tools call a bundle
    run_bundle(None, configs(BUNDLE, "inference", "demo"), input_dir=tmp_path, bundle_root=bundle_root, **TINY)
    image = nib.load(tmp_path / "BRATS_485.nii.gz")
    seg = nib.load(bundle_root / "predictions" / "BRATS_485_seg.nii.gz")
    assert seg.shape == image.shape[:3]
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    assert seg.get_data_dtype() == np.uint8
    values = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert values <= {0, 1, 2, 3} and values & {1, 2, 3}, values
    assert sorted(p.name for p in (bundle_root / "predictions").iterdir()) == ["BRATS_485_seg.nii.gz"]


def test_wrong_dataset_dir(tmp_path):
    missing = tmp_path / "no_such_dataset"
    cfg = configs(BUNDLE, "pretrain", "demo")
    out = run_bundle_expect_error("pretrain", cfg, dataset_dir=missing, bundle_root=tmp_path)
    # the path inside our sentence: the runner's echo of the command holds it too
    assert f"Dataset folder not found: {missing} (set --dataset_dir" in out


def test_missing_pretrained_checkpoint(dataset, tmp_path):
    missing = tmp_path / "models" / "mae_pretrain.pt"
    cfg = configs(BUNDLE, "finetune", "demo")
    out = run_bundle_expect_error("finetune", cfg, dataset_dir=dataset, bundle_root=tmp_path, **TINY)
    assert "Checkpoint not found" in out and str(missing) in out
