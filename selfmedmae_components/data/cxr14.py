"""NIH ChestX-ray14: checks a download and writes its datalist (official split, patient-wise validation).

The dataset as downloaded::

    <dataset_dir>/images/00000001_000.png ...   (the Kaggle mirror's images_0NN/images/ also works)
    <dataset_dir>/Data_Entry_2017.csv           (Image Index, Finding Labels, Patient ID, ...)
    <dataset_dir>/train_val_list.txt            (86,524 images, official)
    <dataset_dir>/test_list.txt                 (25,596 images, official)

:func:`prepare_datalist` turns it into ``<dataset_dir>/datalist.json``; data/demo/cxr14.py writes a
small synthetic set in exactly that layout.
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import write_json_atomic
from .common import DatasetError, progress

__all__ = ["CLASSES", "parse_findings", "split_by_patient", "prepare_datalist"]

CLASSES = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
CSV_NAME, TRAIN_VAL_LIST, TEST_LIST = "Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"
CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
LAYOUT = f"expected the NIH ChestX-ray14 layout: images/*.png, {CSV_NAME}, {TRAIN_VAL_LIST}, {TEST_LIST}"
_SHOW = 10  # how many offending names an error lists before giving the count


def _some(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


# ----------------------------------------------------------------------------------- labels
def parse_findings(text: str) -> list[float]:
    """``Finding Labels`` text -> multi-hot list over :data:`CLASSES`.

    Args:
        text: labels joined by ``|`` (e.g. ``"Cardiomegaly|Effusion"``) or ``"No Finding"``.

    Raises:
        DatasetError: an unknown label, an empty field, or "No Finding" combined with findings.
    """
    names = [t.strip() for t in str(text).split("|")]
    if names == [NO_FINDING]:
        return [0.0] * len(CLASSES)
    if "" in names or NO_FINDING in names:
        raise DatasetError(f"bad finding labels {text!r}: expected '{NO_FINDING}' or labels joined by '|'")
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise DatasetError(f"unknown finding label(s) {unknown} in {text!r}; expected some of {list(CLASSES)}")
    return [float(c in names) for c in CLASSES]


# ---------------------------------------------------------------------------------- reading
def _read_entries(csv_path: Path) -> dict[str, tuple[list[float], str]]:
    """Image Index -> (multi-hot label, Patient ID)."""
    if not csv_path.is_file():
        raise DatasetError(f"label file not found: {csv_path}; {LAYOUT}")
    entries: dict[str, tuple[list[float], str]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path} lacks column(s) {missing}; expected a header with "
                f"{list(REQUIRED_COLUMNS)} (found {header})"
            )
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(col.values()):
                raise DatasetError(f"{csv_path}, line {line}: {len(row)} fields, expected {len(header)}")
            name, findings, patient = (row[col[c]].strip() for c in REQUIRED_COLUMNS)
            try:
                label = parse_findings(findings)
            except DatasetError as e:
                raise DatasetError(f"{csv_path}, line {line} ({name}): {e}") from None
            if name in entries:
                raise DatasetError(f"{csv_path}, line {line}: image {name} listed twice")
            entries[name] = (label, patient)
    return entries


def _read_list(path: Path, entries: dict) -> list[str]:
    """Image names of an official split file, each of which must be in the CSV."""
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}; {LAYOUT}")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise DatasetError(f"{path} names {len(unknown)} image(s) absent from {CSV_NAME}: {_some(unknown)}")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path} lists some images more than once")
    return names


def _index_images(dataset_dir: Path) -> dict[str, str]:
    """File name -> path relative to ``dataset_dir``, from images/ and the Kaggle images_*/images/."""
    dirs = [dataset_dir / "images"] + sorted(dataset_dir.glob("images_*/images"))
    index: dict[str, str] = {}
    for d in reversed(dirs):  # images/ last, so it wins over a mirror copy
        if d.is_dir():
            rel = d.relative_to(dataset_dir).as_posix()
            index.update({e.name: f"{rel}/{e.name}" for e in os.scandir(d) if e.is_file()})
    return index


def _decode_error(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()  # decode fully: a truncated download fails only here
    except Exception as e:  # any reason PIL cannot decode is a bad file
        return f"{path.name} ({e})"
    return None


# ------------------------------------------------------------------------------------ split
def split_by_patient(
    names: list[str], patients: dict[str, str], labels: dict[str, list[float]], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split ``names`` into (training, validation) with no patient on both sides.

    Patients are shuffled with ``seed``; first, for each class (rarest first) not yet in
    validation, the next shuffled patient having it joins validation (if the class has at least
    two patients), so every class can be scored; then whole patients join until validation holds
    ``val_fraction`` of the images. Order inside each list follows ``names``.
    """
    by_patient: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_patient[patients[n]].append(n)
    order = sorted(by_patient)
    random.Random(seed).shuffle(order)
    target = round(val_fraction * len(names))
    if target <= 0 or len(order) < 2:
        return list(names), []
    has = {p: np.max([labels[n] for n in by_patient[p]], axis=0) > 0 for p in order}
    per_class = np.sum([has[p] for p in order], axis=0)
    val: set[str] = set()
    for c in np.argsort(per_class, kind="stable"):
        if per_class[c] >= 2 and not any(has[p][c] for p in val) and len(val) < len(order) - 1:
            val.add(next(p for p in order if has[p][c] and p not in val))
    count = sum(len(by_patient[p]) for p in val)
    for p in order:
        if count >= target or len(val) >= len(order) - 1:
            break
        if p not in val:
            val.add(p)
            count += len(by_patient[p])
    return [n for n in names if patients[n] not in val], [n for n in names if patients[n] in val]


