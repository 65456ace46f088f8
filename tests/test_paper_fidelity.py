"""The segmentation losses and the BraTS fine-tuning crops are the original SelfMedMAE code's, built from the
bundle configs exactly as a run builds them."""

import nibabel as nib
import numpy as np
from bundle_runner import REPO
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss
from monai.transforms import Compose, RandCropByPosNegLabeld


def parser(bundle: str, stage: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config(str(REPO / "bundles" / bundle / "configs" / f"{stage}.yaml"))
    p.update(overrides)
    return p


def assert_squared_dice_without_numerator_smoothing(dice: DiceLoss) -> None:
    assert dice.squared_pred and dice.smooth_nr == 0.0 and dice.smooth_dr == 1.0e-6


def test_btcv_loss_is_the_originals_dice_ce():
    loss = parser("btcv_seg", "finetune").get_parsed_content("loss")
    assert type(loss) is DiceCELoss
    assert loss.dice.to_onehot_y and loss.dice.softmax and not loss.dice.sigmoid
    assert_squared_dice_without_numerator_smoothing(loss.dice)


def test_brats_loss_is_the_originals_sigmoid_dice_only():
    loss = parser("brats_seg", "finetune").get_parsed_content("loss")
    assert type(loss) is DiceLoss  # no BCE term by default
    assert loss.sigmoid and not loss.softmax and not loss.to_onehot_y
    assert_squared_dice_without_numerator_smoothing(loss)
    option = parser("brats_seg", "finetune", seg_loss="dice_bce").get_parsed_content("loss")
    assert type(option) is DiceFocalLoss and option.focal.gamma == 0.0
    assert_squared_dice_without_numerator_smoothing(option.dice)


def brats_case(tmp_path):
    """A 4-channel MRI case with zero background outside a 'brain' box and a small 'tumour' inside it."""
    rng = np.random.default_rng(0)
    image = np.zeros((24, 24, 24, 4), np.float32)
    image[4:20, 5:19, 6:18] = rng.uniform(50, 500, (16, 14, 12, 4))
    label = np.zeros((24, 24, 24), np.uint8)
    label[8:12, 9:12, 9:13] = 2
    label[9:11, 10:11, 10:12] = 3
    for name, array in (("image", image), ("label", label)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / f"{name}.nii.gz")
    return {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}


def test_brats_crops_are_the_originals_pos_neg_crops_on_raw_label_and_brain(tmp_path):
    p = parser("brats_seg", "finetune", roi_size=[8, 8, 8])
    crop = p.get_parsed_content("train#augmentation")[0]
    assert isinstance(crop, RandCropByPosNegLabeld)
    assert crop.cropper.pos_ratio == 0.5 and crop.cropper.num_samples == 1 == p.get_parsed_content("num_samples")

    data = Compose(p.get_parsed_content("preprocessing"))(brats_case(tmp_path))  # what the training cache holds
    # the original drew crop centres on the raw labels (tumour: label > 0) and the raw image (brain: > 0),
    # not on the z-scored image, where about half of the brain falls below the threshold 0
    image, regions = data["image"].numpy(), data["label"].numpy()
    brain = (image != 0).any(0).ravel()
    tumour = regions[0].ravel() > 0  # WT = label > 0
    np.testing.assert_array_equal(np.sort(np.asarray(data["label_fg_indices"])), np.flatnonzero(tumour))
    np.testing.assert_array_equal(np.sort(np.asarray(data["label_bg_indices"])), np.flatnonzero(brain & ~tumour))
    assert not np.array_equal(np.flatnonzero((image > 0).any(0).ravel() & ~tumour), np.flatnonzero(brain & ~tumour))

    crops = crop(data)
    assert len(crops) == 1 and crops[0]["image"].shape == (4, 8, 8, 8) and "label_fg_indices" not in crops[0]
