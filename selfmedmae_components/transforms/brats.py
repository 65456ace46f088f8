"""BraTS tumour regions (WT, TC, ET) from MSD Task01_BrainTumour label maps, and back; a check of the
images' four modalities.

MSD labels: 0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour. The regions are
evaluated as three overlapping binary channels in the order [WT, TC, ET]:

- ``et_mapping="dataset"`` (default, the dataset's definitions): WT = {1, 2, 3}, TC = {2, 3},
  ET = {3}.
- ``et_mapping="original"``: WT = {1, 2, 3}, TC = {2, 3}, ET = {2}. This is the mapping of the
  paper's published code, which followed an old MONAI tutorial written for the BraTS challenge
  numbering; on MSD labels its "ET" is the non-enhancing tumour. Offered only to compare with the
  paper's numbers.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from ..data.brats import MODALITIES  # the channels of MSD Task01_BrainTumour images, in order

ET_MAPPINGS = ("dataset", "original")
REGION_NAMES = ("WT", "TC", "ET")

# label value(s) of each region, in REGION_NAMES order
_REGION_LABELS = {
    "dataset": ((1, 2, 3), (2, 3), (3,)),
    "original": ((1, 2, 3), (2, 3), (2,)),
}


def _check_mapping(et_mapping: str) -> None:
    if et_mapping not in ET_MAPPINGS:
        raise ValueError(f"et_mapping must be one of {ET_MAPPINGS}, got {et_mapping!r}.")


def _plain(x: NdarrayOrTensor) -> NdarrayOrTensor:
    """Drop the MetaTensor wrapper for the arithmetic; the meta is restored on the result."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _stack(channels: list, like: NdarrayOrTensor) -> NdarrayOrTensor:
    return torch.stack(channels, 0) if isinstance(like, torch.Tensor) else np.stack(channels, 0)


def labels_to_regions(label: NdarrayOrTensor, et_mapping: str = "dataset") -> NdarrayOrTensor:
    """Convert an MSD label map into three binary region channels [WT, TC, ET].

    Args:
        label: label map with values 0..3, shape ``(1, *spatial)`` or ``(*spatial)``; a leading
            singleton axis is taken as the channel axis. numpy array, tensor or MetaTensor.
        et_mapping: ``"dataset"`` (ET = 3) or ``"original"`` (ET = 2, the published code's).

    Returns:
        ``(3, *spatial)`` of the same type and dtype as ``label``; a MetaTensor keeps its meta.
    """
    _check_mapping(et_mapping)
    lab = _plain(label)
    if lab.ndim >= 3 and lab.shape[0] == 1:
        lab = lab[0]
    channels = []
    for values in _REGION_LABELS[et_mapping]:
        mask = lab == values[0]
        for v in values[1:]:
            mask = mask | (lab == v)
        channels.append(mask)
    out, *_ = convert_to_dst_type(_stack(channels, lab), label, dtype=label.dtype)
    return out


def regions_to_labels(regions: NdarrayOrTensor, et_mapping: str = "dataset") -> NdarrayOrTensor:
    """Convert binary [WT, TC, ET] channels back into one MSD label map (values 0..3).

    The inverse of :func:`labels_to_regions` for region maps that nest (ET inside TC inside WT).
    Channels are painted in the order WT, TC, ET, so where a prediction does not nest the
    innermost region wins (an ET voxel outside WT still becomes enhancing tumour).

    Args:
        regions: ``(3, *spatial)`` binary (already thresholded) channels, numpy or torch.
        et_mapping: the mapping the regions were made with, ``"dataset"`` or ``"original"``.

    Returns:
        ``(1, *spatial)`` label map of the same type as ``regions`` (dtype kept, bool becomes
        uint8); a MetaTensor keeps its meta.
    """
    _check_mapping(et_mapping)
    reg = _plain(regions)
    if reg.ndim < 2 or reg.shape[0] != 3:
        raise ValueError(f"regions must have 3 channels [WT, TC, ET] first, got shape {tuple(reg.shape)}.")
    wt, tc, et = (reg[i] > 0 for i in range(3))
    # TC without ET is label 2 with the dataset mapping, label 3 with the original one
    tc_value, et_value = (2, 3) if et_mapping == "dataset" else (3, 2)
    lab = wt.astype(np.uint8) if isinstance(wt, np.ndarray) else wt.to(torch.uint8)
    lab[tc] = tc_value
    lab[et] = et_value
    dtype = regions.dtype
    if dtype in (np.bool_, torch.bool):
        dtype = torch.uint8 if isinstance(regions, torch.Tensor) else np.uint8
    out, *_ = convert_to_dst_type(lab[None], regions, dtype=dtype)
    return out


class _BratsConversiond(MapTransform):
    """Applies ``convert(value, et_mapping)`` to each key; the two public transforms differ only in it."""

    convert: Any = None

    def __init__(self, keys: KeysCollection, et_mapping: str = "dataset", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        _check_mapping(et_mapping)
        self.et_mapping = et_mapping

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = type(self).convert(d[key], self.et_mapping)
        return d


class ConvertToBratsRegionsd(_BratsConversiond):
    """Dictionary transform: MSD label map -> [WT, TC, ET] channels (see :func:`labels_to_regions`).

    Args:
        keys: keys of the label maps to convert.
        et_mapping: ``"dataset"`` (default) or ``"original"``.
        allow_missing_keys: do not raise if a key is missing.
    """

    convert = staticmethod(labels_to_regions)


class BratsRegionsToLabelsd(_BratsConversiond):
    """Dictionary transform: binary [WT, TC, ET] channels -> MSD label map (see :func:`regions_to_labels`).

    Args:
        keys: keys of the region maps to convert.
        et_mapping: ``"dataset"`` (default) or ``"original"``.
        allow_missing_keys: do not raise if a key is missing.
    """

    convert = staticmethod(regions_to_labels)


class CheckModalitiesd(MapTransform):
    """Dictionary transform: checks that each image (channel first, right after ``LoadImaged`` with
    ``ensure_channel_first``) has one channel per modality, and raises a ``ValueError`` naming the file,
    its channels and the modalities expected. Without it a 1-channel volume fails only inside the
    sliding window, without the file name (``ViTEncoder expects input (N, 4, ...)``).

    Args:
        keys: keys of the images to check.
        modalities: the expected channels, in order (MSD Task01_BrainTumour's by default).
        allow_missing_keys: do not raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, modalities: Sequence[str] = MODALITIES, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.modalities = tuple(modalities)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.modalities):
                meta = image.meta if isinstance(image, MetaTensor) else d.get(f"{key}_meta_dict", {})
                name = str(meta.get("filename_or_obj", key))
                n = len(self.modalities)
                raise ValueError(
                    f"{name}: {image.shape[0]} channel(s), expected {n} ({', '.join(self.modalities)}) as the last "
                    f"axis of a 4-D NIfTI (X, Y, Z, {n}), as in MSD Task01_BrainTumour (loaded channel first: "
                    f"shape {tuple(image.shape)})."
                )
        return d
