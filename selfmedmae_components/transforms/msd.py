"""Intensity handling of the msd_seg bundle, chosen by the dataset's modality (data/msd.py writes the choice).

Every stage config builds its intensity transform and its foreground crop here, so that pre-training, fine-tuning,
evaluation and inference cannot drift apart (tests/test_stage_drift.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged

__all__ = ["NORMALIZATIONS", "intensity", "nonzero"]

NORMALIZATIONS = ("window", "zscore")


def intensity(
    normalization: str, hu_min: float | None = None, hu_max: float | None = None, keys: str | Sequence[str] = "image"
) -> MapTransform:
    """The image's intensity transform.

    Args:
        normalization: "window" (CT: clip to [hu_min, hu_max] and scale to [0, 1]) or "zscore" (each channel to zero
            mean and unit variance over its non-zero voxels; zeros stay zero).
        hu_min, hu_max: the window (needed for "window").
        keys: the image key.

    Raises:
        ValueError: an unknown normalisation, or a window without both ends.
    """
    if normalization == "window":
        if hu_min is None or hu_max is None or float(hu_max) <= float(hu_min):
            raise ValueError(
                f"normalization 'window' needs hu_min < hu_max, got hu_min={hu_min}, hu_max={hu_max} "
                f"(set --hu_min and --hu_max, or prepare the dataset with --hu_window)."
            )
        return ScaleIntensityRanged(keys, float(hu_min), float(hu_max), 0.0, 1.0, clip=True)
    if normalization == "zscore":
        return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """CropForegroundd's foreground after either normalisation: the voxels not exactly zero (air below the CT
    window; the zero background of skull-stripped MR, which the z-score keeps at zero)."""
    return x != 0
