"""MSD Task01_BrainTumour (BraTS subset of the Medical Segmentation Decathlon): datalist with a
saved seeded split, and synthetic demo data.

The dataset as downloaded (``Task01_BrainTumour.tar``)::

    Task01_BrainTumour/dataset.json
    Task01_BrainTumour/imagesTr/BRATS_001.nii.gz   4-D (240, 240, 155, 4): FLAIR, T1w, T1gd, T2w
    Task01_BrainTumour/labelsTr/BRATS_001.nii.gz   3-D, 0 background, 1 edema, 2 non-enhancing, 3 enhancing
    Task01_BrainTumour/imagesTs/BRATS_485.nii.gz
    Task01_BrainTumour/imagesTr/._BRATS_001.nii.gz macOS resource forks, not images: ignored

The cases are the ones listed in ``dataset.json``; nothing is picked up by scanning folders.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import numpy as np

from .nifti_checks import grid_mismatch, label_values_problem, missing, open_nifti
from .synthetic import blob, save_nifti, smooth_field
from ..io import write_json_atomic
from .common import DatasetError, progress

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

    perm = np.random.default_rng(seed).permutation(n)
    evaluation, validation, training = np.split(perm, [n_eval, n_eval + n_val])
    datalist = {
        "name": "MSD Task01_BrainTumour",
        "description": "Gliomas (BraTS 2016/2017 subset of the Medical Segmentation Decathlon), multi-modal MRI",
        "labels": {str(k): v for k, v in MSD_LABELS.items()},
        "modality": {str(i): m for i, m in enumerate(MODALITIES)},
        "tensorImageSize": "4D",
        "split": {
            "method": "numpy.random.default_rng(seed).permutation of the dataset.json cases sorted by image path: "
            "first round(n * eval_fraction) -> evaluation, next num_val_cases -> validation, rest -> training",
            "seed": seed,
            "eval_fraction": eval_fraction,
            "num_val_cases": n_val,
        },
        "training": [pairs[i] for i in sorted(training)],
        "validation": [pairs[i] for i in sorted(validation)],
        "evaluation": [pairs[i] for i in sorted(evaluation)],
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


# ----------------------------------------------------------------------------------------------
# Synthetic demo data in the download layout.

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
