"""DICOM files of an archive (exported from a PACS or a CD, in any folder structure) grouped into series, each
series checked for being one 3-D volume, and loaded as a NIfTI-ordered array with its RAS affine.

A hospital export is messy: series spread over folders or interleaved in one, localizers, dose reports,
screenshots, enhanced multi-frame objects, a slice missing, a truncated copy, a README. Every file and series gets
either used or a reason in words, so a manifest can say what was left out and why (nothing lost, nothing silent):

    read_instance(path)        one file's header (no pixels); NotDicomError / DicomError with the reason
    scan_files(paths, workers) the readable files grouped into Series by SeriesInstanceUID, and (path, reason)
                               for the rest
    volume_problem(series)     why a series cannot be a 3-D volume, or None
    load_volume(series)        (data [column, row, slice], 4x4 affine to RAS mm), the geometry MONAI's ITKReader
                               gives for the same series (GDCM sorts slices along the normal as done here)

Privacy: series are named by ``Series.key`` (a hash of the SeriesInstanceUID) in anything written. This module
never logs or prints an attribute value, and silences pydicom's warnings (they quote values). ``PHI_KEYWORDS``
lists the attributes that identify a patient, ``phi_values`` their values in a header, for checks on outputs.

Headers are kept small: a few 100k files must fit in memory, so an instance read from a file keeps the public
top-level attributes only (vendors' private tags and nested sequences are most of a header; the Modality LUT
Sequence is kept). Pixels are decoded by pydicom; a transfer syntax it cannot decode here (JPEG lossless, JPEG
2000 ... without plugins) is decoded by ITK's GDCM, which reads every one.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as _uid
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import BaseTag

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut
    from pydicom.pixels import pixel_array as _pydicom_pixels
except ImportError:  # pydicom 2, as MONAI Label 0.8.5 pins it: every exported bundle imports this module there (the
    # server converts DICOM series itself); reading series here needs pydicom 3 (read_instance says so)
    apply_modality_lut = _pydicom_pixels = None

__all__ = [
    "Instance",
    "Series",
    "DicomError",
    "NotDicomError",
    "PHI_KEYWORDS",
    "VOLUME_SOP_CLASSES",
    "phi_values",
    "has_dicom_marker",
    "read_instance",
    "scan_files",
    "group_series",
    "series_folder",
    "volume_problem",
    "load_volume",
]

# Attributes that identify a patient (a subset of DICOM PS3.15's Basic Application Level Confidentiality Profile:
# names, identifiers, dates and times, places, people). UIDs identify too; outputs use Series.key instead.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "MilitaryRank",
    "MedicalRecordLocator",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "StationName",
    "DeviceSerialNumber",
    "RequestedProcedureID",
    "ScheduledProcedureStepID",
    "PerformedProcedureStepID",
)

# SOP classes of cross-sectional images; the enhanced (multi-frame) ones are recognised, then refused as such
VOLUME_SOP_CLASSES = frozenset(
    {
        _uid.CTImageStorage,
        _uid.EnhancedCTImageStorage,
        _uid.LegacyConvertedEnhancedCTImageStorage,
        _uid.MRImageStorage,
        _uid.EnhancedMRImageStorage,
        _uid.LegacyConvertedEnhancedMRImageStorage,
        _uid.PositronEmissionTomographyImageStorage,
        _uid.EnhancedPETImageStorage,
        _uid.LegacyConvertedEnhancedPETImageStorage,
        _uid.NuclearMedicineImageStorage,
    }
)

MIN_SLICES = 3
ORIENTATION_TOLERANCE = 1e-3  # direction cosines closer than this are one orientation
PIXEL_SPACING_TOLERANCE_MM = 1e-3  # pixel spacings closer than this are one spacing
DUPLICATE_TOLERANCE_MM = 0.01  # images closer than this along the normal are at one position
TILT_TOLERANCE_MM = 0.05  # a slice further than this from the line along the normal through the first: tilted
STEP_RTOL, STEP_ATOL_MM = 0.01, 0.02  # a slice step within this of the median step is even
GAP_MULTIPLE_TOLERANCE = 0.1  # a step within this (in steps) of k >= 2 median steps: k - 1 slices missing

_KEPT_SEQUENCES = frozenset({0x00283000})  # Modality LUT Sequence (load_volume applies it)
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF


class DicomError(ValueError):
    """A DICOM file or series that cannot be used; the message is the reason, in words for a manifest."""


class NotDicomError(DicomError):
    """A file that is not DICOM at all (a README, a thumbnail, an index of another format)."""


@dataclass(repr=False)
class Instance:
    """One DICOM object: ``source`` its path (or a name such as "dicomweb" for one held in memory), ``header`` its
    attributes without pixels, ``dataset`` the whole dataset with pixels when held in memory (else None). Its repr
    shows the source only (a header holds PHI)."""

    source: str
    header: pydicom.Dataset
    dataset: pydicom.Dataset | None = None

    def __repr__(self) -> str:
        return f"Instance(source={self.source!r}{', in memory' if self.dataset is not None else ''})"


@dataclass(repr=False)
class Series:
    """The instances of one SeriesInstanceUID. ``uid`` is never written anywhere: outputs name a series by ``key``
    (its repr too)."""

    uid: str
    instances: list[Instance]

    @property
    def modality(self) -> str:
        return str(self.instances[0].header.get("Modality", "")) if self.instances else ""

    @property
    def key(self) -> str:
        return hashlib.sha256(self.uid.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Series(key={self.key!r}, modality={self.modality!r}, {len(self.instances)} instances)"


def phi_values(header: pydicom.Dataset) -> set[str]:
    """The non-empty values of ``header``'s PHI_KEYWORDS attributes, as strings (multi-valued ones split)."""
    values = set()
    for keyword in PHI_KEYWORDS:
        value = header.get(keyword)
        if value is None or value == "":
            continue
        items = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
        values.update(str(v) for v in items if str(v))
    return values


