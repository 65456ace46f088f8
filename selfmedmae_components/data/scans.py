"""A hospital's own images as a self pre-training dataset for the msd_seg bundle: any folder tree of DICOM, NIfTI,
NRRD and MetaImage files, or a PACS over DICOMweb, prepared by one command.

    python tools/prepare.py scans /data/export --out /data/scans [--labels /data/labels] [--modality CT] [--workers 8]
    python tools/prepare.py scans http://pacs:8042/dicom-web --out /data/scans --query Modality=CT

Then msd_seg's four stages run on it with ``--dataset_dir /data/scans`` and no edit. It writes, never touching the
source:

    OUT/images/<key>.nii.gz   every usable volume once (a DICOM series: grouped by SeriesInstanceUID whatever its
                              folders, slices sorted along their normal, modality LUT applied: HU for CT)
    OUT/labels/<key>.nii.gz   the labels matched to them, moved onto their image's grid
    OUT/datalist.json         msd_seg's datalist (data/msd.py): the labelled cases split as ``prepare msd`` splits
                              them, the unlabelled ones in "unlabelled" (MAE pre-training only), the settings derived
                              from the data (CT window or z-score, median spacing, a fitting ROI, the step budget,
                              ``cache: disk``)
    OUT/manifest.csv          one row per series or file of the source (and per label file): used or skipped, why
    OUT/.records/<key>.json   what each source became: a second call converts only what is new or changed, and
                              retrieves from a PACS only the series it does not have yet

Names: a series or file is known by its key, the first 16 hex digits of the SHA-256 of its SeriesInstanceUID (DICOM)
or of its path in the source (files). No patient-identifying DICOM attribute (name, ID, dates, accession number,
institution, ...) nor any UID reaches a file written here or the log; the manifest's ``source`` column is the path
in your own tree (or the PACS URL and the key).

Labels (``--labels FOLDER``): NIfTI, NRRD or MetaImage label maps, or 3D Slicer segmentations (``.seg.nrrd``, whose
segment names become the class names, matched by name across files). A label file belongs to the image whose name it
bears, without extensions and an optional suffix (``_label``, ``-seg``, ...): the same path relative to the label
folder as the image's in the source (``LABELS/ct/a.nii.gz`` for ``SRC/ct/a.nii.gz``, ``LABELS/p1/series_3.seg.nrrd``
for the DICOM series alone in ``SRC/p1/series_3/``), or the same file or folder name where only one image has it, or
the image's key, or the series' SeriesInstanceUID.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..io import write_json_atomic, write_text_atomic
from . import dicom, volumes
from .common import DatasetError, progress, seeded_split, split_record
from .msd import derive_properties, foreground_sample, ras_shape, ras_spacing

__all__ = ["prepare_datalist", "MANIFEST_COLUMNS", "file_key"]

MANIFEST_COLUMNS = (
    "key",
    "source",
    "kind",
    "files",
    "modality",
    "shape",
    "spacing_mm",
    "orientation",
    "status",
    "role",
    "reason",
    "label",
)
VOLUME_MODALITIES = ("CT", "MR", "PT", "NM")
LABEL_SUFFIXES = ("_label", "-label", "_labels", "_seg", "-seg", "_mask", "-mask", "_segmentation", "-segmentation")
MIN_SLICES = 8  # fewer slices than this: not a volume to pre-train on (a scout, a single image, a key image)
BODY_HU = -500.0  # without labels, a CT window comes from the voxels above this (inside the body)
WINDOW_CASES = 100  # images sampled for the window without labels


def file_key(relative_path: str) -> str:
    """The key of a volume file: the first 16 hex digits of the SHA-256 of its path in the source."""
    return hashlib.sha256(relative_path.encode()).hexdigest()[:16]


@dataclass
class Source:
    """One series or file to convert: ``where`` names it for the manifest, ``names`` what a label may be called."""

    key: str
    kind: str  # dicom, dicomweb, nifti, nrrd, metaimage
    where: str
    files: int
    modality: str
    fingerprint: str
    payload: Any = field(repr=False)
    names: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ finding the sources
def _kind(suffix: str) -> str:
    return {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd"}.get(suffix, "metaimage")


def _fingerprint(paths: list[str]) -> str:
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted(paths)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]


def folder_sources(root: Path, workers: int) -> tuple[list[Source], list[dict]]:
    """The volume files and DICOM series under ``root``, and a manifest row for every other file."""
    files = sorted(str(Path(d) / f) for d, _, names in os.walk(root) for f in names)
    rows, sources, other = [], [], []
    detached = {volumes.stem(f) for f in files if volumes.volume_suffix(f) in (".mhd", ".nhdr")}
    for f in files:
        rel = os.path.relpath(f, root)
        suffix = volumes.volume_suffix(f)
        if suffix:
            sources.append(
                Source(
                    file_key(rel),
                    _kind(suffix),
                    rel,
                    1,
                    "",
                    _fingerprint([f]),
                    f,
                    (volumes.stem(rel), Path(volumes.stem(rel)).name),
                )
            )
        elif f.lower().endswith(volumes.DATA_SUFFIXES) and re.sub(r"\.(z?raw)(\.gz)?$", "", f, flags=re.I) in detached:
            rows.append(
                _row(file_key(rel), rel, "file", 1, "skipped", "the data file of a detached header (.mhd, .nhdr)")
            )
        else:
            other.append(f)
    series, unusable = dicom.scan_files(other, workers=workers)
    rows += [
        _row(file_key(os.path.relpath(p, root)), os.path.relpath(p, root), "file", 1, "skipped", why)
        for p, why in unusable
    ]
    folders = [dicom.series_folder(s) for s in series]
    for s, folder in zip(series, folders):
        rel = os.path.relpath(folder, root)
        # a label may be named after the series' folder when no other series has files in it
        alone = sum(f == folder or f.startswith(folder + os.sep) for f in folders) == 1
        names = (rel, Path(rel).name) if alone and rel != "." else ()
        paths = [i.source for i in s.instances]
        sources.append(
            Source(s.key, "dicom", rel + "/", len(paths), s.modality, _fingerprint(paths), s, names + (s.uid,))
        )
    return sources, rows


def _public(url: str) -> str:
    from .dicomweb import public_url

    return public_url(url)


def remote_sources(url: str, query: Any) -> tuple[list[Source], Any]:
    """The series a DICOMweb server lists for ``query``."""
    from . import dicomweb

    client = dicomweb.connect(url)
    found = dicomweb.list_series(client, query)
    where = dicomweb.public_url(url)
    sources = [
        Source(
            dicomweb.series_key(r.series_uid),
            "dicomweb",
            f"{where} series {dicomweb.series_key(r.series_uid)}",
            r.num_instances or 0,
            r.modality,
            f"{r.series_uid}:{r.num_instances}",
            (url, r),
            (r.series_uid,),
        )
        for r in found
    ]
    return sources, client


# ------------------------------------------------------------------------------------------ converting one source
_clients: dict[str, Any] = {}


def _series_of(source: Source) -> dicom.Series:
    """The source's DICOM series, its instances in memory for a PACS series; one copy of each SOP instance."""
    if source.kind == "dicomweb":
        from . import dicomweb

        url, remote = source.payload
        client = _clients.get(url)
        if client is None:  # one connection per process
            client = _clients[url] = dicomweb.connect(url)
        datasets = dicomweb.retrieve_series(client, remote)
        series = dicom.group_series(dicom.Instance("dicomweb", ds, ds) for ds in datasets)
        if len(series) != 1:
            raise dicom.DicomError(f"the PACS sent {len(series)} series for one")
        series = series[0]
    elif isinstance(source.payload, list):  # file paths (a worker process reads the headers again)
        (series,) = dicom.group_series(dicom.read_instance(p) for p in source.payload)
    else:
        series = source.payload
    seen, unique = set(), []
    for instance in series.instances:  # the same image twice (a copied folder, a CD exported twice)
        sop = str(instance.header.get("SOPInstanceUID", instance.source))
        if sop not in seen:
            seen.add(sop)
            unique.append(instance)
    return dicom.Series(series.uid, unique)


