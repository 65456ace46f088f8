"""NIfTI checks shared by the dataset preparation modules: each names the file and what was expected."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE_ATOL_MM = 1e-2  # image/label affines written by different tools differ by float round-off


# NIfTI checks shared by the dataset modules. Each returns None when fine, else the reason.


def missing(path: Path) -> str:
    return f"{path}: missing (expected a NIfTI file here)"


def open_nifti(path: Path, problems: list[str]) -> nib.Nifti1Image | None:
    """Open ``path`` and read the whole file once (to catch a truncated or corrupt gzip); on
    failure append ``"<path>: <why>"`` to ``problems`` and return None."""
    if not path.is_file():
        problems.append(missing(path))
        return None
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for a damaged file; report them all the same way
        problems.append(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})")
        return None
    why = _unreadable_data(path, img)
    if why:
        problems.append(f"{path}: {why}")
        return None
    return img


def _unreadable_data(path: Path, img: nib.Nifti1Image) -> str | None:
    """Stream the whole file (constant memory) so gzip checks its CRC and length, then check that
    the data the header promises is all there."""
    expected = int(img.header.get_data_offset()) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    opener = gzip.open if path.name.endswith(".gz") else open
    size = 0
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 22):
                size += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        return f"corrupt or truncated file ({type(e).__name__}: {e})"
    if size < expected:
        return f"truncated: {size} bytes of data, the header needs {expected}"
    return None


def grid_mismatch(img: nib.Nifti1Image, lab: nib.Nifti1Image) -> str | None:
    """Compare the label's grid with the image's spatial grid (first three axes)."""
    if tuple(lab.shape) != tuple(img.shape[:3]):
        return f"label shape {tuple(lab.shape)} differs from the image's spatial shape {tuple(img.shape[:3])}"
    diff = float(np.abs(lab.affine - img.affine).max())
    if diff > AFFINE_ATOL_MM:
        return f"label affine differs from the image's by up to {diff:.3g} (tolerance {AFFINE_ATOL_MM})"
    return None


def label_values_problem(lab: nib.Nifti1Image, max_label: int, hints: dict[int, str] | None = None) -> str | None:
    """Labels must be integers in ``0..max_label``; ``hints`` adds advice for known wrong values."""
    data = np.asanyarray(lab.dataobj)
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        return f"label values must be integers 0..{max_label}, found non-integer values"
    bad = data[(data < 0) | (data > max_label)]
    if bad.size:
        found = [int(v) for v in np.unique(bad)[:10]]
        advice = "".join(f" ({hints[v]})" for v in found if hints and v in hints)
        return f"label values must be integers 0..{max_label}, found {found}{advice}"
    return None
