"""BTCV (Synapse multi-organ abdominal CT): checks a download and writes its datalist with the paper's split.

The dataset as downloaded::

    <dataset_dir>/RawData/Training/img/img0001.nii.gz      30 labelled CTs (0001-0010, 0021-0040)
    <dataset_dir>/RawData/Training/label/label0001.nii.gz
    <dataset_dir>/RawData/Testing/img/img0061.nii.gz       20 unlabelled CTs (0061-0080)

:func:`prepare_datalist` checks it and writes ``<dataset_dir>/datalist.json`` with paths relative
to ``dataset_dir``. The synthetic demo data in this layout: data/demo/btcv.py.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from ..io import write_json_atomic
from .common import DatasetError, progress
from .nifti_checks import grid_mismatch, label_values_problem, missing, open_nifti

BTCV_LABELS = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic veins",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
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