def _load(source: Source, min_slices: int) -> tuple[np.ndarray, np.ndarray]:
    if source.kind in ("dicom", "dicomweb"):
        series = _series_of(source)
        problem = dicom.volume_problem(series, min_slices=min_slices)
        if problem:
            raise dicom.DicomError(problem)
        return dicom.load_volume(series)
    data, affine = volumes.read_volume(source.payload)
    data = np.squeeze(data, axis=3) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim == 4:
        raise ValueError(
            f"a 4-D image ({data.shape[3]} channels or time points): scans takes 3-D volumes "
            f"(multi-channel data: tools/prepare.py msd)"
        )
    if data.ndim != 3 or min(data.shape) < min_slices:
        raise ValueError(f"not a volume: shape {tuple(data.shape)} (at least {min_slices} voxels on every axis)")
    if data.dtype == np.float64 or data.dtype.kind not in "iuf":
        data = data.astype(np.float32)
    return data, affine


def convert(source: Source, out: str, min_slices: int) -> dict:
    """Load one source and write ``images/<key>.nii.gz``; the manifest row (skipped with the reason if it is not a
    usable volume; ``retry`` for a PACS that did not answer)."""
    row = _row(source.key, source.where, source.kind, source.files, "skipped", "", source.modality)
    try:
        data, affine = _load(source, min_slices)
    except (dicom.DicomError, ValueError, OSError) as e:
        row["reason"] = str(e)
        row["retry"] = type(e).__name__ == "DicomwebError"
        return row
    except Exception as e:  # one odd file must not stop an archive of thousands; its row says what happened
        row["reason"] = f"unexpected error ({type(e).__name__}: {e}); tried again at the next call"
        row["retry"] = True
        return row
    image = f"images/{source.key}.nii.gz"
    volumes.write_nifti(data, affine, Path(out) / image)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    row.update(
        status="used",
        image=image,
        shape="x".join(map(str, data.shape)),
        spacing_mm="x".join(f"{z:.3g}" for z in zooms),
        orientation=volumes.axcodes(affine),
    )
    return row