# ---------------------------------------------------------------------------------------------------- reading


def has_dicom_marker(path: str | os.PathLike) -> bool:
    """Whether ``path`` carries the DICOM file marker ('DICM' after the 128-byte preamble): a quick test, 132 bytes
    read (files without the preamble exist on old media; :func:`read_instance` takes those too)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A file without the 128-byte preamble (older media, some PACS exports) starts with a group 0002 or 0008
    element in little endian."""
    return len(head) >= 8 and struct.unpack("<H", head[:2])[0] in (0x0002, 0x0008)


def _slim(header: pydicom.Dataset) -> pydicom.Dataset:
    for tag in [t for t, e in header._dict.items() if t.is_private or (e.VR == "SQ" and t not in _KEPT_SEQUENCES)]:
        del header._dict[tag]
    return header


def _is_image(header: pydicom.Dataset) -> bool:
    meta = getattr(header, "file_meta", None) or {}
    sop = header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
    return "Rows" in header or (bool(sop) and _uid.UID(str(sop)).name.endswith("Image Storage"))


def _check_complete(fp, header: pydicom.Dataset, size: int) -> None:
    """``fp`` stands where stop_before_pixels left it: at the pixel data element, or at the end. Raise if the file
    ends early: an image without pixel data, a last value shorter than its length, or pixel data (or, encapsulated,
    its items up to the sequence delimiter) that runs past the end."""
    if not len(header):
        raise DicomError("unreadable DICOM file (no data set after the file meta: truncated or corrupt)")
    if header.file_meta.get("TransferSyntaxUID") == _uid.DeflatedExplicitVRLittleEndian:
        return  # the data set was inflated into memory: fp is not where the pixels are
    implicit, little = header.original_encoding
    end = ">" if little is False else "<"
    head = fp.read(8)
    if not head:
        last = next(reversed(header._dict.values()))  # pydicom keeps a value cut by the end of the file short
        if getattr(last, "length", _UNDEFINED) != _UNDEFINED and len(getattr(last, "value", b"") or b"") < last.length:
            raise DicomError(f"unreadable DICOM file (truncated or corrupt: element {last.tag} runs past the end)")
        if _is_image(header):
            raise DicomError("unreadable DICOM file (truncated: the file ends before the pixel data of its image)")
        return
    if len(head) < 8:
        raise DicomError("unreadable DICOM file (truncated in the pixel data element)")
    group, element = struct.unpack(end + "HH", head[:4])
    if (group << 16 | element) not in _PIXEL_TAGS:
        return
    if implicit:
        length = struct.unpack(end + "L", head[4:8])[0]
    elif head[4:6] in _LONG_VRS:
        extra = fp.read(4)
        length = struct.unpack(end + "L", extra)[0] if len(extra) == 4 else 0
    else:
        length = struct.unpack(end + "H", head[6:8])[0]
    if length != _UNDEFINED:
        if fp.tell() + length > size:
            raise DicomError(
                f"unreadable DICOM file (truncated: the pixel data needs {length} bytes, {size - fp.tell()} remain)"
            )
        return
    while True:  # encapsulated: items (FFFE,E000) up to the sequence delimiter (FFFE,E0DD)
        item = fp.read(8)
        if len(item) < 8:
            raise DicomError("unreadable DICOM file (truncated: the compressed pixel data ends without its delimiter)")
        group, element, length = struct.unpack(end + "HHL", item)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or fp.tell() + length > size:
            raise DicomError("unreadable DICOM file (truncated or corrupt compressed pixel data)")
        fp.seek(length, os.SEEK_CUR)


