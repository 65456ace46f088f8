"""Synthetic Medical Segmentation Decathlon-format datasets (see data/msd.py), of kinds the other demos are not,
so that the msd_seg bundle's tests show nothing is hard-wired:

    layout="mr"   Task90_DemoProstateMR: 2-channel MRI (T2, ADC), 2 labels (peripheral zone, transition zone),
                  4-D images with the channels last, RAS affines, background noise (not skull-stripped)
    layout="ct"   Task91_DemoAbdomenCT: 1-channel CT in HU, 3 labels (liver, spleen, lesion), 3-D int16 images,
                  LPS affines (as CT from DICOM), air at -1000

Each case has its own slice spacing (a few tenths of a mm apart), so the median spacing is a real median.
:func:`make_demo` writes a dataset; :func:`write_case` and :func:`network_input` give the tools single cases.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...io import write_json_atomic
from .shapes import blob, save_case, save_nifti, smooth_field

__all__ = ["LAYOUTS", "make_demo", "synthetic_case", "write_case", "network_input"]

LAYOUTS = {
    "mr": {
        "task": "Task90_DemoProstateMR",
        "name": "DemoProstateMR",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "peripheral zone", "2": "transition zone"},
        "fov": (144.0, 144.0, 80.0),
    },
    "ct": {
        "task": "Task91_DemoAbdomenCT",
        "name": "DemoAbdomenCT",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "spleen", "3": "lesion"},
        "fov": (300.0, 300.0, 120.0),
    },
}
_APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02"  # what a macOS ._ file starts with


def _frame(rng: np.random.Generator, shape: tuple[int, int, int], fov: tuple[float, ...], lps: bool):
    """(axes in mm centred on the volume, affine): field of view ``fov`` with +-5 % jitter of the slice spacing."""
    n = np.asarray(shape)
    spacing = np.asarray(fov) / n * np.array([1.0, 1.0, rng.uniform(0.9, 1.1)])
    axes = tuple((np.arange(k) - (k - 1) / 2) * sp for k, sp in zip(n, spacing))
    sign = np.array([-1.0, -1.0, 1.0]) if lps else np.ones(3)
    affine = np.diag([*(sign * spacing), 1.0])
    affine[:3, 3] = [s * a[0] for s, a in zip(sign, axes)] + rng.uniform(-20, 20, 3)
    if lps:  # voxel i runs right -> left: the patient-frame axes of the painter run the other way
        axes = (-axes[0], -axes[1], axes[2])
    return axes, affine


def _grid(axes):
    return tuple(a.reshape([-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(axes))


def _paint(label: np.ndarray, tissue: np.ndarray, b, value: int, kind: int, within=None) -> None:
    if b is None:
        return
    inside = b[1] if within is None else b[1] & within[b[0]]
    if value:
        label[b[0]][inside] = value
    tissue[b[0]][inside] = kind


def synthetic_mr(rng: np.random.Generator, shape: tuple[int, int, int] = (48, 48, 24)):
    """One pelvic MR: (float32 image (X, Y, Z, 2) T2 and ADC, uint8 label 0/1/2, RAS affine)."""
    axes, affine = _frame(rng, shape, LAYOUTS["mr"]["fov"], lps=False)
    x, y, z = _grid(axes)
    s = rng.uniform(0.85, 1.1)
    body = ((x / (65 * s)) ** 2 + (y / (50 * s)) ** 2 < 1) & (np.abs(z) < 80)
    tissue = np.where(body, 1, -1).astype(np.int8)  # -1 air, 0 fat, 1 muscle, 2 peripheral, 3 transition
    tissue[body & ((x / (55 * s)) ** 2 + (y / (40 * s)) ** 2 > 1)] = 0  # subcutaneous fat
    label = np.zeros(shape, np.uint8)
    centre = rng.normal(0, 4, 3) * np.array([1, 1, 1.5])
    gland = blob(axes, centre, s * rng.uniform(28, 34, 3) * np.array([1.2, 0.9, 1.0]), rng, 0.15)
    _paint(label, tissue, gland, 1, 2)
    inner = blob(axes, centre + np.array([0, 8 * s, 0]), s * rng.uniform(16, 20, 3), rng, 0.1)  # anterior
    mask = np.zeros(shape, bool)
    if gland is not None:
        mask[gland[0]] = gland[1]
    _paint(label, tissue, inner, 2, 3, within=mask)
    texture, bias = smooth_field(tuple(shape), rng, cell=4), 1 + 0.15 * smooth_field(tuple(shape), rng, cell=12)
    signal = np.array([[1.0, 0.45, 1.3, 0.65], [0.25, 0.55, 1.0, 0.7]])  # T2, ADC of fat, muscle, PZ, TZ
    image = np.zeros((*shape, 2), np.float32)
    inside = tissue >= 0
    for c in range(2):
        values = signal[c] * rng.uniform(0.9, 1.1, 4)
        gain = rng.uniform(200, 900)
        channel = np.abs(rng.normal(0, 0.03, shape))  # Rician-like background noise: not zero
        channel[inside] = values[tissue[inside]] * (1 + 0.08 * texture[inside]) + rng.normal(0, 0.04, inside.sum())
        image[..., c] = np.clip(gain * channel * bias, 0, None)
    return image, label, affine


def synthetic_ct(rng: np.random.Generator, shape: tuple[int, int, int] = (48, 48, 24)):
    """One abdominal CT: (int16 HU image, uint8 label 0..3, LPS affine)."""
    axes, affine = _frame(rng, shape, LAYOUTS["ct"]["fov"], lps=True)
    x, y, z = _grid(axes)
    s = rng.uniform(0.85, 1.05)
    body = (x / (135 * s)) ** 2 + (y / (100 * s)) ** 2 < 1
    tissue = np.where(np.broadcast_to(body, shape), 1, -1).astype(np.int8)  # -1 air, 0 fat, 1 muscle, 2.. organs
    tissue[np.broadcast_to(body & ((x / (120 * s)) ** 2 + (y / (86 * s)) ** 2 > 1), shape)] = 0
    label = np.zeros(shape, np.uint8)
    liver = blob(
        axes,
        np.array([-50, 5, 0]) * s + rng.normal(0, 5, 3),
        s * np.array([55, 50, 45]) * rng.uniform(0.85, 1.1, 3),
        rng,
    )
    _paint(label, tissue, liver, 1, 2)
    spleen = blob(
        axes,
        np.array([70, -25, 5]) * s + rng.normal(0, 5, 3),
        s * np.array([25, 35, 35]) * rng.uniform(0.85, 1.1, 3),
        rng,
    )
    _paint(label, tissue, spleen, 2, 3)
    mask = label == 1
    lesion = blob(axes, np.array([-50, 5, 0]) * s + rng.normal(0, 10, 3), rng.uniform(20, 28, 3), rng, 0.2)
    _paint(label, tissue, lesion, 3, 4, within=mask)
    hu = np.array([-100.0, 45.0, 95.0, 135.0, 20.0]) + rng.normal(0, 5, 5)  # fat, muscle, liver, spleen, lesion
    texture = smooth_field(tuple(shape), rng, cell=4)
    image = np.full(shape, -1000.0)
    inside = tissue >= 0
    image[inside] = hu[tissue[inside]] + 8 * texture[inside] + rng.normal(0, 12, inside.sum())
    return np.round(image).astype(np.int16), label, affine


def synthetic_case(layout: str, rng: np.random.Generator, shape: tuple[int, int, int]):
    """(image, label, affine) of one case of ``layout`` ("mr" or "ct")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    return (synthetic_mr if layout == "mr" else synthetic_ct)(rng, tuple(shape))