def _row(key, source, kind, files, status, reason, modality="") -> dict:
    return {
        "key": key,
        "source": source,
        "kind": kind,
        "files": files,
        "modality": modality,
        "status": status,
        "reason": reason,
    }


def _convert_packed(args: tuple) -> dict:
    return convert(*args)


def convert_all(sources: list[Source], out: Path, workers: int, min_slices: int) -> list[dict]:
    """Every source's row: reused from ``.records`` when its fingerprint is unchanged, else converted (``workers``
    processes); each new row recorded atomically as soon as it is done."""
    rows: dict[str, dict] = {}
    todo = []
    for s in sources:
        record = _read_record(out, s)
        if record is not None:
            rows[s.key] = record
        else:
            todo.append(s)
    if todo:
        print(f"Converting {len(todo)} series and files ({len(sources) - len(todo)} done before) ...", flush=True)
    jobs = [(_portable(s) if workers > 1 else s, str(out), min_slices) for s in todo]
    if workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(workers)
        done = pool.map(_convert_packed, jobs)
    else:
        pool, done = None, map(_convert_packed, jobs)
    try:
        for s, row in progress(zip(todo, done), len(todo), f"  {len(todo)} to convert"):
            rows[s.key] = row
            if not row.get("retry"):
                write_json_atomic({"fingerprint": s.fingerprint, "row": row}, out / ".records" / f"{s.key}.json")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [rows[s.key] for s in sources]


def _portable(source: Source) -> Source:
    """A source to send to a worker process: a local series as its file paths (a header pickles slowly)."""
    if isinstance(source.payload, dicom.Series):
        return Source(**{**source.__dict__, "payload": [i.source for i in source.payload.instances]})
    return source