def read_instance(path: str | os.PathLike) -> Instance:
    """Read one file's header (no pixels; checks that the pixel data is complete).

    Raises:
        NotDicomError: neither the 'DICM' marker at byte 128 nor a DICOM element at byte 0.
        DicomError: a truncated or corrupt DICOM file, a DICOMDIR, a file that cannot be opened.
    """
    path = os.fspath(path)
    if _pydicom_pixels is None:
        raise RuntimeError(f"reading DICOM series needs pydicom >= 3 (this environment has {pydicom.__version__})")
    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote attribute values
            head = fp.read(132)
            marked = head[128:132] == b"DICM"
            if not head:
                raise NotDicomError("not a DICOM file (an empty file)")
            if not marked and not _looks_like_raw_dicom(head):
                raise NotDicomError(
                    "not a DICOM file (expected the 'DICM' marker at byte 128 or a DICOM element at byte 0)"
                )
            fp.seek(0)
            header = pydicom.dcmread(fp, stop_before_pixels=True, force=not marked)
            if not marked and not ("SOPClassUID" in header or "SeriesInstanceUID" in header):
                raise NotDicomError("not a DICOM file (no preamble, and no SOP class or series among its elements)")
            if header.file_meta.get("MediaStorageSOPClassUID") == _uid.MediaStorageDirectoryStorage:
                raise DicomError("DICOMDIR: an index of the media, not an image")
            _check_complete(fp, header, os.fstat(fp.fileno()).st_size)
    except DicomError:
        raise
    except OSError as e:
        raise DicomError(f"unreadable file ({e.strerror or e})") from None
    except Exception as e:  # pydicom's parse errors
        raise DicomError(f"unreadable DICOM file ({_reason(e)})") from None
    return Instance(path, _slim(header))


def _read_or_reason(path: str) -> Instance | str:
    try:
        instance = read_instance(path)
    except DicomError as e:
        return str(e)
    if not instance.header.get("SeriesInstanceUID"):
        return "DICOM file without a SeriesInstanceUID (cannot be grouped into a series)"
    return instance


def _plain(element) -> tuple:
    """An element as builtins: pydicom's raw (tag, VR, length, bytes, ...) tuple, or (tag, VR, value)."""
    if isinstance(element, RawDataElement):
        return (int(element.tag), None if element.VR is None else str(element.VR), *element[2:])
    return int(element.tag), str(element.VR), element.value


def _element(plain: tuple) -> tuple[BaseTag, RawDataElement | DataElement]:
    tag = BaseTag(plain[0])
    if len(plain) == 3:
        return tag, DataElement(tag, plain[1], plain[2], validation_mode=pydicom.config.IGNORE)
    return tag, RawDataElement(tag, *plain[1:])


