"""BraTS label <-> region conversion: both ET mappings, both directions, numpy/torch, meta kept."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from selfmedmae_components.transforms.brats import (
    BratsRegionsToLabelsd,
    ConvertToBratsRegionsd,
    labels_to_regions,
    regions_to_labels,
)


def _nested_label() -> np.ndarray:
    """A (1, 6, 6, 4) label with edema around a core, enhancing rim around non-enhancing tumour."""
    lab = np.zeros((1, 6, 6, 4), dtype=np.float32)
    lab[0, 1:5, 1:5] = 1
    lab[0, 2:4, 2:4, :2] = 3
    lab[0, 2:4, 2:4, 2:] = 2
    return lab


@pytest.mark.parametrize(
    "mapping, expected",
    [
        # value -> (WT, TC, ET)
        ("dataset", {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1)}),
        ("original", {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 1), 3: (1, 1, 0)}),
    ],
)
def test_labels_to_regions_per_value(mapping, expected):
    lab = np.array([0, 1, 2, 3], dtype=np.uint8).reshape(1, 2, 2)[None]  # (1, 1, 2, 2)
    reg = labels_to_regions(lab, mapping)
    assert reg.shape == (3, 1, 2, 2) and reg.dtype == np.uint8
    for value, channels in expected.items():
        assert tuple(reg[:, 0].reshape(3, -1)[:, value]) == channels


@pytest.mark.parametrize("mapping", ["dataset", "original"])
@pytest.mark.parametrize("as_torch", [False, True])
def test_round_trip(mapping, as_torch):
    lab = _nested_label()
    data = torch.as_tensor(lab) if as_torch else lab
    reg = labels_to_regions(data, mapping)
    assert reg.shape == (3, 6, 6, 4)
    back = regions_to_labels(reg, mapping)
    assert type(back) is type(data) and back.shape == lab.shape
    np.testing.assert_array_equal(np.asarray(back), lab)
    # no channel axis in, channels out
    np.testing.assert_array_equal(np.asarray(labels_to_regions(data[0], mapping)), np.asarray(reg))


def test_bool_regions_and_innermost_wins():
    reg = torch.zeros(3, 2, 2, 2, dtype=torch.bool)
    reg[0, 0] = True
    reg[1, 0, 0] = True
    reg[2, 1, 1, 1] = True  # ET outside WT: a non-nested prediction still gives ET
    lab = regions_to_labels(reg)
    assert lab.dtype == torch.uint8 and lab.shape == (1, 2, 2, 2)
    assert lab[0, 0, 0, 0] == 2 and lab[0, 0, 1, 0] == 1 and lab[0, 1, 1, 1] == 3 and lab[0, 1, 0, 0] == 0


def test_meta_kept_by_dict_transforms():
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    label = MetaTensor(torch.as_tensor(_nested_label()), affine=affine, meta={"filename_or_obj": "lab.nii.gz"})
    d = ConvertToBratsRegionsd("label")({"label": label, "other": 1})
    reg = d["label"]
    assert isinstance(reg, MetaTensor) and reg.shape[0] == 3 and d["other"] == 1
    assert reg.meta["filename_or_obj"] == "lab.nii.gz"
    torch.testing.assert_close(reg.affine, affine.double())
    back = BratsRegionsToLabelsd("label")(d)["label"]
    assert isinstance(back, MetaTensor) and back.meta["filename_or_obj"] == "lab.nii.gz"
    np.testing.assert_array_equal(back.numpy(), _nested_label())


def test_bad_arguments():
    with pytest.raises(ValueError, match="et_mapping"):
        labels_to_regions(np.zeros((1, 2, 2, 2)), "brats2021")
    with pytest.raises(ValueError, match="et_mapping"):
        ConvertToBratsRegionsd("label", et_mapping="ET=4")
    with pytest.raises(ValueError, match="3 channels"):
        regions_to_labels(np.zeros((2, 2, 2, 2)))
