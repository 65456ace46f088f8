"""MSD Task01_BrainTumour (BraTS subset of the Medical Segmentation Decathlon): checks a download and
writes its datalist with a saved seeded split.

The dataset as downloaded (``Task01_BrainTumour.tar``)::

    Task01_BrainTumour/dataset.json
    Task01_BrainTumour/imagesTr/BRATS_001.nii.gz   4-D (240, 240, 155, 4): FLAIR, T1w, T1gd, T2w
    Task01_BrainTumour/labelsTr/BRATS_001.nii.gz   3-D, 0 background, 1 edema, 2 non-enhancing, 3 enhancing
    Task01_BrainTumour/imagesTs/BRATS_485.nii.gz
    Task01_BrainTumour/imagesTr/._BRATS_001.nii.gz macOS resource forks, not images: ignored

The cases are the ones listed in ``dataset.json``; nothing is picked up by scanning folders.
The synthetic demo data in this layout: data/demo/brats.py.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

from ..io import write_json_atomic
from .common import DatasetError, progress, seeded_split, split_record
from .nifti_checks import grid_mismatch, label_values_problem, missing, open_nifti

MSD_LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}
MODALITIES = ("FLAIR", "T1w", "T1gd", "T2w")
LAYOUT = (
    "Expected the MSD layout as downloaded: <dataset_dir>/dataset.json, <dataset_dir>/imagesTr/BRATS_001.nii.gz "
    "(4-D, 4 modalities), <dataset_dir>/labelsTr/BRATS_001.nii.gz, with dataset_dir = .../Task01_BrainTumour."
)
_LABEL_HINTS = {4: "BraTS challenge labels (4 = enhancing) -- MSD uses 3"}


def _rel(path: str) -> str:
    """dataset.json writes "./imagesTr/x.nii.gz"; keep paths relative to dataset_dir, normalised."""
    return posixpath.normpath(path)


def _is_resource_fork(path: str) -> bool:
    return posixpath.basename(path).startswith("._")


def _read_dataset_json(root: Path) -> tuple[list[dict], list[str]]:
    """The labelled pairs and test images listed in ``dataset.json``, macOS ``._`` files skipped."""
    if not root.is_dir():
        raise DatasetError(f"MSD BrainTumour dataset folder {root} does not exist. {LAYOUT}")
    path = root / "dataset.json"
    if not path.is_file():
        hint = " Pass its Task01_BrainTumour subfolder." if (root / "Task01_BrainTumour").is_dir() else ""
        raise DatasetError(f"{path}: missing.{hint} {LAYOUT}")
    try:
        meta = json.loads(path.read_text())
        pairs = [{"image": _rel(t["image"]), "label": _rel(t["label"])} for t in meta["training"]]
        tests = [_rel(t["image"] if isinstance(t, dict) else t) for t in meta.get("test", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f'{path}: not a valid MSD dataset.json (expected "training": [{{"image": ..., "label": ...}}], '
            f'"test": [...]): {type(e).__name__}: {e}'
        ) from e
    pairs = sorted((p for p in pairs if not _is_resource_fork(p["image"])), key=lambda p: p["image"])
    return pairs, sorted(t for t in tests if not _is_resource_fork(t))


def prepare_datalist(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    eval_fraction: float = 0.2,
    num_val_cases: int | None = None,
    seed: int = 12345,
    check_files: bool = True,
) -> dict:
    """Check a downloaded MSD Task01_BrainTumour and write its datalist with a seeded split.

    The labelled cases of ``dataset.json`` (sorted by path) are permuted with
    ``numpy.random.default_rng(seed)``: the first ``round(n * eval_fraction)`` are "evaluation"
    (held out, never used for checkpoint selection), the next ``num_val_cases`` "validation", the
    rest "training". The same seed and files always give the same split, and the split is saved in
    the datalist. "test" lists the present images of ``imagesTs``.

    Args:
        dataset_dir: the ``Task01_BrainTumour`` folder (the one with ``dataset.json``).
        output: where to write the datalist; default ``<dataset_dir>/datalist.json``.
        eval_fraction: share of the labelled cases held out for evaluation (the paper: 0.2).
        num_val_cases: cases of the training part used for validation; default 10% of it, at least 1.
        seed: seed of the permutation.
        check_files: open every file (reads each once) and check shapes, grids and label values;
            when False only the existence of the files is checked.

    Returns:
        The datalist dict that was written.

    Raises:
        DatasetError: listing every missing or bad file and what was expected.
    """
    root = Path(dataset_dir).expanduser()
    pairs, tests = _read_dataset_json(root)
    n = len(pairs)
    if not 0 <= eval_fraction < 1:
        raise DatasetError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    n_eval = int(round(n * eval_fraction))
    n_val = max(1, int(round(0.1 * (n - n_eval)))) if num_val_cases is None else num_val_cases
    if not 0 <= n_val < n - n_eval:
        raise DatasetError(
            f"{root / 'dataset.json'} lists {n} labelled cases: too few for {n_eval} evaluation and "
            f"{n_val} validation cases with at least one left for training."
        )

    problems: list[str] = []
    tests = [t for t in tests if (root / t).is_file()]
    cases = [(p["image"], p["label"]) for p in pairs] + [(t, None) for t in tests]
    if check_files:
        what = f"Reading the {len(cases)} cases of {root} (--check_files False: existence only)"
        cases = progress(cases, len(cases), what)
    for image, label in cases:
        if label is not None:
            _check_pair(root / image, root / label, problems, check_files)
        elif check_files:
            img = open_nifti(root / image, problems)
            if img is not None and (len(img.shape) != 4 or img.shape[3] != 4):
                problems.append(f"{root / image}: {_expected_image(img.shape)}")
    if problems:
        raise DatasetError(f"MSD BrainTumour at {root}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))

    training, validation, evaluation = seeded_split(n, n_eval, n_val, seed)
    datalist = {
        "name": "MSD Task01_BrainTumour",
        "description": "Gliomas (BraTS 2016/2017 subset of the Medical Segmentation Decathlon), multi-modal MRI",
        "labels": {str(k): v for k, v in MSD_LABELS.items()},
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "tensorImageSize": "4D",
        "split": split_record(seed, eval_fraction, n_val),
        "training": [pairs[i] for i in training],
        "validation": [pairs[i] for i in validation],
        "evaluation": [pairs[i] for i in evaluation],
        "test": [{"image": t} for t in tests],
    }
    out = write_json_atomic(datalist, output if output is not None else root / "datalist.json")
    print(
        f"MSD BrainTumour datalist: {len(training)} training, {len(validation)} validation, "
        f"{len(evaluation)} evaluation, {len(tests)} test -> {out}"
    )
    return datalist


def _expected_image(shape: tuple) -> str:
    return f"expected a 4-D image with 4 channels ({', '.join(MODALITIES)}) in the last axis, got shape {shape}"


def _check_pair(image: Path, label: Path, problems: list[str], check_files: bool) -> None:
    if not check_files:
        problems.extend(missing(p) for p in (image, label) if not p.is_file())
        return
    img, lab = open_nifti(image, problems), open_nifti(label, problems)
    if img is not None and (len(img.shape) != 4 or img.shape[3] != 4):
        problems.append(f"{image}: {_expected_image(img.shape)}")
    elif img is not None and lab is not None:
        if len(lab.shape) != 3:
            why = f"expected a 3-D label map, got shape {lab.shape}"
        else:
            why = grid_mismatch(img, lab) or label_values_problem(lab, max(MSD_LABELS), _LABEL_HINTS)
        if why:
            problems.append(f"{label}: {why} (image {image.name})")