def _read_packed(path: str) -> tuple | str:
    """_read_or_reason in a worker process. A pickled Dataset converts every value (slow on both sides, and
    pydicom warns quoting values): the header travels as builtins instead, ten times faster to pickle."""
    instance = _read_or_reason(path)
    if isinstance(instance, str):
        return instance
    header = instance.header
    elements = [_plain(e) for e in header._dict.values()]
    return instance.source, elements, [_plain(e) for e in header.file_meta._dict.values()], header.original_encoding


def _unpack(packed: tuple | str) -> Instance | str:
    if isinstance(packed, str):
        return packed
    source, elements, file_meta, encoding = packed
    header = pydicom.Dataset()
    header._dict.update(map(_element, elements))
    header.file_meta = pydicom.dataset.FileMetaDataset()
    header.file_meta._dict.update(map(_element, file_meta))
    header.set_original_encoding(*encoding)
    return Instance(source, header)


def scan_files(paths: Iterable[str | os.PathLike], workers: int = 1) -> tuple[list[Series], list[tuple[str, str]]]:
    """Read every file's header (in ``workers`` processes when > 1, in chunks) and group the DICOM ones into series
    by SeriesInstanceUID, whatever folders they sit in.

    Returns:
        (series sorted by key, [(path, reason)] for the files that cannot be used, in the order given).
    """
    paths = [os.fspath(p) for p in paths]
    if workers > 1 and len(paths) > 1:
        chunk = max(1, min(256, len(paths) // (workers * 4)))
        with ProcessPoolExecutor(workers) as pool:
            results = [_unpack(r) for r in pool.map(_read_packed, paths, chunksize=chunk)]
    else:
        results = [_read_or_reason(p) for p in paths]
    skipped = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
    return group_series(r for r in results if not isinstance(r, str)), skipped


def group_series(instances: Iterable[Instance]) -> list[Series]:
    """Instances grouped by SeriesInstanceUID (those without one are dropped), series sorted by key, instances by
    InstanceNumber then source."""
    groups: dict[str, list[Instance]] = defaultdict(list)
    for instance in instances:
        uid = instance.header.get("SeriesInstanceUID")
        if uid:
            groups[str(uid)].append(instance)
    series = [Series(uid, sorted(group, key=_instance_order)) for uid, group in groups.items()]
    return sorted(series, key=lambda s: s.key)


def series_folder(series: Series) -> str:
    """The deepest folder holding every file of ``series``."""
    paths = [i.source for i in series.instances]
    return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])


