"""Any Medical Segmentation Decathlon-format dataset: checks it and writes its datalist with a seeded split and
the defaults the msd_seg bundle derives from the data.

The layout (the ten MSD tasks as downloaded, and many teams' own data)::

    <dataset_dir>/dataset.json         "modality" {"0": "CT"} or {"0": "T2", "1": "ADC"}, "labels" {"0": "background",
                                       "1": ...}, "training" [{"image": "./imagesTr/x.nii.gz", "label": ...}], "test" [...]
    <dataset_dir>/imagesTr/x.nii.gz    3-D (one channel) or 4-D with the channels last
    <dataset_dir>/labelsTr/x.nii.gz    3-D, integer class values 0..len(labels)-1 (exclusive classes)
    <dataset_dir>/imagesTs/y.nii.gz    unlabelled

:func:`prepare_datalist` writes ``<dataset_dir>/datalist.json``: the lists "training", "validation",
"evaluation" (held out), "test" (the present images of dataset.json's "test"), the split and a "properties"
block that the bundle configs read through :func:`dataset_properties`::

    channels, modality, labels          from dataset.json (labels: value -> name, background included)
    normalization                       "window" (every channel CT: clip to [hu_min, hu_max], scale to [0, 1])
                                        or "zscore" (per channel, on the non-zero voxels)
    hu_min, hu_max                      CT: the 0.5 and 99.5 percentiles of the image inside the label
                                        foreground over the training cases (as nnU-Net); null otherwise
    pixdim                              the median voxel size (mm, RAS axis order) of the training cases
    roi_size                            per axis the largest multiple of 16 (at most 96) that fits the median
                                        case resampled to pixdim (at least 16)

Each can be given to the prepare function instead (``--hu_window [-100,240]``, ``--pixdim [1.5,1.5,2.0]``, ...),
and each is a top-level id of the bundle configs, so ``--roi_size [64,64,64]`` on a bundle command also wins.
The synthetic demo data in this layout: data/demo/msd.py.
"""

from __future__ import annotations

import json
import os
import posixpath
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from ..io import write_json_atomic
from .common import DatasetError, progress, seeded_split, split_record
from .nifti_checks import grid_mismatch, label_values_problem, missing, open_nifti

__all__ = [
    "prepare_datalist",
    "dataset_properties",
    "derive_properties",
    "read_dataset_json",
    "median_spacing",
    "fitting_roi",
    "foreground_window",
    "foreground_sample",
    "ras_spacing",
    "ras_shape",
]

LAYOUT = (
    'Expected the Medical Segmentation Decathlon layout: <dataset_dir>/dataset.json (with "modality", "labels", '
    '"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}], "test"), '
    "<dataset_dir>/imagesTr/, <dataset_dir>/labelsTr/, <dataset_dir>/imagesTs/."
)
ROI_STEP, ROI_MAX = 16, 96  # UNETR's patch size; the paper's crop
WINDOW_PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 10000  # foreground voxels drawn per training case for the CT window (as nnU-Net)


def _rel(path: str) -> str:
    return posixpath.normpath(path)


def _resource_fork(path: str) -> bool:
    return posixpath.basename(path).startswith("._")