def _read_record(out: Path, source: Source) -> dict | None:
    try:
        record = json.loads((out / ".records" / f"{source.key}.json").read_text())
    except (OSError, ValueError):
        return None
    row = record.get("row", {})
    if record.get("fingerprint") != source.fingerprint or (
        row.get("status") == "used" and not (out / row["image"]).is_file()
    ):
        return None
    return row


# ------------------------------------------------------------------------------------------ labels
def _label_name(rel: str) -> str:
    name = volumes.stem(rel)
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def match_labels(label_root: Path, sources: list[Source], rows: list[dict]) -> tuple[dict[str, Path], list[dict]]:
    """{image key: label file} for the used images, and a manifest row for each label file not used."""
    used = {s.key: s for s, r in zip(sources, rows) if r["status"] == "used"}
    exact, by_name = {}, {}
    for key, s in used.items():
        for n in (key, *s.names):
            exact.setdefault(n, set()).add(key)
        for n in s.names[1:2]:
            by_name.setdefault(n, set()).add(key)
    matched: dict[str, Path] = {}
    skipped = []
    files = sorted(Path(d) / f for d, _, names in os.walk(label_root) for f in names)
    for f in files:
        rel = os.path.relpath(f, label_root)
        row = _row(file_key("labels/" + rel), str(f), "label", 1, "skipped", "")
        if not volumes.volume_suffix(f):
            skipped.append({**row, "reason": "not a label volume (expected NIfTI, NRRD, MetaImage or .seg.nrrd)"})
            continue
        name = _label_name(rel)
        keys = exact.get(name) or exact.get(Path(name).name) or by_name.get(Path(name).name) or set()
        if len(keys) != 1:
            why = "matches no image" if not keys else f"matches {len(keys)} images ({', '.join(sorted(keys))})"
            skipped.append({**row, "reason": f"{why}: name it as its image (path, file or folder name, key)"})
        elif (key := next(iter(keys))) in matched:
            skipped.append({**row, "reason": f"a second label for image {key} (first: {matched[key]})"})
        else:
            matched[key] = f
    return matched, skipped


class _Classes:
    """Class numbers and names over all label files: a plain label map's values are its classes; a segmentation's
    named segments are matched by name (case-insensitive) to the classes seen before or given."""

    def __init__(self, given: list[str] | None) -> None:
        self.names: dict[int, str] = {i + 1: str(n) for i, n in enumerate(given or [])}
        self.fixed = bool(given)

    def lookup(self, values: np.ndarray, segment_names: dict[int, str]) -> np.ndarray:
        """A table from the file's values to class numbers; raises ValueError for an unknown segment name when the
        names were given."""
        table = np.arange(int(values.max(initial=0)) + 1, dtype=np.int64)
        by_name = {n.casefold(): c for c, n in self.names.items()}
        for value, name in sorted(segment_names.items()):
            if value >= len(table):
                continue
            if name.casefold() in by_name:
                table[value] = by_name[name.casefold()]
            elif self.fixed:
                raise ValueError(f"segment {name!r} is not one of --label_names {list(self.names.values())}")
            else:
                number = value if value not in self.names else max(self.names, default=0) + 1
                self.names[number], by_name[name.casefold()] = name, number
                table[value] = number
        return table

    def labels(self, highest: int) -> dict[int, str]:
        top = max([highest, *self.names])
        return {0: "background", **{c: self.names.get(c, f"label {c}") for c in range(1, top + 1)}}


