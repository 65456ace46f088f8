"""NIH ChestX-ray14: the datalist (official split, patient-wise validation) and demo data.

The dataset as downloaded::

    <dataset_dir>/images/00000001_000.png ...   (the Kaggle mirror's images_0NN/images/ also works)
    <dataset_dir>/Data_Entry_2017.csv           (Image Index, Finding Labels, Patient ID, ...)
    <dataset_dir>/train_val_list.txt            (86,524 images, official)
    <dataset_dir>/test_list.txt                 (25,596 images, official)

:func:`prepare_datalist` turns it into ``<dataset_dir>/datalist.json``; :func:`make_demo` writes a
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

__all__ = ["CLASSES", "parse_findings", "split_by_patient", "prepare_datalist", "make_demo"]

CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
CSV_NAME, TRAIN_VAL_LIST, TEST_LIST = "Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"
CSV_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
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
            raise DatasetError(f"{csv_path} lacks column(s) {missing}; expected a header with "
                               f"{list(REQUIRED_COLUMNS)} (found {header})")
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
            raise DatasetError(f"{len(bad)} image(s) under {root / 'images'} cannot be decoded "
                               f"(expected PNG files PIL can read): {_some(bad)}")

    labels = {n: lab for n, (lab, _) in entries.items()}
    patients = {n: pat for n, (_, pat) in entries.items()}
    training, validation = split_by_patient(train_val, patients, labels, val_fraction, seed)
    lists = {"training": training, "validation": validation, "evaluation": test}
    datalist = {
        "name": "NIH ChestX-ray14",
        "description": "Multi-label chest X-ray classification, 14 findings; official patient-wise "
                       "train_val/test lists, validation carved from train_val by patient.",
        "labels": {"classes": list(CLASSES)},
        "split": {"train_val_list": TRAIN_VAL_LIST, "test_list": TEST_LIST, "validation_by": "Patient ID",
                  "val_fraction": val_fraction, "seed": seed, **{f"num_{k}": len(v) for k, v in lists.items()}},
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
    absent = [f"{c} ({k})" for k in ("validation", "evaluation") if lists[k]
              for i, c in enumerate(CLASSES) if pos[k][i] == 0]
    if absent:
        print(f"  warning: no positives, so no AUC, for: {', '.join(absent)}")



# -------------------------------------------------------------------------------------- demo
# Relative frequency of each finding as the first one of an abnormal image, and common pairs in
# the real data (a second finding joins 35% of abnormal images).
_FREQ = np.array([1.2, 1.0, 1.3, 1.4, 1.0, 1.0, 0.8, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.7])
_PAIRS = {
    "Effusion": ("Atelectasis", "Infiltration", "Cardiomegaly"), "Cardiomegaly": ("Effusion", "Edema"),
    "Edema": ("Effusion", "Cardiomegaly"), "Atelectasis": ("Effusion", "Infiltration"),
    "Pneumonia": ("Infiltration", "Effusion"), "Consolidation": ("Effusion", "Atelectasis"),
    "Mass": ("Nodule", "Effusion"), "Nodule": ("Mass", "Infiltration"),
    "Emphysema": ("Pneumothorax", "Nodule"), "Fibrosis": ("Pleural_Thickening", "Nodule"),
}


def _draw_labels(rng: np.random.Generator) -> list[int]:
    if rng.random() < 0.4:
        return []  # No Finding
    first = int(rng.choice(len(CLASSES), p=_FREQ / _FREQ.sum()))
    options = _PAIRS.get(CLASSES[first], CLASSES)
    second = CLASSES.index(options[rng.integers(len(options))])
    return [first, second] if rng.random() < 0.35 and second != first else [first]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1]: a coarse grid upsampled bilinearly."""
    coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR))


def _anatomy(rng: np.random.Generator) -> dict:
    """Per-patient body habitus, shared by all of a patient's follow-up images."""
    return {"cx": 0.5 + rng.normal(0, 0.012), "cy": 0.46 + rng.normal(0, 0.012), "s": rng.uniform(0.93, 1.04),
            "lung_w": rng.uniform(0.13, 0.15), "lung_h": rng.uniform(0.27, 0.3), "heart": rng.uniform(0.9, 1.05),
            "rib": rng.uniform(0.058, 0.07), "tissue": rng.uniform(0.5, 0.58), "bubble": rng.random() < 0.6}