# ---------------------------------------------------------------------------------- datalist
def prepare_datalist(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    check_images: bool = True,
    num_workers: int = 8,
) -> dict:
    """Write the ChestX-ray14 datalist: official ``test_list`` as "evaluation", ``train_val_list``
    split by patient into "training" and "validation" (never touching the test patients).

    Args:
        dataset_dir: the downloaded dataset folder (see the module docstring for the layout).
        output: datalist path; default ``<dataset_dir>/datalist.json``. Image paths in it are
            relative to ``dataset_dir``.
        val_fraction: fraction of the train_val images (whole patients) used for validation.
        seed: seed of the patient shuffle.
        check_images: decode every listed image with PIL (finds truncated downloads; minutes on
            the full 112k images). Existence is always checked; ``False`` is the fast path.
        num_workers: threads used to decode images.

    Returns:
        The datalist dict that was written.

    Raises:
        DatasetError: a missing folder, file, column or image, an unknown label or image name, or
            an undecodable image; the message names the file and what was expected.
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}; {LAYOUT}")
    entries = _read_entries(root / CSV_NAME)
    train_val = _read_list(root / TRAIN_VAL_LIST, entries)
    test = _read_list(root / TEST_LIST, entries)
    overlap = sorted(set(train_val) & set(test))
    if overlap:
        raise DatasetError(f"{TRAIN_VAL_LIST} and {TEST_LIST} share {len(overlap)} image(s): {_some(overlap)}")
    index = _index_images(root)
    missing = [n for n in train_val + test if n not in index]
    if missing:
        raise DatasetError(f"{len(missing)} listed image(s) not found under {root / 'images'}: {_some(missing)}")
    if check_images:
        paths = [root / index[n] for n in train_val + test]
        what = f"Decoding the {len(paths)} listed images under {root} (--check_images False: existence only)"
        with ThreadPoolExecutor(max(1, num_workers)) as pool:  # PIL decodes without holding the GIL
            bad = [e for e in progress(pool.map(_decode_error, paths), len(paths), what) if e]
        if bad:
            raise DatasetError(
                f"{len(bad)} image(s) under {root / 'images'} cannot be decoded "
                f"(expected PNG files PIL can read): {_some(bad)}"
            )

    labels = {n: lab for n, (lab, _) in entries.items()}
    patients = {n: pat for n, (_, pat) in entries.items()}
    training, validation = split_by_patient(train_val, patients, labels, val_fraction, seed)
    lists = {"training": training, "validation": validation, "evaluation": test}
    datalist = {
        "name": "NIH ChestX-ray14",
        "description": "Multi-label chest X-ray classification, 14 findings; official patient-wise "
        "train_val/test lists, validation carved from train_val by patient.",
        "labels": {"classes": list(CLASSES)},
        "split": {
            "train_val_list": TRAIN_VAL_LIST,
            "test_list": TEST_LIST,
            "validation_by": "Patient ID",
            "val_fraction": val_fraction,
            "seed": seed,
            **{f"num_{k}": len(v) for k, v in lists.items()},
        },
        **{k: [{"image": index[n], "label": labels[n]} for n in v] for k, v in lists.items()},
    }
    out = write_json_atomic(datalist, Path(output) if output else root / "datalist.json")
    _print_summary(out, lists, labels, patients)
    return datalist


def _print_summary(out: Path, lists: dict, labels: dict, patients: dict) -> None:
    print(f"ChestX-ray14 datalist written to {out}")
    pos = {k: np.sum([labels[n] for n in v], axis=0) if v else np.zeros(len(CLASSES)) for k, v in lists.items()}
    for k, v in lists.items():
        print(f"  {k:<10} {len(v):>7} images  {len({patients[n] for n in v}):>6} patients")
    print(f"  {'positives':<20}" + "".join(f"{k:>12}" for k in lists))
    for i, c in enumerate(CLASSES):
        print(f"  {c:<20}" + "".join(f"{int(pos[k][i]):>12}" for k in lists))
    absent = [
        f"{c} ({k})" for k in ("validation", "evaluation") if lists[k] for i, c in enumerate(CLASSES) if pos[k][i] == 0
    ]
    if absent:
        print(f"  warning: no positives, so no AUC, for: {', '.join(absent)}")
