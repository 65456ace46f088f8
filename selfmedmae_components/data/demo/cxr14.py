"""Synthetic NIH ChestX-ray14 in the download layout (see data/cxr14.py): radiographs whose findings each
draw their characteristic pattern.

:func:`make_demo` writes the demo dataset; :func:`write_case` gives the tools (data_benchmark.py,
benchmark.py) single images in any size.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..cxr14 import CLASSES, CSV_HEADER, CSV_NAME, NO_FINDING, TEST_LIST, TRAIN_VAL_LIST

# Relative frequency of each finding as the first one of an abnormal image, and common pairs in
# the real data (a second finding joins 35% of abnormal images).
_FREQ = np.array([1.2, 1.0, 1.3, 1.4, 1.0, 1.0, 0.8, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9, 0.7])
_PAIRS = {
    "Effusion": ("Atelectasis", "Infiltration", "Cardiomegaly"),
    "Cardiomegaly": ("Effusion", "Edema"),
    "Edema": ("Effusion", "Cardiomegaly"),
    "Atelectasis": ("Effusion", "Infiltration"),
    "Pneumonia": ("Infiltration", "Effusion"),
    "Consolidation": ("Effusion", "Atelectasis"),
    "Mass": ("Nodule", "Effusion"),
    "Nodule": ("Mass", "Infiltration"),
    "Emphysema": ("Pneumothorax", "Nodule"),
    "Fibrosis": ("Pleural_Thickening", "Nodule"),
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
    return {
        "cx": 0.5 + rng.normal(0, 0.012),
        "cy": 0.46 + rng.normal(0, 0.012),
        "s": rng.uniform(0.93, 1.04),
        "lung_w": rng.uniform(0.13, 0.15),
        "lung_h": rng.uniform(0.27, 0.3),
        "heart": rng.uniform(0.9, 1.05),
        "rib": rng.uniform(0.058, 0.07),
        "tissue": rng.uniform(0.5, 0.58),
        "bubble": rng.random() < 0.6,
    }


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
        for sd in [-1, 1] if rng.random() < 0.3 else [side()]:
            lx, lyy, rx, ry = lungs[sd]
            level = lyy + ry * rng.uniform(0.35, 0.65) - 0.35 * ry * np.clip(sd * (x - lx) / rx, 0, 1.2)
            opacify(sigmoid((y - level) / 0.012) * soft(ell(lx, lyy, rx * 1.05, ry * 1.05), 0.05), 0.95)
    if "Atelectasis" in f:  # plate-like linear opacity in a lower zone
        px, py = point(side(), (0.15, 0.6))
        ang = rng.uniform(-0.4, 0.4)
        ln = rng.uniform(0.06, 0.1)
        opacify(
            segment(
                px - ln * np.cos(ang),
                py - ln * np.sin(ang),
                px + ln * np.cos(ang),
                py + ln * np.sin(ang),
                rng.uniform(0.01, 0.018),
            )
            * all_lungs,
            0.8,
        )
    if "Infiltration" in f:  # several faint ill-defined patches, mid zones
        patches = sum(
            gauss(*point(side(), (-0.3, 0.5)), *(rng.uniform(0.025, 0.045, 2))) for _ in range(rng.integers(3, 7))
        )
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
        net = np.maximum(
            np.exp(-(np.sin(np.pi * xr / 0.028 + noise) ** 2) / 0.03),
            np.exp(-(np.sin(np.pi * yr / 0.028 - noise) ** 2) / 0.03),
        )
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
    for split in (
        [i for i in range(num_images) if pid[i] in test_patients],
        [i for i in range(num_images) if pid[i] not in test_patients],
    ):
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
        rows.append(
            [
                name,
                findings,
                followup[i],
                pid[i] + 1,
                age,
                "MF"[pid[i] % 2],
                "PA" if rng.random() < 0.7 else "AP",
                int(rng.integers(2000, 3000)),
                int(rng.integers(2000, 3000)),
                0.143,
                0.143,
            ]
        )
        names.append(name)
    with open(out / CSV_NAME, "w", newline="") as f:
        f.write(CSV_HEADER + "\n")
        csv.writer(f).writerows(rows)
    for list_name, in_test in ((TRAIN_VAL_LIST, False), (TEST_LIST, True)):
        chosen = [n for n, p in zip(names, pid) if (p in test_patients) == in_test]
        (out / list_name).write_text("\n".join(chosen) + "\n")
    return out


def write_case(folder: Path, index: int, rng: np.random.Generator, shape: tuple[int, ...], spacing=None) -> dict:
    """One 8-bit PNG of ``shape`` pixels in ``folder``: smooth noise, no anatomy (histogram equalisation needs
    none), and one finding per image in turn. ``spacing`` is ignored (PNG has none). Returns the datalist item."""
    small = (rng.random((64, 64)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize(tuple(shape), Image.BILINEAR))
    path = Path(folder) / f"{index:08d}_000.png"
    Image.fromarray(image).save(path)
    return {"image": str(path), "label": [float(k == index % len(CLASSES)) for k in range(len(CLASSES))]}
