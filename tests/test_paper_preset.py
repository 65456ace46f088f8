"""configs/paper.yaml ("as published") of every bundle: it sets what the original code did where the defaults
deliberately differ, and pretrain -> finetune -> evaluate run end to end with it on tiny generated data."""

import json
from pathlib import Path

import pytest
from bundle_runner import REPO, configs, read_losses, run_bundle
from monai.bundle import ConfigParser

from selfmedmae_components.data import brats, btcv, cxr14
from selfmedmae_components.data.demo import brats as brats_demo
from selfmedmae_components.data.demo import btcv as btcv_demo
from selfmedmae_components.data.demo import cxr14 as cxr14_demo

BUNDLES = ("btcv_seg", "brats_seg", "cxr14_cls")
# what the preset must restore, per bundle: {config id: value} read from the layered finetune/pretrain configs
ORIGINAL = {
    "btcv_seg": {
        "pretrain": {"mae_crops": "label", "weight_decay_tokens": True},
        "finetune": {"validation_mode": "none"},
    },
    "brats_seg": {
        "pretrain": {"mae_crops": "label", "weight_decay_tokens": True},
        "finetune": {"validation_mode": "none", "et_mapping": "original", "seg_loss": "dice"},
    },
    "cxr14_cls": {
        "pretrain": {"weight_decay_tokens": True, "pixel_mean": [0.5] * 3, "pixel_std": [0.225] * 3},
        "finetune": {"validation_mode": "none", "pixel_mean": [0.5] * 3, "pixel_std": [0.225] * 3},
    },
}
TINY = {
    "btcv_seg": dict(
        roi_size="[32,32,32]", pixdim="[8.0,8.0,8.0]", hidden_size=48, decoder_hidden_size=48, num_workers=0
    ),
    "brats_seg": dict(
        roi_size="[32,32,32]", pixdim="[6.0,6.0,6.0]", hidden_size=48, decoder_hidden_size=48, num_workers=0
    ),
    "cxr14_cls": dict(num_workers=0),
}


def make_data(bundle, root):
    """Tiny data in the download layout and its datalist, cut to a few cases per list (only the run matters)."""
    if bundle == "btcv_seg":
        btcv_demo.make_demo(root, num_test_cases=0, shape=(64, 64, 24))
        datalist, data = btcv.prepare_datalist(root), root
    elif bundle == "brats_seg":
        data = Path(brats_demo.make_demo(root, num_cases=6, num_test_cases=0, shape=(32, 32, 24)))
        datalist = brats.prepare_datalist(data, eval_fraction=0.25, num_val_cases=1)
    else:
        data = cxr14_demo.make_demo(root, num_images=120, image_size=72, seed=0)
        datalist = cxr14.prepare_datalist(data, num_workers=1)
    few = {k: v[:3] if k in ("training", "validation", "evaluation") else v for k, v in datalist.items()}
    if bundle == "cxr14_cls":
        few = {k: datalist[k][:48] if k in ("training", "evaluation") else v for k, v in few.items()}
    (data / "datalist.json").write_text(json.dumps(few))
    return data


@pytest.mark.parametrize("bundle", BUNDLES)
def test_paper_preset_sets_the_originals_choices(bundle):
    for stage, expected in ORIGINAL[bundle].items():
        parser = ConfigParser()
        parser.read_config([str(REPO / "bundles" / bundle / "configs" / f"{n}.yaml") for n in (stage, "paper")])
        for key, value in expected.items():
            assert parser.get_parsed_content(key) == value, (bundle, stage, key)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_paper_preset_runs_end_to_end(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # other test modules run beside this one on shared cores
    data = make_data(bundle, tmp_path / "data")
    out = tmp_path / "run"
    common = dict(dataset_dir=data, bundle_root=out, **TINY[bundle])
    run_bundle("pretrain", configs(bundle, "pretrain", "demo", "paper"), max_epochs=2, **common)
    assert len(read_losses(out / "logs/pretrain/loss.csv")) == 2
    run_bundle("finetune", configs(bundle, "finetune", "demo", "paper"), max_epochs=2, **common)
    # validation_mode none: the last epoch's weights are the model, no checkpoint was chosen on held-out cases
    assert (out / "models/model.pt").is_file() and not (out / "models/model_final.pt").exists()
    run_bundle("evaluate", configs(bundle, "evaluate", "demo", "paper"), **common)
    summary = json.loads((out / "eval/summary.json").read_text())
    assert summary["num_cases"] >= 1 if "num_cases" in summary else "mean_auc" in summary