def write_labels(
    matched: dict[str, Path], rows: list[dict], out: Path, label_names: list[str] | None
) -> tuple[dict, list]:
    """Each matched label on its image's grid as ``labels/<key>.nii.gz``; (labels by class, manifest rows of the
    label files refused)."""
    classes, refused, highest = _Classes(label_names), [], 0
    by_key = {r["key"]: r for r in rows}
    for key, path in sorted(matched.items(), key=lambda kv: str(kv[1])):
        row = by_key[key]
        image = nib.load(out / row["image"])
        try:
            values, affine, names = volumes.read_segments(path)
            table = classes.lookup(values, names)
            label = table[volumes.resample_label(values, affine, image.shape[:3], image.affine)].astype(np.uint8)
            if values.any() and not label.any():
                raise ValueError("its labelled voxels all lie outside the image's grid (another image's label?)")
        except ValueError as e:
            refused.append(_row(file_key("labels/" + str(path)), str(path), "label", 1, "skipped", str(e)))
            continue
        highest = max(highest, int(label.max(initial=0)))
        volumes.write_nifti(label, image.affine, out / "labels" / f"{key}.nii.gz")
        row.update(label=str(path), label_file=f"labels/{key}.nii.gz")
    return classes.labels(highest), refused


# ------------------------------------------------------------------------------------------ the datalist
def _choose_modality(sources: list[Source], given: str | None) -> str:
    if given:
        return str(given).upper()
    counts = Counter(s.modality.upper() for s in sources if s.modality.upper() in VOLUME_MODALITIES)
    if not counts:
        if any(s.kind not in ("dicom", "dicomweb") for s in sources):
            raise DatasetError(
                "the source has volume files but no DICOM series to take the modality from: give "
                "--modality CT or --modality MR (CT gets a HU window, MR a z-score)."
            )
        raise DatasetError("found no CT, MR, PET or NM series in the source (see the manifest for what was found).")
    return max(counts, key=lambda m: (counts[m], m == "CT"))


def _not_taken(source: Source, chosen: str, given: str | None) -> str:
    """Why a series of another modality is left out: what it is, if not a volume at all (a dose report, a
    screenshot), else its modality."""
    if source.kind == "dicom" and source.modality.upper() not in VOLUME_MODALITIES:
        problem = dicom.volume_problem(source.payload)
        if problem:
            return problem
    if source.kind == "dicomweb" and source.modality.upper() not in VOLUME_MODALITIES:
        return f"not a cross-sectional image: modality {source.modality} in the PACS's listing (not retrieved)"
    return (
        f"modality {source.modality}; this dataset takes {chosen} "
        f"({'--modality' if given else 'the most common; --modality to choose'})"
    )


def _window_samples(cases: list[dict], out: Path, labelled: bool, seed: int) -> tuple[list[np.ndarray], str]:
    rng = np.random.default_rng(seed)
    samples = []
    if labelled:
        for c in cases:
            samples.append(foreground_sample(nib.load(out / c["image"]), nib.load(out / c["label_file"]), rng))
        return samples, "the image inside the label foreground over the training cases"
    for c in cases[:WINDOW_CASES]:
        data = np.asanyarray(nib.load(out / c["image"]).dataobj)
        body = data[data > BODY_HU]
        samples.append(body if body.size <= 10000 else rng.choice(body, 10000, replace=False))
    return samples, f"the voxels above {BODY_HU:g} HU (the body: no labels) of {min(len(cases), WINDOW_CASES)} images"


def _split(labelled: list[dict], eval_fraction: float, num_val_cases: int | None, seed: int) -> tuple[list, list, list]:
    n = len(labelled)
    if n < 3:  # too few to hold any out: all fine-tune (validation_mode none), said in the summary
        return list(range(n)), [], []
    n_eval = int(round(n * eval_fraction))
    n_val = max(1, int(round(0.1 * (n - n_eval)))) if num_val_cases is None else int(num_val_cases)
    if not 0 <= n_val < n - n_eval:
        raise DatasetError(
            f"{n} labelled cases: too few for {n_eval} evaluation and {n_val} validation cases with "
            f"at least one left for training (--eval_fraction, --num_val_cases)."
        )
    return seeded_split(n, n_eval, n_val, seed)


