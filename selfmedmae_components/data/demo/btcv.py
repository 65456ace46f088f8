"""Synthetic BTCV in the download layout (see data/btcv.py): abdominal CTs with the 13 organ labels.

:func:`make_demo` writes the demo dataset; :func:`write_case` and :func:`network_input` give the tools
(benchmark.py, data_benchmark.py) single cases in any grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..btcv import EVAL_CASES, TEST_CASES, TRAIN_CASES, image_path, label_path, testing_image_path
from .shapes import blob, capsule, grids, save_case, save_nifti, smooth_field


def synthetic_ct(rng: np.random.Generator, shape: tuple[int, int, int] = (128, 128, 48)):
    """One synthetic abdominal CT: (int16 HU image, uint8 label with BTCV values, affine).

    The field of view is fixed (in-plane 320-410 mm, 190-240 mm along z), so the voxel spacing
    is that divided by ``shape``: 2.5-3.2 mm in-plane and 4-5 mm slices at the default shape.
    The affine is diagonal with the first two axes flipped (LPS voxel order, as CT from DICOM).
    """
    n = np.asarray(shape)
    spacing = np.array([rng.uniform(2.5, 3.2)] * 2 + [rng.uniform(4.0, 5.0)]) * np.array([128, 128, 48]) / n
    # patient-frame axes centred on the volume: i runs right->left, j anterior->posterior, k up
    axes = (
        ((n[0] - 1) / 2 - np.arange(n[0])) * spacing[0],
        ((n[1] - 1) / 2 - np.arange(n[1])) * spacing[1],
        (np.arange(n[2]) - (n[2] - 1) / 2) * spacing[2],
    )
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [a[0] for a in axes]  # voxel 0 sits at the first coordinate of each axis
    affine[:3, 3] += rng.uniform(-30, 30, 3)  # scanner origin: arbitrary, not the body centre
    x, y, z = (a.reshape([-1 if i == j else 1 for j in range(3)]) for i, a in enumerate(axes))

    s = rng.uniform(0.85, 1.05)  # body size; organs scale with it
    bx, by, bz = rng.normal(0, 5), rng.normal(0, 5), rng.normal(0, 10)
    rho = np.broadcast_to(np.sqrt(((x - bx) / (140 * s)) ** 2 + ((y - by) / (100 * s)) ** 2), shape)  # body radius 0..1
    theta = np.degrees(np.arctan2(x - bx, y - by))  # 0 = anterior
    img = np.full(shape, -1000.0)
    img[rho < 1.0] = -100  # subcutaneous fat
    img[rho < 0.93] = 50  # abdominal wall muscle
    cavity = rho < 0.8
    bowel = smooth_field(tuple(shape), rng) > 0.3  # loops of bowel in mesenteric fat
    img[cavity] = np.where(bowel, 30.0, -90.0)[cavity]
    ribs = (rho > 0.8) & (rho < 0.86) & (np.abs(theta) > 35) & (z - bz > -40)
    img[ribs & ((z + 0.4 * np.abs(theta)) % 30 < 9)] = 700
    label = np.zeros(shape, np.uint8)
    contrast = rng.uniform(0.6, 1.2)  # contrast phase: how bright vessels and kidney cortex are

    def at(p):  # organ position: body centre + scaled offset + jitter
        return np.array([bx, by, bz]) + s * np.asarray(p, float) + rng.normal(0, 4, 3)

    def size(r):
        return s * rng.uniform(0.9, 1.1) * np.asarray(r, float)

    def paint(shape_mask, hu, value=0, organ=True):
        if shape_mask is None:
            return
        box, m = shape_mask
        if organ:
            m = m & cavity[box]
        img[box][m] = hu + rng.normal(0, 5)
        if value:
            label[box][m] = value

    # spine and back muscles (background label): vertebral bodies with discs, arch, canal
    top, bottom = axes[2].max() + 20, axes[2].min() - 20
    for side in (-1, 1):
        paint(capsule(axes, at([side * 30, -78, bottom]), at([side * 30, -78, top]), 16 * s), 55, organ=False)
        paint(capsule(axes, at([side * 25, -42, bottom]), at([side * 30, -40, -20]), 11 * s), 50, organ=False)
    spine = at([0, -50, 0])

    def column(dy, radius):  # vertical tube behind the vertebral body centre
        return capsule(axes, (spine[0], spine[1] + dy, bottom), (spine[0], spine[1] + dy, top), radius * s)

    vert = column(0, 18)
    paint(vert, 700, organ=False)  # cortical bone
    paint(column(0, 15), 250, organ=False)  # cancellous bone
    if vert is not None:
        box, m = vert
        img[box][m & ((grids(axes, box)[2] + bz) % 32 < 6)] = 90  # intervertebral discs
    paint(column(-27, 9), 500, organ=False)  # vertebral arch
    paint(column(-23, 6), 20, organ=False)  # spinal canal

    # organs, painted so that the small ones (vessels, adrenals) end on top
    paint(blob(axes, at([55, 5, 35]), size([60, 70, 55]), rng), 55 + 20 * contrast, 6)  # liver
    paint(blob(axes, at([-80, -25, 45]), size([22, 40, 40]), rng), 45 + 30 * contrast, 1)  # spleen
    stomach = at([-50, 35, 45]), size([38, 32, 40])
    paint(blob(axes, *stomach, rng), 45, 7)  # stomach wall
    paint(blob(axes, stomach[0], 0.7 * stomach[1], rng, 0.05), 15)  # fluid contents
    paint(blob(axes, stomach[0] + [0, 0.5 * stomach[1][1], 0.4 * stomach[1][2]], 0.35 * stomach[1], rng, 0), -900)
    for value, side, zc in ((2, 1, -35), (3, -1, -25)):  # right kidney sits lower (liver above it)
        c, r = at([side * 55, -35, zc]), size([24, 26, 48])
        paint(blob(axes, c, r, rng, 0.05), 35 + 150 * contrast, value)  # cortex
        paint(blob(axes, c + [-side * 6, 0, 0], 0.55 * r, rng, 0.05), 30, value)  # medulla and pelvis
    paint(blob(axes, at([45, 45, -5]), size([15, 20, 26]), rng, 0.05), 10, 4)  # gallbladder
    paint(capsule(axes, at([22, 0, -5]), at([-10, -5, 5]), 13 * s), 45, 11)  # pancreas head and body
    paint(capsule(axes, at([-10, -5, 5]), at([-62, -20, 15]), 10 * s), 45, 11)  # pancreas tail
    hiatus = at([-14, -24, 65])
    paint(capsule(axes, at([-32, 12, 42]), hiatus, 8 * s), 40, 5)  # oesophagus down to the stomach
    paint(capsule(axes, hiatus, at([-12, -28, top]), 9 * s), 40, 5)
    paint(capsule(axes, at([10, -5, 0]), at([35, 5, 28]), 7 * s), 40 + 110 * contrast, 10)  # portal vein
    paint(capsule(axes, at([10, -12, 8]), at([-65, -22, 18]), 5 * s), 40 + 110 * contrast, 10)  # splenic vein
    paint(capsule(axes, at([20, -22, bottom]), at([22, -18, 60]), 12 * s), 40 + 90 * contrast, 9)  # IVC
    paint(capsule(axes, at([-14, -22, bottom]), at([-10, -20, top]), 11 * s), 40 + 160 * contrast, 8)  # aorta
    paint(blob(axes, at([38, -28, 28]), size([6, 9, 14]), rng, 0.05), 25, 12)  # right adrenal
    paint(blob(axes, at([-38, -28, 38]), size([6, 9, 14]), rng, 0.05), 25, 13)  # left adrenal

    img[rho < 1.0] += 8 * smooth_field(tuple(shape), rng, cell=4)[rho < 1.0] + rng.normal(0, 10, (rho < 1.0).sum())
    img[rho >= 1.0] += rng.normal(0, 5, (rho >= 1.0).sum())
    return np.clip(np.round(img), -1024, 3071).astype(np.int16), label, affine


def make_demo(
    out_dir: str | os.PathLike, num_test_cases: int = 2, seed: int = 0, shape: tuple[int, int, int] = (128, 128, 48)
) -> str:
    """Write a small synthetic BTCV in exactly the download layout (see :func:`synthetic_ct`).

    All 30 labelled cases (the ids of TRAIN_CASES and EVAL_CASES) and ``num_test_cases``
    unlabelled cases from 0061. Each case has its own random stream, so a case does not change
    with ``num_test_cases``.

    Args:
        out_dir: the dataset folder to create (it will contain ``RawData``).
        num_test_cases: unlabelled cases to write (0..20).
        seed: base seed.
        shape: voxels per case; the field of view is fixed, so smaller shapes mean coarser voxels.

    Returns:
        ``out_dir`` as a string.
    """
    root = Path(out_dir)
    if not 0 <= num_test_cases <= len(TEST_CASES):
        raise ValueError(f"num_test_cases must be in 0..{len(TEST_CASES)}, got {num_test_cases}.")
    for case in sorted(TRAIN_CASES + EVAL_CASES) + list(TEST_CASES[:num_test_cases]):
        image, label, affine = synthetic_ct(np.random.default_rng([seed, case]), tuple(shape))
        labelled = case not in TEST_CASES
        save_nifti(image, affine, root / (image_path(case) if labelled else testing_image_path(case)))
        if labelled:
            save_nifti(label, affine, root / label_path(case))
    return str(root)


def write_case(folder: Path, index: int, rng: np.random.Generator, shape: tuple[int, ...], spacing=None) -> dict:
    """One synthetic case of ``shape`` voxels as NIfTI files in ``folder``; ``spacing`` (mm) replaces the
    generator's voxel size (the anatomy is drawn in the generator's field of view). Returns the datalist item."""
    return save_case(folder, index, *synthetic_ct(rng, tuple(shape)), spacing)


def network_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A (1, *shape) float32 CT scaled as the bundle's preprocessing scales it (HU -175..250 to 0..1)."""
    image = synthetic_ct(rng, tuple(shape))[0].astype(np.float32)
    return np.clip((image + 175) / 425, 0, 1)[None]
