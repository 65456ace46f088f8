"""The four stages of a bundle must feed the network the same image for the same file.

The stage configs are generated from shared layers (tools/build_configs.py), but a preset can still give one stage
another foreground crop, spacing, intensity window or normalisation, and the network would then see data at
evaluation that it was never trained on. Here each stage's deterministic pipeline (what the training cache holds,
what validation, evaluation and inference feed the network) runs on the same demo case and the images must agree,
up to the compact dtypes the training caches use (float16 / 8-bit levels).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_runner import REPO
from monai.bundle import ConfigParser
from monai.transforms import CenterSpatialCropd, Compose

from selfmedmae_components.data import msd
from selfmedmae_components.data.demo import brats as brats_demo
from selfmedmae_components.data.demo import btcv as btcv_demo
from selfmedmae_components.data.demo import cxr14 as cxr14_demo
from selfmedmae_components.data.demo import msd as msd_demo

STAGES = ("pretrain", "finetune", "evaluate", "inference")
# the id of each stage's deterministic pipeline: the cached part of MAE training, fine-tuning's validation
# (its training shares the same `preprocessing` before crops and augmentation), evaluation and inference
PIPELINE = {
    "pretrain": "train#preprocessing",
    "finetune": "validate#preprocessing",
    "evaluate": "preprocessing",
    "inference": "preprocessing",
}
# segmentation: a ROI smaller than the demo volumes, so that no stage pads (only training pads to the ROI)
OVERRIDES = {
    "btcv_seg": {"roi_size": [16, 16, 16]},
    "brats_seg": {"roi_size": [16, 16, 16]},
    "cxr14_cls": {},
    "msd_seg": {"roi_size": [16, 16, 16]},
}
# float16 caches keep [0, 1] CT to 2.4e-4 and z-scores to 1e-3 relative; 8-bit levels of chest films, normalised by
# std 0.225, to 1/255/0.225 = 0.017
TOLERANCE = {
    "btcv_seg": dict(rtol=0, atol=5e-4),
    "brats_seg": dict(rtol=2e-3, atol=2e-3),
    "cxr14_cls": dict(rtol=0, atol=0.018),
    "msd_seg": dict(rtol=2e-3, atol=2e-3),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """One demo case of each dataset, as the stages read it (image and, where it has one, label)."""
    root = tmp_path_factory.mktemp("drift")
    btcv_dir = Path(btcv_demo.make_demo(root / "btcv", num_test_cases=0, shape=(64, 64, 24)))
    brats_dir = Path(brats_demo.make_demo(root / "brats", num_cases=1, num_test_cases=0, shape=(48, 48, 32)))
    cxr_dir = Path(cxr14_demo.make_demo(root / "cxr14", num_images=40, image_size=256, seed=0))
    msd_dir = Path(msd_demo.make_demo(root / "msd", layout="mr", num_cases=4, num_test_cases=0, shape=(48, 48, 24)))
    msd.prepare_datalist(msd_dir, eval_fraction=0.25, num_val_cases=1)  # the stages read its derived settings
    first = lambda folder, pattern: str(sorted(folder.glob(pattern))[0])  # noqa: E731
    return {
        "btcv_seg": (
            {
                "image": first(btcv_dir, "RawData/Training/img/*.nii.gz"),
                "label": first(btcv_dir, "RawData/Training/label/*.nii.gz"),
            },
            btcv_dir,
        ),
        "brats_seg": (
            {
                "image": first(brats_dir, "imagesTr/BRATS_*.nii.gz"),
                "label": first(brats_dir, "labelsTr/BRATS_*.nii.gz"),
            },
            brats_dir,
        ),
        "cxr14_cls": ({"image": first(cxr_dir, "images/*.png"), "label": np.zeros(14, np.float32)}, cxr_dir),
        "msd_seg": (
            {"image": first(msd_dir, "imagesTr/demo*.nii.gz"), "label": first(msd_dir, "labelsTr/demo*.nii.gz")},
            msd_dir,
        ),
    }


def stage_image(bundle: str, stage: str, case: dict, dataset_dir) -> np.ndarray:
    """What the stage's network gets for ``case``: the stage's pipeline, then (chest films, whose workers send
    8-bit levels) the centre crop that validation applies and the device-side normalisation of prepare_batch."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / f"{stage}.yaml"))
    parser.update({"dataset_dir": str(dataset_dir), **OVERRIDES[bundle]})
    pipeline = parser.get_parsed_content(PIPELINE[stage])
    pipeline = Compose(pipeline) if isinstance(pipeline, list) else pipeline
    keys = ["image"] if stage == "inference" or (bundle != "cxr14_cls" and stage == "pretrain") else ["image", "label"]
    out = pipeline({k: v for k, v in case.items() if k in keys})
    if isinstance(out, list):  # a pipeline ending in crops would give a list: none of these may
        pytest.fail(f"{bundle}/{stage}: {PIPELINE[stage]} is not deterministic")
    if bundle == "cxr14_cls" and stage in ("pretrain", "finetune"):
        if stage == "pretrain":  # MAE's workers crop at random; validate's centre crop stands in for it
            out = CenterSpatialCropd("image", parser.get_parsed_content("img_size"))(out)
        prepare = parser.get_parsed_content("prepare_batch")
        image, _ = prepare({"image": torch.as_tensor(out["image"])[None]}, torch.device("cpu"))
        return image[0].numpy()
    return torch.as_tensor(out["image"]).float().numpy()


@pytest.mark.parametrize("bundle", ["btcv_seg", "brats_seg", "cxr14_cls", "msd_seg"])
def test_every_stage_feeds_the_network_the_same_image(bundle, cases):
    case, dataset_dir = cases[bundle]
    images = {stage: stage_image(bundle, stage, case, dataset_dir) for stage in STAGES}
    reference = images["evaluate"]
    assert reference.std() > 0, "the demo case must have content"
    for stage, image in images.items():
        assert image.shape == reference.shape, (
            f"{bundle}: {stage} gives shape {image.shape}, evaluate {reference.shape}"
        )
        np.testing.assert_allclose(
            image, reference, **TOLERANCE[bundle], err_msg=f"{bundle}: {stage} preprocesses differently from evaluate"
        )
