"""Synthetic MSD Task01_BrainTumour in the download layout (see data/brats.py): 4-channel glioma MRI.

:func:`make_demo` writes the demo dataset; :func:`write_case` and :func:`network_input` give the tools
(benchmark.py, data_benchmark.py) single cases in any grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...io import write_json_atomic
from .shapes import blob, save_case, save_nifti, smooth_field

# relative signal of each tissue per modality (FLAIR, T1w, T1gd, T2w); the tumour parts differ
# by modality as in glioma MRI: edema bright on FLAIR/T2, enhancing rim bright on T1gd only
_TISSUES = ("csf", "grey", "white", "edema", "non-enhancing", "enhancing", "skull", "scalp")
_SIGNAL = np.array(
    [
        [0.15, 0.75, 0.60, 1.30, 0.90, 0.95, 0.05, 0.70],  # FLAIR: CSF suppressed
        [0.25, 0.65, 0.85, 0.50, 0.35, 0.55, 0.10, 0.90],  # T1w
        [0.25, 0.65, 0.85, 0.50, 0.30, 1.45, 0.10, 0.90],  # T1gd: enhancing tumour lights up
        [1.50, 0.80, 0.55, 1.20, 1.30, 0.90, 0.05, 0.50],  # T2w: CSF bright
    ]
)


def synthetic_brain(rng: np.random.Generator, shape: tuple[int, int, int] = (64, 64, 48), skull_stripped: bool = True):
    """One synthetic glioma case: (float32 image (X, Y, Z, 4), uint8 MSD label, affine).

    Brain ellipsoid with grey/white matter texture, cortex with sulci, two lateral ventricles and
    a tumour (edema around an enhancing rim around a non-enhancing core) at a random place and
    size. The field of view is fixed at 192 x 192 x 144 mm, so the default shape gives 3 mm
    isotropic voxels (the real data are 1 mm; 3 mm keeps CPU demos fast). RAS diagonal affine.
    Background is exactly 0 (as in the skull-stripped MSD images); ``skull_stripped=False`` adds
    a skull and scalp.
    """
    n = np.asarray(shape)
    spacing = np.array([192.0, 192.0, 144.0]) / n
    axes = tuple((np.arange(k) - (k - 1) / 2) * sp for k, sp in zip(n, spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    x, y, z = (a.reshape([-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(axes))

    s, c = rng.uniform(0.85, 1.0), rng.normal(0, 3, 3)
    radii = s * np.array([65.0, 80.0, 60.0])
    r = np.sqrt(((x - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 + ((z - c[2]) / radii[2]) ** 2)
    tissue = np.full(shape, -1, np.int8)  # index into _TISSUES, -1 = background
    if not skull_stripped:
        tissue[r < 1.15] = 7
        tissue[r < 1.08] = 6
    brain = r < 1.0
    tissue[brain] = 1
    texture, sulci = smooth_field(tuple(shape), rng, cell=6), smooth_field(tuple(shape), rng, cell=3)
    tissue[brain & (r < 0.88) & (texture < 0.9)] = 2  # white matter with deep grey islands
    tissue[brain & (r > 0.88) & (sulci > 1.0)] = 0  # CSF in the sulci
    for side in (-1, 1):  # lateral ventricles
        b = blob(axes, c + s * np.array([side * 11, 5, 10]), s * np.array([6, 24, 10]), rng, 0.1)
        tissue[b[0]][b[1]] = 0

    label = np.zeros(shape, np.uint8)
    direction = rng.normal(size=3)
    centre = c + radii * 0.45 * rng.uniform(0.2, 1) * direction / np.linalg.norm(direction)
    r_edema = rng.uniform(24, 38) * s
    r_core = rng.uniform(0.5, 0.7) * r_edema
    core_centre = centre + rng.normal(0, 0.1 * r_edema, 3)
    parts = (  # (label, tissue, centre, radius, bumpiness), outermost first
        (1, 3, centre, r_edema, 0.35),
        (3, 5, core_centre, r_core, 0.2),
        (2, 4, core_centre + rng.normal(0, 0.1 * r_core, 3), rng.uniform(0.5, 0.75) * r_core, 0.2),
    )
    for value, kind, at, radius, lumps in parts:
        b = blob(axes, at, radius * rng.uniform(0.85, 1.15, 3), rng, lumps)
        inside = b[1] & brain[b[0]]
        label[b[0]][inside] = value
        tissue[b[0]][inside] = kind

    bias = 1 + 0.1 * smooth_field(tuple(shape), rng, cell=16)  # coil inhomogeneity
    image = np.zeros((*shape, 4), np.float32)
    head = tissue >= 0
    for m in range(4):
        signal = _SIGNAL[m] * rng.uniform(0.9, 1.1, len(_TISSUES))  # per-case contrast variation
        gain = rng.uniform(300, 1200)
        values = signal[tissue[head]] * (1 + 0.05 * texture[head]) * bias[head] + rng.normal(0, 0.03, head.sum())
        image[..., m][head] = np.clip(gain * values, 0, None)
    return image, label, affine


_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02"  # what a ._ file starts with


def make_demo(
    out_dir: str | os.PathLike,
    num_cases: int = 24,
    num_test_cases: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 64, 48),
    skull_stripped: bool = True,
) -> str:
    """Write a small synthetic MSD Task01_BrainTumour in the download layout.

    ``<out_dir>/Task01_BrainTumour/{dataset.json, imagesTr, labelsTr, imagesTs}`` with cases
    BRATS_001.. and test cases from BRATS_485, plus macOS ``._`` resource files as the real tar
    has. See :func:`synthetic_brain` for the images (3 mm voxels at the default shape).

    Args:
        out_dir: folder in which ``Task01_BrainTumour`` is created.
        num_cases: labelled cases.
        num_test_cases: unlabelled cases in ``imagesTs``.
        seed: base seed; each case has its own stream.
        shape: voxels per case (field of view fixed).
        skull_stripped: as the real data (True) or with skull and scalp.

    Returns:
        The ``Task01_BrainTumour`` folder (the ``dataset_dir`` of :func:`prepare_datalist`).
    """
    root = Path(out_dir) / "Task01_BrainTumour"
    training, test = [], []
    for case in range(1, num_cases + 1):
        image, label, affine = synthetic_brain(np.random.default_rng([seed, case]), tuple(shape), skull_stripped)
        name = f"BRATS_{case:03d}.nii.gz"
        save_nifti(image, affine, root / "imagesTr" / name)
        save_nifti(label, affine, root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    for case in range(485, 485 + num_test_cases):
        image, _, affine = synthetic_brain(np.random.default_rng([seed, case]), tuple(shape), skull_stripped)
        save_nifti(image, affine, root / "imagesTs" / f"BRATS_{case}.nii.gz")
        test.append(f"./imagesTs/BRATS_{case}.nii.gz")
    for junk in ("imagesTr/._BRATS_001.nii.gz", "imagesTr/._BRATS_002.nii.gz", "labelsTr/._BRATS_001.nii.gz"):
        (root / junk).write_bytes(_APPLE_DOUBLE + bytes(range(32)))
    dataset = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images (synthetic demo data)",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "2.0 04/05/2018",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": num_cases,
        "numTest": num_test_cases,
        "training": training,
        "test": test,
    }
    write_json_atomic(dataset, root / "dataset.json")
    return str(root)


def write_case(folder: Path, index: int, rng: np.random.Generator, shape: tuple[int, ...], spacing=None) -> dict:
    """One synthetic case of ``shape`` voxels as NIfTI files in ``folder``; ``spacing`` (mm) replaces the
    generator's voxel size (the anatomy is drawn in the generator's field of view). Returns the datalist item."""
    return save_case(folder, index, *synthetic_brain(rng, tuple(shape)), spacing)


def network_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A (4, *shape) float32 MRI case, each channel normalised to zero mean and unit variance."""
    image = np.moveaxis(synthetic_brain(rng, tuple(shape))[0].astype(np.float32), -1, 0)
    return (image - image.mean(axis=(1, 2, 3), keepdims=True)) / (image.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