def make_demo(
    out_dir: str | os.PathLike,
    layout: str = "mr",
    num_cases: int = 16,
    num_test_cases: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 48, 24),
) -> str:
    """Write a small synthetic MSD-format dataset.

    ``<out_dir>/<task>/{dataset.json, imagesTr, labelsTr, imagesTs}`` (task: Task90_DemoProstateMR or
    Task91_DemoAbdomenCT) with cases ``<name>_001..`` and test cases after them, plus a macOS ``._`` file as
    archives made on a Mac have.

    Args:
        out_dir: folder in which the task folder is created.
        layout: "mr" (2-channel MR, 2 labels) or "ct" (1-channel CT, 3 labels); see the module docstring.
        num_cases: labelled cases.
        num_test_cases: unlabelled cases in ``imagesTs``.
        seed: base seed; each case has its own stream.
        shape: voxels per case (the field of view is fixed: ~3 mm voxels for MR, ~6 mm for CT at the default).

    Returns:
        The task folder (the ``dataset_dir`` of data.msd.prepare_datalist).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    spec = LAYOUTS[layout]
    root = Path(out_dir) / spec["task"]
    training, test = [], []
    for case in range(1, num_cases + num_test_cases + 1):
        image, label, affine = synthetic_case(layout, np.random.default_rng([seed, case]), tuple(shape))
        name = f"{spec['name'].lower()}_{case:03d}.nii.gz"
        if case <= num_cases:
            save_nifti(image, affine, root / "imagesTr" / name)
            save_nifti(label, affine, root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            save_nifti(image, affine, root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    (root / "imagesTr" / f"._{spec['name'].lower()}_001.nii.gz").write_bytes(_APPLE_DOUBLE + bytes(range(32)))
    dataset = {
        "name": spec["name"],
        "description": f"Synthetic {layout.upper()} demo data in the Medical Segmentation Decathlon layout",
        "reference": "selfmedmae_components/data/demo/msd.py",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "4D" if len(spec["modality"]) > 1 else "3D",
        "modality": spec["modality"],
        "labels": spec["labels"],
        "numTraining": num_cases,
        "numTest": num_test_cases,
        "training": training,
        "test": test,
    }
    write_json_atomic(dataset, root / "dataset.json")
    return str(root)


def write_case(
    folder: Path, index: int, rng: np.random.Generator, shape: tuple[int, ...], spacing=None, layout: str = "mr"
) -> dict:
    """One synthetic case of ``shape`` voxels as NIfTI files in ``folder``; ``spacing`` (mm) replaces the
    generator's voxel size. Returns the datalist item."""
    return save_case(folder, index, *synthetic_case(layout, rng, tuple(shape)), spacing)


def network_input(rng: np.random.Generator, shape: tuple[int, ...], layout: str = "mr") -> np.ndarray:
    """A (C, *shape) float32 case as the network sees it: z-scored MR channels, or CT windowed to [0, 1]."""
    image = synthetic_case(layout, rng, tuple(shape))[0].astype(np.float32)
    if layout == "ct":
        return np.clip((image[None] - 0.0) / 150.0, 0, 1)
    image = np.moveaxis(image, -1, 0)
    return (image - image.mean(axis=(1, 2, 3), keepdims=True)) / (image.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
