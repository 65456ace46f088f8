"""Volume files as an archive holds them (NIfTI, NRRD, MetaImage), their labels (3D Slicer's ``.seg.nrrd`` included)
and the NIfTI files the archive preparation writes: every array in NIfTI order ``[i, j, k]`` with a 4x4 affine to
RAS millimetres, as nibabel and MONAI's loaders give them.

    read_volume(path)          (data, affine) of a NIfTI, NRRD or MetaImage file
    read_segments(path)        (label map, affine, {value: name}) of a label file; Slicer's segment names and values
    resample_label(label, a, shape, b)   a label map moved onto another grid (nearest neighbour, world coordinates)
    write_nifti(data, affine, path)      written atomically (never a truncated file under its final name)
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import _FILE_MODE

__all__ = [
    "VOLUME_SUFFIXES",
    "DATA_SUFFIXES",
    "volume_suffix",
    "stem",
    "read_volume",
    "read_segments",
    "resample_label",
    "write_nifti",
    "axcodes",
]

VOLUME_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DATA_SUFFIXES = (".raw", ".zraw", ".raw.gz")  # the data files of detached headers (.mhd, .nhdr)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SAME_GRID_ATOL_MM = 1e-3


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The volume file suffix of ``path`` (``.seg.nrrd`` before ``.nrrd``), or None for any other file."""
    name = os.fspath(path).lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def stem(path: str | os.PathLike) -> str:
    """``path`` without its volume suffix (``a/b.seg.nrrd`` -> ``a/b``)."""
    path, suffix = os.fspath(path), volume_suffix(path)
    return path[: -len(suffix)] if suffix else path


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine to RAS) of a NIfTI (nibabel), NRRD or MetaImage (ITK) file; the array as stored (a vector image's
    components last).

    Raises:
        ValueError: a file that cannot be read, with the reader's reason.
    """
    path = os.fspath(path)
    try:
        if volume_suffix(path) in (".nii", ".nii.gz"):
            img = nib.load(path)
            return np.asanyarray(img.dataobj), img.affine
        import itk

        image = itk.imread(path)
        data = itk.array_from_image(image)  # [k, j, i(, component)]
    except Exception as e:  # nibabel and ITK raise many types for a damaged file
        raise ValueError(f"cannot be read as {volume_suffix(path) or 'a volume'} ({type(e).__name__}: {e})") from None
    spatial = image.GetImageDimension()
    data = np.moveaxis(data, range(spatial), range(spatial)[::-1])  # NIfTI order [i, j, k(, component)]
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), float)
    spacing, origin = np.asarray(image.GetSpacing(), float), np.asarray(image.GetOrigin(), float)
    affine = np.eye(4)
    affine[:spatial, :spatial] = direction @ np.diag(spacing)
    affine[:spatial, 3] = origin
    return data, LPS_TO_RAS @ affine  # ITK's physical space is LPS


def _nrrd_header(path: str) -> dict[str, str]:
    """The key/value lines of a NRRD header (``key:=value`` and ``field: value``), read up to the blank line."""
    header: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in iter(f.readline, b""):
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            match = re.match(r"([^:]+):=(.*)", line) or re.match(r"([^:]+): (.*)", line)
            if match:
                header[match[1].strip()] = match[2].strip()
    return header


def read_segments(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A label file as (integer label map [i, j, k], affine to RAS, {value: segment name}).

    Plain label maps (NIfTI, NRRD, MetaImage) give ``{}`` for names. 3D Slicer's ``.seg.nrrd`` gives its segments'
    names by ``Segment<N>_LabelValue``; a segmentation with overlapping segments (several layers, the first NRRD
    axis) is flattened, a later segment drawn over an earlier one, and each segment numbered in its order (the
    layers reuse values).

    Raises:
        ValueError: unreadable, not 3-D, or values that are not non-negative integers.
    """
    path = os.fspath(path)
    data, affine = read_volume(path)
    names: dict[int, str] = {}
    if volume_suffix(path) in (".seg.nrrd", ".nrrd", ".nhdr"):
        header = _nrrd_header(path)
        segments = sorted({int(m[1]) for k in header if (m := re.match(r"Segment(\d+)_Name$", k))})
        layered = data.ndim == 4
        if layered:  # [i, j, k, layer]: segment s is (layer == its layer) & (value == its label value)
            flat = np.zeros(data.shape[:3], np.uint16)
            for number, s in enumerate(segments, start=1):
                layer, value = int(header.get(f"Segment{s}_Layer", 0)), int(header.get(f"Segment{s}_LabelValue", s + 1))
                flat[data[..., layer] == value] = number
                names[number] = header[f"Segment{s}_Name"]
            data = flat
        else:
            for s in segments:
                names[int(header.get(f"Segment{s}_LabelValue", s + 1))] = header[f"Segment{s}_Name"]
    data = np.squeeze(data, axis=3) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D label map, got shape {tuple(data.shape)}")
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        raise ValueError("label values must be integers, found non-integer values")
    if data.size and data.min() < 0:
        raise ValueError(f"label values must be 0 (background) or positive, found {int(data.min())}")
    return data.astype(np.uint16 if data.max(initial=0) > 255 else np.uint8), affine, names


def resample_label(
    label: np.ndarray, label_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """``label`` on the grid of ``shape`` and ``affine`` (nearest neighbour in world coordinates; 0 outside it):
    a label saved cropped to its extent (Slicer), in another orientation or at another spacing lands on its image."""
    if label.shape == tuple(shape) and np.allclose(label_affine, affine, atol=SAME_GRID_ATOL_MM):
        return label
    from scipy.ndimage import affine_transform

    to_label = np.linalg.inv(label_affine) @ affine  # image voxel -> label voxel
    # one voxel of background around the label: scipy treats a point a rounding error past the last voxel as
    # outside (cval) even with order 0, which would drop the edge of a label cropped to its extent
    padded = np.pad(label, 1)
    return affine_transform(
        padded, to_label[:3, :3], to_label[:3, 3] + 1, output_shape=tuple(shape), order=0, mode="constant", cval=0
    )


def axcodes(affine: np.ndarray) -> str:
    """The orientation of the array axes, e.g. ``LPS`` (i to the left, j to posterior, k to superior)."""
    return "".join(nib.aff2axcodes(affine))


def write_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``data`` as NIfTI (sform and qform ``affine``, mm) through a temporary file renamed into place. The
    header carries geometry only: no description, no source name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp's 0600 would hide it from the team
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