def read_dataset_json(root: Path) -> tuple[dict, list[dict], list[str]]:
    """(dataset.json, labelled pairs, test images), paths relative to ``root``, macOS ``._`` files skipped.

    Raises:
        DatasetError: no folder, no dataset.json, or one without "modality", "labels" or "training".
    """
    if not root.is_dir():
        raise DatasetError(f"MSD dataset folder {root} does not exist. {LAYOUT}")
    path = root / "dataset.json"
    if not path.is_file():
        inner = sorted(p.parent.name for p in root.glob("*/dataset.json"))
        hint = f" Pass its subfolder {inner[0]}." if inner else ""
        raise DatasetError(f"{path}: missing.{hint} {LAYOUT}")
    try:
        meta = json.loads(path.read_text())
        modality = {int(k): str(v) for k, v in meta["modality"].items()}
        labels = {int(k): str(v) for k, v in meta["labels"].items()}
        pairs = [{"image": _rel(t["image"]), "label": _rel(t["label"])} for t in meta["training"]]
        tests = [_rel(t["image"] if isinstance(t, dict) else t) for t in meta.get("test", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetError(
            f'{path}: not a valid MSD dataset.json (expected "modality": {{"0": "CT"}}, "labels": {{"0": "background", '
            f'"1": ...}}, "training": [{{"image": ..., "label": ...}}], "test": [...]): {type(e).__name__}: {e}'
        ) from e
    if sorted(modality) != list(range(len(modality))) or not modality:
        raise DatasetError(f'{path}: "modality" must number the channels 0..C-1, got {sorted(modality)}.')
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise DatasetError(f'{path}: "labels" must number the classes 0 (background), 1, ... N, got {sorted(labels)}.')
    meta["modality"], meta["labels"] = modality, labels
    pairs = sorted((p for p in pairs if not _resource_fork(p["image"])), key=lambda p: p["image"])
    return meta, pairs, sorted(t for t in tests if not _resource_fork(t))


def ras_spacing(img: nib.Nifti1Image) -> np.ndarray:
    """The voxel size (mm) of ``img``'s first three axes in RAS order (as the bundle's Orientationd sees them)."""
    affine = img.affine[:3, :3]
    zooms = np.sqrt((affine**2).sum(axis=0))
    order = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)  # world axis of each voxel axis
    out = np.empty(3)
    out[order] = zooms
    return out


def median_spacing(spacings: list[np.ndarray]) -> list[float]:
    """The per-axis median voxel size, rounded to 0.01 mm."""
    return [round(float(v), 2) for v in np.median(np.asarray(spacings), axis=0)]


def fitting_roi(
    sizes_mm: list[np.ndarray], pixdim: list[float], step: int = ROI_STEP, largest: int = ROI_MAX
) -> list[int]:
    """Per axis the largest multiple of ``step`` (at most ``largest``, at least ``step``) that fits the median case
    resampled to ``pixdim``."""
    median_voxels = np.median(np.asarray(sizes_mm), axis=0) / np.asarray(pixdim, float)
    return [int(min(largest, max(step, step * (v // step)))) for v in median_voxels]


def foreground_window(samples: list[np.ndarray], percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> list[float]:
    """The ``percentiles`` of the image values sampled inside the label foreground (CT: a HU window)."""
    values = np.concatenate([np.asarray(s, np.float64).ravel() for s in samples]) if samples else np.empty(0)
    if values.size == 0:
        raise DatasetError("no foreground voxel in any training label: cannot derive a CT window (give --hu_window).")
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return [round(float(lo), 1) + 0.0, round(float(hi), 1) + 0.0]  # + 0.0: no -0.0


CACHE_DISK_ABOVE_GB = 8.0  # estimated preprocessed training data above this: cache: disk by default (else ram)


def derive_properties(
    modality: dict[int, str],
    labels: dict[int, str],
    spacings: list[np.ndarray],
    sizes_mm: list[np.ndarray],
    window_samples: list[np.ndarray],
    num_pretrain_images: int,
    normalization: str | None = None,
    hu_window: list[float] | None = None,
    pixdim: list[float] | None = None,
    roi_size: list[int] | None = None,
    seed: int = 0,
    geometry_source: str = "the training cases",
    window_source: str = "the image inside the label foreground over the training cases",
    cache: str | None = None,
    pretrain_steps: int | None = None,
) -> dict:
    """The datalist's "properties" block (module docstring), from what the preparation measured.

    Args:
        modality, labels: channel and class names by index (dataset.json's).
        spacings, sizes_mm: voxel sizes and extents (mm, RAS axes) of the cases that set the geometry.
        window_samples: intensities the CT window's percentiles are taken from (one array per case).
        num_pretrain_images: images MAE reads (the step budget and the cache size follow them).
        normalization, hu_window, pixdim, roi_size, cache, pretrain_steps: given instead of derived.
        seed: of the window's sampling (recorded).
        geometry_source, window_source: what ``spacings`` and ``window_samples`` were taken from, for the record.

    Raises:
        DatasetError: a bad normalisation, spacing or ROI.
    """
    from ..optim import default_pretrain_steps

    all_ct = all(m.strip().upper() == "CT" for m in modality.values())
    given = {
        "normalization": normalization is not None,
        "window": hu_window is not None,
        "pixdim": pixdim is not None,
        "roi_size": roi_size is not None,
        "cache": cache is not None,
        "steps": pretrain_steps is not None,
    }
    normalization = normalization or ("window" if all_ct else "zscore")
    if normalization not in ("window", "zscore"):
        raise DatasetError(f"normalization must be 'window' or 'zscore', got {normalization!r}.")
    pixdim = [float(v) for v in pixdim] if pixdim is not None else median_spacing(spacings)
    roi = [int(v) for v in roi_size] if roi_size is not None else fitting_roi(sizes_mm, pixdim)
    if len(pixdim) != 3 or len(roi) != 3 or any(v % ROI_STEP for v in roi):
        raise DatasetError(f"pixdim needs 3 values and roi_size 3 multiples of {ROI_STEP}; got {pixdim}, {roi}.")
    window = None
    if normalization == "window":
        window = [float(v) for v in hu_window] if hu_window is not None else foreground_window(window_samples)
    # float16 after resampling: the median case's voxels at pixdim, per channel, per pre-training image
    median_voxels = float(np.prod(np.median(np.asarray(sizes_mm), axis=0) / np.asarray(pixdim, float)))
    cache_gb = num_pretrain_images * median_voxels * len(modality) * 2 / 2**30
    cache = cache or ("disk" if cache_gb > CACHE_DISK_ABOVE_GB else "ram")
    steps = int(pretrain_steps) if pretrain_steps is not None else default_pretrain_steps(num_pretrain_images)
    return {
        "channels": len(modality),
        "modality": {str(k): v for k, v in modality.items()},
        "labels": {str(k): v for k, v in labels.items()},
        "normalization": normalization,
        "hu_min": None if window is None else window[0],
        "hu_max": None if window is None else window[1],
        "pixdim": pixdim,
        "roi_size": roi,
        "cache": cache,
        "pretrain_steps": steps,
        "derived": {  # how each default was found ("given": passed to the prepare function)
            "normalization": "given"
            if given["normalization"]
            else "modality: window if every channel is CT, else z-score per channel on non-zero voxels",
            "window": None
            if window is None
            else "given"
            if given["window"]
            else f"percentiles {list(WINDOW_PERCENTILES)} of {window_source} (at most {SAMPLES_PER_CASE} voxels per case, "
            f"seed {seed})",
            "pixdim": "given" if given["pixdim"] else f"median voxel size of {geometry_source} (RAS order)",
            "roi_size": "given"
            if given["roi_size"]
            else f"largest multiple of {ROI_STEP} (at most {ROI_MAX}) fitting the median of {geometry_source} at pixdim",
            "cache": "given"
            if given["cache"]
            else f"disk above {CACHE_DISK_ABOVE_GB:g} GB of preprocessed images (estimated {cache_gb:.2f} GB, float16 at "
            f"pixdim, {num_pretrain_images} images)",
            "pretrain_steps": "given"
            if given["steps"]
            else f"optim.default_pretrain_steps({num_pretrain_images}): the paper's ~30,000 steps, or 100 passes over the "
            f"images where more",
        },
    }


def foreground_sample(image: nib.Nifti1Image, label: nib.Nifti1Image, rng: np.random.Generator) -> np.ndarray:
    """At most SAMPLES_PER_CASE intensities of the (first channel of the) image inside the label's foreground."""
    data = np.asanyarray(image.dataobj)
    data = data[..., 0] if data.ndim == 4 else data
    values = data[np.asanyarray(label.dataobj) > 0]
    return values if values.size <= SAMPLES_PER_CASE else rng.choice(values, SAMPLES_PER_CASE, replace=False)


def prepare_datalist(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    eval_fraction: float = 0.2,
    num_val_cases: int | None = None,
    seed: int = 0,
    check_files: bool = True,
    normalization: str | None = None,
    hu_window: list[float] | None = None,
    pixdim: list[float] | None = None,
    roi_size: list[int] | None = None,
    cache: str | None = None,
    pretrain_steps: int | None = None,
) -> dict:
    """Check an MSD-format dataset and write its datalist with a seeded split and the derived defaults.

    The labelled cases of ``dataset.json`` (sorted by path) are permuted with ``numpy.random.default_rng(seed)``:
    the first ``round(n * eval_fraction)`` are "evaluation" (held out), the next ``num_val_cases`` "validation"
    (checkpoint selection), the rest "training". The split and the derived defaults are saved in the datalist.

    Args:
        dataset_dir: the folder with ``dataset.json``.
        output: where to write the datalist; default ``<dataset_dir>/datalist.json``.
        eval_fraction: share of the labelled cases held out for evaluation.
        num_val_cases: validation cases; default 10 % of the rest, at least 1.
        seed: seed of the permutation.
        check_files: open every file (reads each once) and check channels, grids and label values; False: check
            that the files exist and read only the headers (and, for CT, the training cases' data for the window).
        normalization: "window" or "zscore" instead of the modality's default (window for CT).
        hu_window: [min, max] of the CT window instead of the foreground percentiles.
        pixdim: voxel size (mm) to resample to instead of the median spacing.
        roi_size: crop size instead of the fitted multiple of 16.
        cache: "ram", "disk" or "none" instead of the default by size (:data:`CACHE_DISK_ABOVE_GB`).
        pretrain_steps: MAE optimiser steps instead of ``optim.default_pretrain_steps`` of the image count.

    Returns:
        The datalist dict that was written.

    Raises:
        DatasetError: listing every missing or bad file and what was expected.
    """
    root = Path(dataset_dir).expanduser()
    meta, pairs, tests = read_dataset_json(root)
    channels, num_classes = len(meta["modality"]), len(meta["labels"])
    n = len(pairs)
    if not 0 <= eval_fraction < 1:
        raise DatasetError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    n_eval = int(round(n * eval_fraction))
    n_val = max(1, int(round(0.1 * (n - n_eval)))) if num_val_cases is None else int(num_val_cases)
    if not 0 <= n_val < n - n_eval:
        raise DatasetError(
            f"{root / 'dataset.json'} lists {n} labelled cases: too few for {n_eval} evaluation and "
            f"{n_val} validation cases with at least one left for training."
        )
    all_ct = all(m.strip().upper() == "CT" for m in meta["modality"].values())
    normalization_given = normalization is not None
    normalization = normalization or ("window" if all_ct else "zscore")
    if normalization not in ("window", "zscore"):  # before reading any file
        raise DatasetError(f"normalization must be 'window' or 'zscore', got {normalization!r}.")
    training, validation, evaluation = seeded_split(n, n_eval, n_val, seed)
    is_training = np.zeros(n, bool)
    is_training[training] = True
    needs_window = normalization == "window" and hu_window is None

    problems: list[str] = []
    tests = [t for t in tests if (root / t).is_file()]
    spacings, sizes_mm, samples = [], [], []
    rng = np.random.default_rng(seed)
    cases = [(p["image"], p["label"], bool(is_training[i])) for i, p in enumerate(pairs)] + [
        (t, None, False) for t in tests
    ]
    if check_files or needs_window:
        cases = progress(cases, len(cases), f"Reading the {len(cases)} cases of {root} (--check_files False: less)")
    for image, label, train in cases:
        img, lab = _check_case(
            root / image,
            None if label is None else root / label,
            channels,
            num_classes - 1,
            problems,
            check_files or (train and needs_window),
        )
        if img is not None and train:
            spacing = ras_spacing(img)
            spacings.append(spacing)
            sizes_mm.append(spacing * ras_shape(img))
            if needs_window and lab is not None:
                samples.append(foreground_sample(img, lab, rng))
    if problems:
        raise DatasetError(f"MSD dataset at {root}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))

    if not spacings:
        raise DatasetError(f"{root / 'dataset.json'}: no readable training case to derive spacing and ROI from.")
    properties = derive_properties(
        meta["modality"],
        meta["labels"],
        spacings,
        sizes_mm,
        samples,
        num_pretrain_images=n + len(tests),
        normalization=normalization if normalization_given else None,
        hu_window=hu_window,
        pixdim=pixdim,
        roi_size=roi_size,
        seed=seed,
        cache=cache,
        pretrain_steps=pretrain_steps,
    )
    pixdim, roi = properties["pixdim"], properties["roi_size"]
    window = None if properties["hu_min"] is None else [properties["hu_min"], properties["hu_max"]]
    datalist = {
        "name": str(meta.get("name", root.name)),
        "description": str(meta.get("description", "")),
        "labels": properties["labels"],
        "modality": properties["modality"],
        "properties": properties,
        "split": split_record(seed, eval_fraction, n_val),
        "training": [pairs[i] for i in training],
        "validation": [pairs[i] for i in validation],
        "evaluation": [pairs[i] for i in evaluation],
        "test": [{"image": t} for t in tests],
    }
    out = write_json_atomic(datalist, output if output is not None else root / "datalist.json")
    window_text = f", window [{window[0]}, {window[1]}]" if window else ", z-score per channel"
    print(
        f"MSD datalist ({datalist['name']}: {channels} channel(s), {num_classes - 1} label(s){window_text}, pixdim "
        f"{pixdim}, roi {roi}, cache {properties['cache']}, {properties['pretrain_steps']} MAE steps): "
        f"{len(training)} training, {len(validation)} validation, {len(evaluation)} evaluation, {len(tests)} test -> {out}"
    )
    return datalist


def ras_shape(img: nib.Nifti1Image) -> np.ndarray:
    """The voxel counts of ``img``'s first three axes in RAS order."""
    order = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)
    out = np.empty(3)
    out[order] = np.asarray(img.shape[:3], float)
    return out


def _expected_image(channels: int, shape: tuple) -> str:
    form = "a 3-D image" if channels == 1 else f"a 4-D image with {channels} channels in the last axis"
    return f"expected {form} (dataset.json lists {channels} modalities), got shape {shape}"


def _channels_of(img: nib.Nifti1Image) -> int | None:
    """The channel count of an image in the MSD form (3-D, or 4-D with the channels last); None if neither."""
    if len(img.shape) == 3:
        return 1
    if len(img.shape) == 4:
        return int(img.shape[3])
    return None


def _check_case(image: Path, label: Path | None, channels: int, max_label: int, problems: list[str], read: bool):
    """Check one case; returns (image, label) as opened (None where missing or bad). Without ``read`` only the
    headers are opened."""
    if not read:
        gone = [missing(p) for p in (image, label) if p is not None and not p.is_file()]
        problems.extend(gone)
        if gone:
            return None, None
        try:
            img = nib.load(str(image))
        except Exception as e:  # as open_nifti: nibabel raises many types for a damaged file
            problems.append(f"{image}: cannot be read as NIfTI ({type(e).__name__}: {e})")
            return None, None
        return img, None
    img = open_nifti(image, problems)
    lab = open_nifti(label, problems) if label is not None else None
    if img is not None and _channels_of(img) != channels:
        problems.append(f"{image}: {_expected_image(channels, img.shape)}")
        return None, None
    if img is not None and lab is not None:
        if len(lab.shape) != 3:
            why = f"expected a 3-D label map, got shape {lab.shape}"
        else:
            why = grid_mismatch(img, lab) or label_values_problem(lab, max_label)
        if why:
            problems.append(f"{label}: {why} (image {image.name}; dataset.json lists labels 0..{max_label})")
            return img, None
    return img, lab


@lru_cache(maxsize=16)
def _read_properties(path: str, mtime: float) -> dict:
    try:
        datalist = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the datalist ({e}); write it with tools/prepare.py msd FOLDER.") from e
    props = datalist.get("properties") if isinstance(datalist, dict) else None
    if not isinstance(props, dict):
        raise DatasetError(
            f"{path} has no 'properties' block (channels, labels, normalisation, spacing, ROI): it was not written by "
            f"tools/prepare.py msd FOLDER; run that on the dataset folder."
        )
    return props


def dataset_properties(datalist_file: str | os.PathLike) -> dict:
    """The "properties" block of an MSD datalist (see the module docstring), with ``class_names`` (the foreground
    label names in class order) and ``out_channels`` (classes with background) added.

    Raises:
        FileNotFoundError: no datalist, with the command that writes it.
        DatasetError: a datalist without the block.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"Datalist not found: {path}. Create it from the dataset folder with tools/prepare.py msd FOLDER "
            f"(it holds the channels, labels and intensity settings the msd_seg bundle is built from), or set --datalist_file."
        )
    props = dict(_read_properties(str(path.resolve()), path.stat().st_mtime))
    labels = {int(k): v for k, v in props["labels"].items()}
    props["class_names"] = [labels[k] for k in sorted(labels) if k != 0]
    props["out_channels"] = len(labels)
    return props