def write_manifest(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(text.getvalue(), path)


def prepare_datalist(
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    modality: str | None = None,
    workers: int | None = None,
    query: Any = None,
    label_names: list[str] | None = None,
    seed: int = 0,
    eval_fraction: float = 0.2,
    num_val_cases: int | None = None,
    min_slices: int = MIN_SLICES,
    normalization: str | None = None,
    hu_window: list[float] | None = None,
    pixdim: list[float] | None = None,
    roi_size: list[int] | None = None,
    cache: str = "disk",
    pretrain_steps: int | None = None,
) -> dict:
    """Prepare a folder tree or a DICOMweb server as msd_seg's dataset in ``out`` (see the module docstring).

    Args:
        src: a folder (any tree of DICOM, NIfTI, NRRD, MetaImage files) or a DICOMweb URL (``http://host/dicom-web``;
            credentials in the URL or DICOMWEB_USERNAME / DICOMWEB_PASSWORD / DICOMWEB_TOKEN).
        out: the dataset folder to write (created; not inside ``src``).
        labels: a folder of label files, matched to the images by name.
        modality: CT or MR: the images to use (default: the most common among the DICOM series); volume files,
            which do not say, are taken as this modality.
        workers: processes reading and converting (default: the CPU count, at most 8).
        query: DICOMweb search filters, e.g. ``Modality=CT`` or ``["Modality=CT", "StudyDate=2024*"]``.
        label_names: the class names in order (class 1, 2, ...); segment names of ``.seg.nrrd`` files must be among
            them. Default: the segments' names, else ``label 1``, ``label 2`` ...
        seed, eval_fraction, num_val_cases: the split of the labelled cases (as ``tools/prepare.py msd``).
        min_slices: fewer slices (voxels on an axis) than this: not a volume.
        normalization, hu_window, pixdim, roi_size, pretrain_steps: instead of the derived settings (data/msd.py).
        cache: the training cache the bundle defaults to (disk: memory flat at any archive size).

    Returns:
        The datalist that was written.

    Raises:
        DatasetError: no output folder, an output inside the source, nothing usable, a PACS that cannot be reached.
    """
    remote = str(src).startswith(("http://", "https://"))
    where = _public(str(src)) if remote else str(src)  # a URL without its credentials, for every message
    if out is None:
        raise DatasetError("--out is required: the folder the dataset is written to (never the source).")
    out = Path(out).expanduser().resolve()
    workers = int(workers) if workers else min(8, os.cpu_count() or 1)
    if not remote:
        root = Path(src).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError(f"source folder {root} does not exist (expected a folder of DICOM, NIfTI, NRRD files).")
        if out == root or root in out.parents:
            raise DatasetError(f"--out {out} lies inside the source {root}: the source is never written to.")
    if labels is not None and not Path(labels).is_dir():
        raise DatasetError(f"--labels {labels} is not a folder (expected label files named as their images).")
    out.mkdir(parents=True, exist_ok=True)

    if remote:
        sources, extra_rows = remote_sources(str(src), query)[0], []
    else:
        print(f"Reading the headers under {root} ...", flush=True)
        sources, extra_rows = folder_sources(root, workers)
    chosen = _choose_modality(sources, modality)
    for s in sources:
        s.modality = s.modality or chosen
    wanted = [s for s in sources if s.modality.upper() == chosen]
    other = [
        _row(s.key, s.where, s.kind, s.files, "skipped", _not_taken(s, chosen, modality), s.modality)
        for s in sources
        if s.modality.upper() != chosen
    ]
    rows = convert_all(wanted, out, workers, int(min_slices))
    for r in rows:
        r["modality"] = r["modality"] or chosen
    matched, label_rows = match_labels(Path(labels), wanted, rows) if labels else ({}, [])
    classes, refused = write_labels(matched, rows, out, label_names)
    used = [r for r in rows if r["status"] == "used"]
    if not used:
        write_manifest(rows + other + extra_rows + label_rows + refused, out / "manifest.csv")
        raise DatasetError(f"no usable {chosen} volume in {where}: see {out / 'manifest.csv'} for each file's reason.")
    datalist = _datalist(
        used,
        classes,
        chosen,
        out,
        seed,
        eval_fraction,
        num_val_cases,
        where,
        dict(
            normalization=normalization,
            hu_window=hu_window,
            pixdim=pixdim,
            roi_size=roi_size,
            cache=cache,
            pretrain_steps=pretrain_steps,
        ),
    )
    write_manifest(rows + other + extra_rows + label_rows + refused, out / "manifest.csv")
    _summary(datalist, rows + other + extra_rows, label_rows + refused, out)
    return datalist


def _datalist(used, classes, modality, out, seed, eval_fraction, num_val_cases, where, given) -> dict:
    labelled = [r for r in used if r.get("label_file")]
    unlabelled = [r for r in used if not r.get("label_file")]
    training, validation, evaluation = _split(labelled, eval_fraction, num_val_cases, seed)
    for role, indices in (("training", training), ("validation", validation), ("evaluation", evaluation)):
        for i in indices:
            labelled[i]["role"] = role
    for r in unlabelled:
        r["role"] = "unlabelled"
    images = [nib.load(out / r["image"]) for r in used]
    spacings = [ras_spacing(img) for img in images]
    sizes_mm = [sp * ras_shape(img) for sp, img in zip(spacings, images)]
    normalization = given["normalization"] or ("window" if modality == "CT" else "zscore")
    samples, window_source = [], ""
    if normalization == "window" and given["hu_window"] is None:
        cases = [labelled[i] for i in training] if training else unlabelled
        samples, window_source = _window_samples(cases, out, bool(training), seed)
    properties = derive_properties(
        {0: modality},
        classes,
        spacings,
        sizes_mm,
        samples,
        num_pretrain_images=len(used) - len(evaluation),
        seed=seed,
        geometry_source="every image used",
        window_source=window_source,
        **given,
    )
    properties["pretrain_lists"] = ["training", "validation", "unlabelled"]
    pair = lambda r: {"image": r["image"], "label": r["label_file"]}  # noqa: E731
    datalist = {
        "name": "scans",
        "description": f"prepared by tools/prepare.py scans from {where}",
        "labels": properties["labels"],
        "modality": properties["modality"],
        "properties": properties,
        "split": {
            **split_record(seed, eval_fraction, len(validation)),
            "method": "as tools/prepare.py msd, over the labelled cases sorted by key",
        },
        "training": [pair(labelled[i]) for i in training],
        "validation": [pair(labelled[i]) for i in validation],
        "evaluation": [pair(labelled[i]) for i in evaluation],
        "test": [],
        "unlabelled": [{"image": r["image"]} for r in unlabelled],
    }
    write_json_atomic(datalist, out / "datalist.json")
    return datalist


def _summary(datalist: dict, rows: list[dict], label_rows: list[dict], out: Path) -> None:
    skipped = Counter(re.sub(r"\(.*|:.*", "", r["reason"]).strip() for r in rows if r["status"] == "skipped")
    p = datalist["properties"]
    lines = [
        f"scans: {sum(r['status'] == 'used' for r in rows)} volumes used of {len(rows)} series and files; "
        f"{len(datalist['training'])} training, {len(datalist['validation'])} validation, "
        f"{len(datalist['evaluation'])} evaluation (labelled), {len(datalist['unlabelled'])} unlabelled (MAE only)",
        f"  {p['modality']['0']}, pixdim {p['pixdim']}, roi {p['roi_size']}, "
        + (f"window [{p['hu_min']}, {p['hu_max']}]" if p["hu_min"] is not None else "z-score")
        + f", {p['pretrain_steps']} MAE steps, cache {p['cache']}",
    ]
    lines += [f"  skipped {n}: {why}" for why, n in skipped.most_common()]
    if label_rows:
        lines.append(f"  {len(label_rows)} label file(s) not used (see the manifest)")
    if 0 < len(datalist["training"]) < 3 and not datalist["validation"]:
        lines.append("  fewer than 3 labelled cases: all fine-tune, none held out (finetune --validation_mode none)")
    lines.append(f"  -> {out / 'datalist.json'}, {out / 'manifest.csv'}")
    print("\n".join(lines), flush=True)