def _instance_order(instance: Instance) -> tuple[int, str]:
    try:
        number = int(instance.header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number, instance.source


# ---------------------------------------------------------------------------------------------------- checks


def _sop_class_problem(series: Series) -> str | None:
    for instance in series.instances:
        meta = getattr(instance.header, "file_meta", None) or {}
        sop = instance.header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
        if sop in VOLUME_SOP_CLASSES:
            continue
        name = _uid.UID(str(sop)).name if sop else ""
        if not name or name == str(sop):  # unknown class: its UID is not worth a manifest line
            name = "a private or unknown one" if sop else "none given"
        return f"not a cross-sectional image: SOP class {name}"
    return None


def _image_problem(series: Series, min_slices: int) -> str | None:
    headers = [i.header for i in series.instances]
    for h in headers:
        image_type = [str(v).upper() for v in (h.get("ImageType") or [])]
        if "LOCALIZER" in image_type or "SCOUT" in image_type:
            return f"localizer (scout) images (ImageType {chr(92).join(image_type)}), not a volume"
    frames = max(int(h.get("NumberOfFrames") or 1) for h in headers)
    if frames > 1:
        return (
            f"multi-frame (enhanced) images ({frames} frames in a file): not supported yet; convert them with dcm2niix"
        )
    samples = max(int(h.get("SamplesPerPixel") or 1) for h in headers)
    if samples != 1:
        return f"colour images (SamplesPerPixel {samples}): a volume needs one value per pixel"
    if len(headers) < min_slices:
        return f"{len(headers)} image(s): a volume needs at least {min_slices}"
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if any(not h.get(keyword) for h in headers):
            return f"images without {keyword} (a volume needs position, orientation, pixel spacing and size)"
    sizes = sorted({(int(h.Columns), int(h.Rows)) for h in headers})
    if len(sizes) > 1:
        return "images of different sizes in one series (" + " and ".join(f"{c}x{r}" for c, r in sizes[:2]) + ")"
    return None


def _plane(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.99 else "oblique"


def _grid_problem(headers: list[pydicom.Dataset]) -> str | None:
    spacings = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
    if np.ptp(spacings, axis=0).max() > PIXEL_SPACING_TOLERANCE_MM:
        a, b = spacings[0], spacings[np.argmax(np.abs(spacings - spacings[0]).max(axis=1))]
        return f"images of different pixel spacings in one series ({a[0]:g}x{a[1]:g} and {b[0]:g}x{b[1]:g} mm)"
    cosines = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.ptp(cosines, axis=0).max() > ORIENTATION_TOLERANCE:
        planes = sorted({_plane(np.cross(c[:3], c[3:])) for c in cosines})
        kinds = " and ".join(planes) if len(planes) > 1 else f"{planes[0]}, at several angles"
        return f"images of different orientations in one series ({kinds})"
    return None


def _geometry(series: Series) -> tuple[list[Instance], np.ndarray, np.ndarray, np.ndarray]:
    """(instances sorted along the normal, their positions (n, 3) in LPS mm, distances along the normal, normal)."""
    cosines = np.array([float(v) for v in series.instances[0].header.ImageOrientationPatient])
    normal = np.cross(cosines[:3], cosines[3:])
    positions = np.array([[float(v) for v in i.header.ImagePositionPatient] for i in series.instances])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    return [series.instances[i] for i in order], positions[order], along[order], normal


def _stack_problem(positions: np.ndarray, along: np.ndarray, normal: np.ndarray) -> str | None:
    steps = np.diff(along)
    if (steps < DUPLICATE_TOLERANCE_MM).any():
        distinct = 1 + int((steps >= DUPLICATE_TOLERANCE_MM).sum())
        return (
            f"several images at one position ({distinct} positions for {len(along)} images: "
            "multi-echo, dynamic or duplicate instances)"
        )
    offsets = positions - positions[0]
    off_normal = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if off_normal.max() > TILT_TOLERANCE_MM:
        angle = np.degrees(np.arctan2(off_normal[-1], along[-1] - along[0]))
        return (
            f"gantry tilt: the slice positions run {angle:.1f} degrees off the slice normal "
            "(not a rectangular grid; convert with dcm2niix, which corrects the tilt)"
        )
    return _spacing_problem(np.diff(along), along)


def _spacing_problem(steps: np.ndarray, along: np.ndarray) -> str | None:
    """A missing slice (every uneven step about k >= 2 usual steps), uneven spacing otherwise, or None."""
    usual = float(np.median(steps))
    uneven = np.nonzero(np.abs(steps - usual) > max(STEP_ATOL_MM, STEP_RTOL * usual))[0]
    if not len(uneven):
        return None
    multiples = np.round(steps[uneven] / usual)
    if (multiples >= 2).all() and (np.abs(steps[uneven] / usual - multiples) < GAP_MULTIPLE_TOLERANCE).all():
        i, more = uneven[0], f"; {len(uneven)} gaps in all" if len(uneven) > 1 else ""
        return (
            f"missing slice: a gap of {steps[i]:.2f} mm between positions {along[i]:.2f} and {along[i + 1]:.2f} mm "
            f"along the slice normal, {multiples[0]:.0f} times the usual {usual:.2f} mm step "
            f"({int((multiples - 1).sum())} slice(s) missing{more})"
        )
    return (
        f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm along the slice normal "
        f"(usual {usual:.2f} mm)"
    )


def volume_problem(series: Series, min_slices: int = MIN_SLICES) -> str | None:
    """Why ``series`` cannot be one 3-D volume, in words for a manifest; None when it can.

    In order: a SOP class that is not a cross-sectional image, localizer images, multi-frame files, colour, fewer
    than ``min_slices`` images, missing geometry, different sizes, pixel spacings or orientations, several images
    at one position, gantry tilt, a missing slice, uneven slice spacing (tolerances: the module's constants).
    """
    if not series.instances:
        return "no images"
    problem = _sop_class_problem(series) or _image_problem(series, min_slices)
    problem = problem or _grid_problem([i.header for i in series.instances])
    if problem:
        return problem
    _, positions, along, normal = _geometry(series)
    return _stack_problem(positions, along, normal) if len(along) > 1 else None


# ---------------------------------------------------------------------------------------------------- loading


def _itk_slice(instance: Instance) -> np.ndarray:
    """One image decoded by ITK's GDCM (every transfer syntax), in modality values: GDCM applies the rescale.
    ITK's warnings are off meanwhile (they may quote the file's values)."""
    import itk

    shown = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)
    try:
        if instance.dataset is None:
            image = itk.imread(instance.source, itk.F)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "instance.dcm"
                instance.dataset.save_as(path, enforce_file_format=True)
                image = itk.imread(str(path), itk.F)
    finally:
        itk.Object.SetGlobalWarningDisplay(shown)
    array = itk.array_from_image(image)
    return array.reshape(int(instance.header.Rows), int(instance.header.Columns)).astype(np.float64)


def _in_memory(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset, with a transfer syntax from how it was read when it came without file meta (pydicom's
    decoders need one)."""
    if "TransferSyntaxUID" in (getattr(dataset, "file_meta", None) or {}):
        return dataset
    copy = pydicom.Dataset(dataset)
    copy.file_meta = pydicom.dataset.FileMetaDataset()
    implicit = dataset.original_encoding[0]
    copy.file_meta.TransferSyntaxUID = _uid.ImplicitVRLittleEndian if implicit else _uid.ExplicitVRLittleEndian
    return copy


def _slice_values(instance: Instance) -> np.ndarray:
    """(rows, columns) modality values (CT: HU) of one image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = _pydicom_pixels(instance.source if instance.dataset is None else _in_memory(instance.dataset))
    except (RuntimeError, NotImplementedError):  # no pydicom decoder for this transfer syntax here
        try:
            return _itk_slice(instance)
        except Exception as e:
            raise DicomError(
                f"{instance.source}: pixel data that neither pydicom nor ITK decodes ({_reason(e)})"
            ) from None
    except Exception as e:
        raise DicomError(f"{instance.source}: unreadable pixel data ({_reason(e)})") from None
    return apply_modality_lut(stored, instance.header)


def _reason(error: Exception) -> str:
    """The telling line of an exception: ITK's "ITK ERROR: ..." line (after its source path), else the first."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = next((x for x in lines if x.startswith("ITK ERROR")), lines[0] if lines else type(error).__name__)
    return line[:160]


def _compact(data: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer within int16, else float32."""
    info = np.iinfo(np.int16)
    if data.size and data.min() >= info.min and data.max() <= info.max and np.all(np.mod(data, 1) == 0):
        return data.astype(np.int16)
    return data.astype(np.float32)


def load_volume(series: Series) -> tuple[np.ndarray, np.ndarray]:
    """The series as a volume in NIfTI order.

    Returns:
        (data indexed [column, row, slice], slices sorted by increasing position along the normal (the cross
        product of the row and column cosines), int16 when every modality value is an integer within int16,
        else float32; 4x4 affine from (i, j, k) to RAS mm, its slice step (last - first position) / (n - 1) as
        ITK's).

    Raises:
        DicomError: ``volume_problem(series)``, or pixel data that cannot be decoded.
    """
    problem = volume_problem(series)
    if problem:
        raise DicomError(problem)
    ordered, positions, along, normal = _geometry(series)
    first = ordered[0].header
    cosines = np.array([float(v) for v in first.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    step = (along[-1] - along[0]) / (len(along) - 1) if len(along) > 1 else float(first.get("SliceThickness") or 1)
    lps = np.eye(4)
    lps[:3, 0] = cosines[:3] * column_spacing  # i: along a row, from one column to the next
    lps[:3, 1] = cosines[3:] * row_spacing  # j: down a column, from one row to the next
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    data = np.stack([_slice_values(i) for i in ordered], axis=-1).transpose(1, 0, 2)  # [row, col, k] -> [i, j, k]
    return _compact(data), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
