"""Painters for synthetic demo volumes, shared by the BTCV and MSD BraTS demo generators."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# Synthetic demo data in the download layout. Geometry is drawn in patient millimetres
# (x to the patient's right, y anterior, z superior) on 1-D coordinate axes, so each shape is
# evaluated only inside its bounding box. The blob/capsule painters are shared with brats.py.


def _box(axes: tuple[np.ndarray, ...], lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
    """Index box of the voxels whose coordinates lie in [lo, hi] on each axis (None if empty)."""
    box = []
    for ax, a, b in zip(axes, lo, hi):
        idx = np.nonzero((ax >= a) & (ax <= b))[0]
        if idx.size == 0:
            return None
        box.append(slice(idx[0], idx[-1] + 1))
    return tuple(box)


def grids(axes: tuple[np.ndarray, ...], box: tuple[slice, ...]) -> list[np.ndarray]:
    """Broadcastable coordinate grids of the box."""
    return [ax[s].reshape([-1 if i == j else 1 for j in range(3)]) for i, (ax, s) in enumerate(zip(axes, box))]


def blob(axes, centre, radii, rng: np.random.Generator, lumps: float = 0.15):
    """Ellipsoid with a smooth random bumpy surface; returns (box, mask in box) or None."""
    centre, radii = np.asarray(centre, float), np.asarray(radii, float)
    box = _box(axes, centre - 1.3 * radii, centre + 1.3 * radii)
    if box is None:
        return None
    u = [(g - c) / r for g, c, r in zip(grids(axes, box), centre, radii)]
    freq, phase = rng.uniform(1.0, 2.5, 3), rng.uniform(0, 2 * np.pi, 3)
    bumps = np.sin(freq[0] * np.pi * u[0] + phase[0]) * np.sin(freq[1] * np.pi * u[1] + phase[1])
    bumps = bumps + 0.5 * np.sin(freq[2] * np.pi * u[2] + phase[2])
    return box, u[0] ** 2 + u[1] ** 2 + u[2] ** 2 < 1 + lumps * bumps / 1.5


def capsule(axes, a, b, radius: float):
    """Tube of ``radius`` around the segment a-b (vessels, oesophagus); returns (box, mask) or None."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    box = _box(axes, np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if box is None:
        return None
    g = grids(axes, box)
    ab = b - a
    t = np.clip(sum((gi - ai) * di for gi, ai, di in zip(g, a, ab)) / max(float(ab @ ab), 1e-9), 0, 1)
    return box, sum((gi - ai - t * di) ** 2 for gi, ai, di in zip(g, a, ab)) < radius**2


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, cell: int = 8) -> np.ndarray:
    """Smooth random field (about unit variance) by linear upsampling of coarse noise."""
    from scipy.ndimage import zoom

    coarse = rng.normal(size=[max(2, s // cell + 2) for s in shape])
    return zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[tuple(slice(0, s) for s in shape)]


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def save_case(folder: Path, index: int, image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing=None) -> dict:
    """One synthetic case as ``image<index>.nii.gz`` and ``label<index>.nii.gz`` in ``folder`` (the benchmarks'
    ``write_case``); ``spacing`` (mm) replaces the voxel size, the anatomy staying drawn in the generator's field
    of view. Returns the datalist item."""
    if spacing is not None:
        affine = affine.copy()
        affine[:3, :3] = np.diag(np.sign(np.diag(affine)[:3]) * np.asarray(spacing, float))
    paths = {k: Path(folder) / f"{k}{index}.nii.gz" for k in ("image", "label")}
    save_nifti(image, affine, paths["image"])
    save_nifti(label, affine, paths["label"])
    return {k: str(v) for k, v in paths.items()}
