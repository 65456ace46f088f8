"""BTCV (Synapse multi-organ abdominal CT): datalist with the paper's split, and synthetic demo data.

The dataset as downloaded::

    <dataset_dir>/RawData/Training/img/img0001.nii.gz      30 labelled CTs (0001-0010, 0021-0040)
    <dataset_dir>/RawData/Training/label/label0001.nii.gz
    <dataset_dir>/RawData/Testing/img/img0061.nii.gz       20 unlabelled CTs (0061-0080)

:func:`prepare_datalist` checks it and writes ``<dataset_dir>/datalist.json`` with paths relative
to ``dataset_dir``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from ..io import write_json_atomic
from .common import DatasetError, progress
from .nifti_checks import grid_mismatch, label_values_problem, missing, open_nifti
from .synthetic import blob, capsule, grids, save_nifti, smooth_field

BTCV_LABELS = {
    0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal and splenic veins",
    11: "pancreas", 12: "right adrenal gland", 13: "left adrenal gland",
}  # fmt: skip
# the 8 organs the paper reports: aorta, gallbladder, left kidney, right kidney, liver, pancreas, spleen, stomach
PAPER_ORGANS = (8, 4, 3, 2, 6, 11, 1, 7)
# TransUNet split (the paper's); MAE pre-trains on the training cases only
TRAIN_CASES = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
EVAL_CASES = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)
TEST_CASES = tuple(range(61, 81))

LAYOUT = (
    "Expected the BTCV layout as downloaded: <dataset_dir>/RawData/Training/img/img0001.nii.gz, "
    "<dataset_dir>/RawData/Training/label/label0001.nii.gz and <dataset_dir>/RawData/Testing/img/img0061.nii.gz."
)


def image_path(case: int) -> str:
    return f"RawData/Training/img/img{case:04d}.nii.gz"


def label_path(case: int) -> str:
    return f"RawData/Training/label/label{case:04d}.nii.gz"


def testing_image_path(case: int) -> str:
    return f"RawData/Testing/img/img{case:04d}.nii.gz"


def prepare_datalist(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    num_val_cases: int = 2,
    seed: int = 0,
    check_files: bool = True,
) -> dict:
    """Check a downloaded BTCV and write its decathlon-style datalist with the paper's split.

    "training" and "validation" share the paper's 18 training cases (``num_val_cases`` of them,
    drawn with ``seed``, are held out for checkpoint selection), "evaluation" holds the paper's 12
    evaluation cases and "test" the unlabelled images that are present.

    Args:
        dataset_dir: folder that contains ``RawData``.
        output: where to write the datalist; default ``<dataset_dir>/datalist.json``.
        num_val_cases: training cases moved to "validation".
        seed: seed of the validation draw.
        check_files: open every file and check labels and grids (reads each file once); when
            False only the existence of the files is checked.

    Returns:
        The datalist dict that was written.

    Raises:
        DatasetError: listing every missing or bad file and what was expected.
    """
    root = Path(dataset_dir).expanduser()
    _check_layout(root)
    if not 0 <= num_val_cases < len(TRAIN_CASES):
        raise DatasetError(f"num_val_cases must be in 0..{len(TRAIN_CASES) - 1}, got {num_val_cases}.")
    val_cases = sorted(random.Random(seed).sample(TRAIN_CASES, num_val_cases))
    train_cases = [c for c in TRAIN_CASES if c not in val_cases]

    problems: list[str] = []
    test_cases = [c for c in TEST_CASES if (root / testing_image_path(c)).is_file()]
    cases = [(c, True) for c in sorted(TRAIN_CASES + EVAL_CASES)] + [(c, False) for c in test_cases]
    if check_files:
        what = f"Reading the {len(cases)} cases of {root} (--check_files False: existence only)"
        cases = progress(cases, len(cases), what)
    for case, labelled in cases:
        if labelled:
            _check_pair(root / image_path(case), root / label_path(case), problems, check_files)
        elif check_files:
            img = open_nifti(root / testing_image_path(case), problems)
            if img is not None and len(img.shape) != 3:
                problems.append(f"{root / testing_image_path(case)}: expected a 3-D CT volume, got shape {img.shape}")
    if problems:
        raise DatasetError(f"BTCV at {root}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))

    def pairs(cases):
        return [{"image": image_path(c), "label": label_path(c)} for c in cases]

    datalist = {
        "name": "BTCV",
        "description": "Multi-Atlas Labeling Beyond the Cranial Vault, abdomen CT (Synapse)",
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "modality": {"0": "CT"},
        "tensorImageSize": "3D",
        "reported_labels": list(PAPER_ORGANS),
        "split": {
            "method": "TransUNet protocol (the paper's): 18 training / 12 evaluation cases; "
            "validation = num_val_cases training cases drawn with random.Random(seed).sample",
            "seed": seed,
            "num_val_cases": num_val_cases,
        },
        "training": pairs(train_cases),
        "validation": pairs(val_cases),
        "evaluation": pairs(EVAL_CASES),
        "test": [{"image": testing_image_path(c)} for c in test_cases],
    }
    out = write_json_atomic(datalist, output if output is not None else root / "datalist.json")
    print(
        f"BTCV datalist: {len(train_cases)} training, {len(val_cases)} validation, {len(EVAL_CASES)} evaluation, "
        f"{len(test_cases)} test -> {out}"
    )
    return datalist


def _check_layout(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(f"BTCV dataset folder {root} does not exist. {LAYOUT}")
    if not (root / "RawData" / "Training").is_dir():
        hint = " It looks like the RawData folder itself: pass its parent." if (root / "Training").is_dir() else ""
        raise DatasetError(f"{root} has no RawData/Training folder.{hint} {LAYOUT}")


def _check_pair(image: Path, label: Path, problems: list[str], check_files: bool) -> None:
    if not check_files:
        problems.extend(missing(p) for p in (image, label) if not p.is_file())
        return
    img, lab = open_nifti(image, problems), open_nifti(label, problems)
    if img is not None and len(img.shape) != 3:
        problems.append(f"{image}: expected a 3-D CT volume, got shape {img.shape}")
    elif img is not None and lab is not None:
        why = grid_mismatch(img, lab) or label_values_problem(lab, max(BTCV_LABELS))
        if why:
            problems.append(f"{label}: {why} (image {image.name})")


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