def _render(rng: np.random.Generator, a: dict, labels: list[int], size: int) -> np.ndarray:
    """One synthetic PA radiograph (uint8, size x size): air and lungs dark, tissue and bone bright;
    each finding adds its characteristic pattern at its characteristic place."""
    f = {CLASSES[i] for i in labels}
    g = np.linspace(0, 1, size, dtype=np.float32)
    y0, x0 = np.meshgrid(g, g, indexing="ij")
    t, (dx, dy) = rng.normal(0, 0.03), rng.normal(0, 0.01, 2)  # small pose change per image
    x = (x0 - 0.5) * np.cos(t) - (y0 - 0.5) * np.sin(t) + 0.5 + dx
    y = (x0 - 0.5) * np.sin(t) + (y0 - 0.5) * np.cos(t) + 0.5 + dy
    s, cx, cy, tissue = a["s"], a["cx"], a["cy"], a["tissue"]

    def ell(ex, ey, rx, ry):  # elliptic radius: < 1 inside
        return np.sqrt(((x - ex) / rx) ** 2 + ((y - ey) / ry) ** 2)

    def soft(r, edge=0.08):  # 1 inside, ramps to 0 across the edge
        return np.clip((1 - r) / edge, 0, 1)

    def gauss(ex, ey, sx, sy):
        return np.exp(-0.5 * (((x - ex) / sx) ** 2 + ((y - ey) / sy) ** 2))

    def segment(x1, y1, x2, y2, width):
        px, py = x2 - x1, y2 - y1
        u = np.clip(((x - x1) * px + (y - y1) * py) / (px * px + py * py), 0, 1)
        return soft(np.hypot(x - x1 - u * px, y - y1 - u * py) / width, 0.5)

    def sigmoid(z):
        return 1 / (1 + np.exp(-np.clip(z, -30, 30)))

    img = np.full_like(x, 0.03)
    body = np.maximum(soft(ell(cx, cy + 0.14, 0.45 * s, 0.62 * s), 0.06), soft(ell(cx, 0.0, 0.11 * s, 0.2), 0.1))
    img += tissue * body
    ribs = np.clip((np.cos(2 * np.pi * (y - 0.9 * (x - cx) ** 2) / a["rib"]) - 0.55) / 0.45, 0, 1)
    img += 0.07 * ribs * soft(ell(cx, cy, 0.37 * s, 0.37 * s), 0.1)

    # lungs: Emphysema makes them larger, darker, with a low diaphragm and sparse markings
    emph = "Emphysema" in f
    lw, lh = a["lung_w"] * s * (1.07 if emph else 1.0), a["lung_h"] * s * (1.12 if emph else 1.0)
    ly = cy + (0.03 if emph else 0.0)
    lungs = {side: (cx + side * 0.17 * s, ly, lw * (1.04 if side < 0 else 0.97), lh) for side in (-1, 1)}
    noise = _smooth_noise(rng, size, 24)
    ptx_side = int(rng.choice([-1, 1]))
    all_lungs = np.zeros_like(x)
    for side, (lx, lyy, rx, ry) in lungs.items():
        lung = soft(ell(lx, lyy, rx, ry), 0.1)
        all_lungs = np.maximum(all_lungs, lung)
        hx, hy = cx + side * 0.07, lyy - 0.02  # hilum: vessels fan out from here
        ang, dist = np.arctan2(y - hy, x - hx), np.hypot(x - hx, y - hy)
        vessels = (0.5 + 0.5 * np.cos(16 * ang + 2.5 * noise)) ** 8 * np.exp(-dist / 0.18)
        rim = np.zeros_like(x)
        if "Pneumothorax" in f and side == ptx_side:  # apical-lateral air rim without markings
            k = rng.uniform(0.75, 0.88)
            inner = ell(lx - side * 0.015, lyy + 0.04, rx * k, ry * k)
            upper = sigmoid((lyy + 0.1 - y) / 0.02)
            rim = lung * (1 - soft(inner, 0.03)) * upper
            img += 0.14 * np.exp(-(((inner - 1) / 0.025) ** 2)) * upper * lung  # visceral pleural line
        img -= (0.42 if emph else 0.33) * lung + 0.15 * rim
        img += 0.09 * (0.4 if emph else 1.0) * vessels * lung * (1 - rim)

    def opacify(mask, strength=0.9):  # push towards soft-tissue density
        nonlocal img
        img = img + strength * np.clip(mask, 0, 1) * (tissue + 0.04 - img)

    def point(side, zone):  # a random point inside one lung; zone is (top, bottom) in [-1, 1]
        lx, lyy, rx, ry = lungs[side]
        v = rng.uniform(*zone)
        return lx + rng.uniform(-0.55, 0.55) * np.sqrt(1 - v * v) * rx, lyy + v * ry

    side = lambda: int(rng.choice([-1, 1]))  # noqa: E731
    if "Effusion" in f:  # basal fluid with a meniscus rising laterally: blunted costophrenic angle
        for sd in ([-1, 1] if rng.random() < 0.3 else [side()]):
            lx, lyy, rx, ry = lungs[sd]
            level = lyy + ry * rng.uniform(0.35, 0.65) - 0.35 * ry * np.clip(sd * (x - lx) / rx, 0, 1.2)
            opacify(sigmoid((y - level) / 0.012) * soft(ell(lx, lyy, rx * 1.05, ry * 1.05), 0.05), 0.95)
    if "Atelectasis" in f:  # plate-like linear opacity in a lower zone
        px, py = point(side(), (0.15, 0.6))
        ang = rng.uniform(-0.4, 0.4)
        ln = rng.uniform(0.06, 0.1)
        opacify(segment(px - ln * np.cos(ang), py - ln * np.sin(ang), px + ln * np.cos(ang), py + ln * np.sin(ang),
                        rng.uniform(0.01, 0.018)) * all_lungs, 0.8)
    if "Infiltration" in f:  # several faint ill-defined patches, mid zones
        patches = sum(gauss(*point(side(), (-0.3, 0.5)), *(rng.uniform(0.025, 0.045, 2))) for _ in range(rng.integers(3, 7)))
        img += 0.12 * np.clip(patches, 0, 1) * (0.7 + 0.3 * _smooth_noise(rng, size, 40)) * all_lungs
    if "Pneumonia" in f:  # dense patchy opacity in one lower zone
        px, py = point(side(), (0.25, 0.6))
        patch = gauss(px, py, 0.07, 0.06) * np.clip(0.6 + 0.8 * _smooth_noise(rng, size, 32), 0, 1)
        opacify(patch * all_lungs, 0.75)
    if "Consolidation" in f:  # homogeneous upper-lobe opacity ending at a sharp fissure
        lx, lyy, rx, ry = lungs[side()]
        fissure = lyy + ry * rng.uniform(-0.2, 0.15)
        opacify(soft(ell(lx, lyy, rx, ry), 0.1) * sigmoid((fissure - y) / 0.006), 0.8)
    if "Mass" in f:  # large lobulated round opacity
        px, py = point(side(), (-0.6, 0.5))
        r = rng.uniform(0.045, 0.075)
        opacify(soft(ell(px, py, r, r) / (1 + 0.12 * noise), 0.15), 0.8)
    if "Nodule" in f:  # one or two small sharp round opacities
        for _ in range(rng.integers(1, 3)):
            px, py = point(side(), (-0.7, 0.6))
            r = rng.uniform(0.012, 0.022)
            img += 0.3 * soft(ell(px, py, r, r), 0.3)
    if "Edema" in f:  # bilateral perihilar "bat-wing" haze
        haze = gauss(cx - 0.1 * s, ly, 0.09, 0.12) + gauss(cx + 0.1 * s, ly, 0.09, 0.12)
        img += 0.17 * haze * all_lungs
    if "Fibrosis" in f:  # reticular net, peripheral and basal, both lungs
        xr, yr = x * np.cos(0.5) - y * np.sin(0.5), x * np.sin(0.5) + y * np.cos(0.5)
        net = np.maximum(np.exp(-np.sin(np.pi * xr / 0.028 + noise) ** 2 / 0.03),
                         np.exp(-np.sin(np.pi * yr / 0.028 - noise) ** 2 / 0.03))
        for lx, lyy, rx, ry in lungs.values():
            r = ell(lx, lyy, rx, ry)
            img += 0.13 * net * soft(r, 0.1) * np.clip((r - 0.4) / 0.4, 0, 1) * sigmoid((y - lyy + 0.2 * ry) / 0.03)
    if "Pleural_Thickening" in f:  # band along the lateral chest wall of one lung
        sd = side()
        lx, lyy, rx, ry = lungs[sd]
        band = np.exp(-(((ell(lx, lyy, rx, ry) - 0.92) / 0.07) ** 2)) * sigmoid(sd * (x - lx) / 0.02)
        opacify(band * sigmoid((lyy + 0.3 * ry - y) / 0.03), 0.7)

    # heart (enlarged in Cardiomegaly), mediastinum and spine, clavicles: drawn over the lungs
    card = "Cardiomegaly" in f
    hr, hry = 0.125 * s * a["heart"] * (1.5 if card else 1.0), 0.105 * s * (1.15 if card else 1.0)
    hx, hy = cx + 0.04 + 0.4 * (hr - 0.125), cy + 0.16
    heart = soft(ell(hx, hy, hr, hry), 0.12)
    img += 0.92 * heart * (0.62 - img)
    mediastinum = np.clip((0.055 * s - np.abs(x - cx)) / 0.02, 0, 1) * sigmoid((cy + 0.35 - y) / 0.02)
    img += 0.9 * mediastinum * (0.66 - img) + 0.03 * mediastinum * np.cos(2 * np.pi * y / 0.045)
    for sd in (-1, 1):
        img += 0.12 * segment(cx + sd * 0.04, 0.2, cx + sd * 0.3 * s, 0.14, 0.012)
    if a["bubble"]:  # normal gastric air under the left hemidiaphragm
        img -= 0.25 * soft(ell(cx + 0.17, ly + lh + 0.06, 0.05, 0.03), 0.3) * body
    if "Hernia" in f:  # retrocardiac air-fluid bubble just above the diaphragm
        bx, by, r = hx - 0.02 + rng.uniform(-0.02, 0.03), hy + hry * 0.55, rng.uniform(0.035, 0.05)
        e = ell(bx, by, r, r * 0.85)
        inside = soft(e, 0.1)
        img += -0.32 * inside * (y < by + 0.2 * r) + 0.05 * inside * (y >= by + 0.2 * r)
        img += 0.12 * np.exp(-(((e - 1) / 0.08) ** 2))

    img += 0.04 * _smooth_noise(rng, size, 4)  # uneven exposure
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15) + rng.normal(0, 0.015, img.shape)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_demo(out_dir: str | os.PathLike, num_images: int = 400, image_size: int = 256, seed: int = 0) -> Path:
    """Write a synthetic ChestX-ray14 in the NIH download layout (see the module docstring).

    Patients have 1-6 follow-up images sharing their anatomy; about 25% of patients form the
    test list. ~40% of images are "No Finding"; every class occurs in at least two patients of
    both train_val and test. Two images are saved as RGB and one as RGBA PNG, as in the real set.
    The real images are 1024x1024; ``image_size`` defaults to 256 so CPU demos stay fast
    (the transforms resize to 256 anyway). The default set takes about 10 s on two CPU cores.

    Args:
        out_dir: dataset folder to create (existing files of the same names are overwritten).
        num_images: number of images (at least 40).
        image_size: side of the square images in pixels.
        seed: random seed; the same seed writes the same files.

    Returns:
        ``out_dir`` as a Path.
    """
    if num_images < 40:
        raise ValueError(f"num_images must be at least 40 (14 classes in both splits), got {num_images}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts: list[int] = []
    while sum(counts) < num_images:
        counts.append(min(int(rng.integers(1, 7)), num_images - sum(counts)))
    test_patients = set(rng.permutation(len(counts))[: max(2, round(0.25 * len(counts)))].tolist())
    pid = [p for p, c in enumerate(counts) for _ in range(c)]
    followup = [k for c in counts for k in range(c)]
    labels = [_draw_labels(rng) for _ in range(num_images)]
    for split in ([i for i in range(num_images) if pid[i] in test_patients],
                  [i for i in range(num_images) if pid[i] not in test_patients]):
        for c in range(len(CLASSES)):  # every class in >= 2 patients of each split
            while len(holders := {pid[i] for i in split if c in labels[i]}) < 2:
                candidates = [i for i in split if pid[i] not in holders]
                free = [i for i in candidates if not labels[i]] or candidates
                labels[free[rng.integers(len(free))]].append(c)

    anatomy = [_anatomy(rng) for _ in counts]
    extra = dict(zip(rng.choice(num_images, 3, replace=False).tolist(), ("RGB", "RGB", "RGBA")))
    rows, names = [], []
    for i in range(num_images):
        name = f"{pid[i] + 1:08d}_{followup[i]:03d}.png"
        gray = Image.fromarray(_render(rng, anatomy[pid[i]], labels[i], image_size))
        gray.convert(extra.get(i, "L")).save(out / "images" / name)
        findings = "|".join(sorted(CLASSES[c] for c in set(labels[i]))) or NO_FINDING
        age = 30 + (pid[i] * 7919) % 50 + followup[i] // 3
        rows.append([name, findings, followup[i], pid[i] + 1, age, "MF"[pid[i] % 2], "PA" if rng.random() < 0.7 else "AP",
                     int(rng.integers(2000, 3000)), int(rng.integers(2000, 3000)), 0.143, 0.143])
        names.append(name)
    with open(out / CSV_NAME, "w", newline="") as f:
        f.write(CSV_HEADER + "\n")
        csv.writer(f).writerows(rows)
    for list_name, in_test in ((TRAIN_VAL_LIST, False), (TEST_LIST, True)):
        chosen = [n for n, p in zip(names, pid) if (p in test_patients) == in_test]
        (out / list_name).write_text("\n".join(chosen) + "\n")
    return out
