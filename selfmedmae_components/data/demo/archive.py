"""A small synthetic hospital archive, as messy as a real PACS or CD export, with patient-identifying values in
every DICOM file, so that the DICOM conversion (data/dicom.py) and the archive orchestration (data/scans.py) are
tested on what they will meet, and their outputs can be searched for leaked PHI.

:func:`make_archive` writes under ``out_dir``::

    archive/README.txt                          not an image
    archive/study_a/IM0001 ...                  two CT series interleaved (A1: the first case as painted; A2: a
                                                second case at another slice spacing, stored top slice first),
                                                a localizer series (2 images) and an X-Ray Radiation Dose SR
    archive/study_b/series_1/part1/*.dcm        one CT series over nested folders
    archive/study_b/series_1/part2/more/*.dcm
    archive/study_b/screenshot.dcm              a Secondary Capture (RGB)
    archive/study_c/*.dcm                       a CT series with one slice missing in the middle
    archive/study_c/broken.dcm                  a copy of one of its slices cut in the middle of the pixel data
    archive/volumes/case_nifti.nii.gz           a CT as NIfTI (LPS voxel order, int16 HU)
    archive/volumes/case_nrrd.nrrd              a CT as NRRD (int16 HU)
    labels/series_1.seg.nrrd                    study_b/series_1's label as 3D Slicer saves a segmentation
                                                (cropped to the labelled extent: another grid than the image's)
    labels/case_nifti.nii.gz                    case_nifti's label, same grid
    labels/case_nrrd.nrrd                       case_nrrd's label, a plain labelmap NRRD

The images are data/demo/msd.py's synthetic CTs (liver, spleen, lesion), so a model can learn from them. UIDs
are seeded: the same seed writes the same archive, and series keys are known in advance.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from .msd import LAYOUTS, synthetic_ct
from .shapes import save_nifti

__all__ = [
    "PHI",
    "LABEL_NAMES",
    "make_archive",
    "make_demo",
    "write_case",
    "network_input",
    "ct_slices",
    "write_nrrd",
    "series_key",
]

# Identifying values written into every DICOM file; tests search every output for them
PHI = {
    "PatientName": "DOE^JANE^Q",
    "PatientID": "MRN-0042-7731",
    "PatientBirthDate": "19610203",
    "StudyDate": "20240117",
    "SeriesDate": "20240117",
    "AcquisitionDate": "20240117",
    "ContentDate": "20240117",
    "AccessionNumber": "ACC98765",
    "InstitutionName": "St. Example Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
}
LABEL_NAMES = {int(k): v for k, v in LAYOUTS["ct"]["labels"].items() if k != "0"}  # 1 liver, 2 spleen, 3 lesion
HU_OFFSET = 1024  # stored unsigned value = HU + 1024 (RescaleIntercept -1024), as most CT scanners write
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
_NRRD_TYPES = {np.dtype(np.int16): "short", np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short"}


def series_key(uid: str) -> str:
    """The key data/dicom.py's Series gives the series (repeated here: the generator does not import it)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _uid(seed: int, *parts: str) -> str:
    return generate_uid(entropy_srcs=["selfmedmae-demo-archive", str(seed), *parts])


def _ds(values) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in np.atleast_1d(values)]


def _round_affine(affine: np.ndarray) -> np.ndarray:
    """Spacing to 0.1 um, origin to 1 um: decimal strings in the files give back exactly this affine."""
    out = affine.copy()
    out[:3, :3], out[:3, 3] = np.round(affine[:3, :3], 4), np.round(affine[:3, 3], 3)
    return out


def _file(sop_class: str, sop_uid: str, study: dict, series_uid: str, modality: str, number: int, name: str):
    """A dataset with the file meta, patient, study, series and SOP common modules (and the PHI)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.PatientSex = "F"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "093000"
    ds.StudyInstanceUID, ds.StudyID, ds.StudyDescription = study["uid"], study["id"], "CT ABDOMEN"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, name
    ds.Modality, ds.Manufacturer = modality, "SelfMedMAE demo"
    return ds


def ct_slices(
    image: np.ndarray,
    affine: np.ndarray,
    study: dict,
    series_uid: str,
    frame_uid: str,
    number: int,
    name: str,
    seed: int = 0,
) -> list[Dataset]:
    """CT Image Storage datasets of an int16 HU ``image`` indexed [column, row, slice] with the RAS ``affine``,
    one per slice k, InstanceNumber k + 1 (stored values HU + 1024, RescaleIntercept -1024)."""
    lps = _LPS @ affine
    column_step, row_step, slice_step = (lps[:3, a] for a in range(3))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if image.min() < -HU_OFFSET or image.max() > 65535 - HU_OFFSET:
        raise ValueError(f"HU outside [{-HU_OFFSET}, {65535 - HU_OFFSET}]: not storable with intercept -{HU_OFFSET}")
    out = []
    for k in range(image.shape[2]):
        sop_uid = _uid(seed, series_uid, str(k))
        ds = _file(CTImageStorage, sop_uid, study, series_uid, "CT", number, name)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        position = lps[:3, 3] + k * slice_step
        ds.ImagePositionPatient = _ds(position)
        ds.ImageOrientationPatient = _ds(np.concatenate([column_step / spacing[0], row_step / spacing[1]]))
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # between rows, between columns
        ds.SliceThickness, ds.SliceLocation = _ds(spacing[2])[0], _ds(position[2])[0]
        ds.KVP, ds.PatientPosition = _ds(120)[0], "FFS"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape[1], image.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(-HU_OFFSET)[0], _ds(1)[0], "HU"
        ds.WindowCenter, ds.WindowWidth = _ds(40)[0], _ds(400)[0]
        ds.PixelData = (image[:, :, k].T.astype(np.int32) + HU_OFFSET).astype("<u2").tobytes()
        out.append(ds)
    return out


def _localizer(image: np.ndarray, affine: np.ndarray, study: dict, seed: int) -> list[Dataset]:
    """Two projection images (frontal and lateral) of the case: the CT localizer (topogram) series."""
    series_uid, lps = _uid(seed, "localizer"), _LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    out = []
    for n, (axis, cosines) in enumerate([(1, [1, 0, 0, 0, 0, -1]), (0, [0, 1, 0, 0, 0, -1])]):
        projection = image.mean(axis=axis)[:, ::-1].T  # rows: head to feet; columns: the other in-plane axis
        ds = _file(CTImageStorage, _uid(seed, "localizer", str(n)), study, series_uid, "CT", 1, "Topogram")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.FrameOfReferenceUID, ds.InstanceNumber = _uid(seed, "frame", "a"), n + 1
        ds.ImagePositionPatient = _ds(lps[:3, 3] + (image.shape[2] - 1) * lps[:3, 2])
        ds.ImageOrientationPatient = _ds(cosines)
        ds.PixelSpacing = _ds([spacing[2], spacing[1 - axis]])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = projection.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = _ds(-HU_OFFSET)[0], _ds(1)[0]
        ds.PixelData = np.ascontiguousarray(np.round(projection) + HU_OFFSET).astype("<u2").tobytes()
        out.append(ds)
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dose_report(study: dict, seed: int) -> Dataset:
    """A minimal X-Ray Radiation Dose SR (TID 10011 root with the procedure reported), as CT scanners send."""
    ds = _file(XRayRadiationDoseSRStorage, _uid(seed, "dose", "0"), study, _uid(seed, "dose"), "SR", 997, "Dose Report")
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence, ds.PerformedProcedureCodeSequence = [], []
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = [template]
    procedure = Dataset()
    procedure.RelationshipType, procedure.ValueType = "HAS CONCEPT MOD", "CODE"
    procedure.ConceptNameCodeSequence = [_code("121058", "DCM", "Procedure reported")]
    procedure.ConceptCodeSequence = [_code("77477000", "SCT", "Computed Tomography X-Ray")]
    ds.ContentSequence = [procedure]
    return ds


def _screenshot(study: dict, seed: int, rng: np.random.Generator) -> Dataset:
    """A Secondary Capture (RGB): the kind of screenshot a workstation sends back to the PACS."""
    ds = _file(SecondaryCaptureImageStorage, _uid(seed, "sc", "0"), study, _uid(seed, "sc"), "OT", 999, "Screen Save")
    ds.ConversionType, ds.InstanceNumber, ds.ImageType = "WSD", 1, ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = 24, 32
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8).tobytes()
    return ds


def write_nrrd(path: Path, data: np.ndarray, affine: np.ndarray, fields: dict | None = None) -> None:
    """A gzip NRRD of ``data`` (indexed [i, j, k]) in LPS space from a RAS ``affine``; ``fields`` are written as
    ``key:=value`` lines (3D Slicer's segmentation metadata)."""
    lps = _LPS @ affine
    vector = lambda v: "(" + ",".join(f"{x:.10g}" for x in v) + ")"
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPES[data.dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in data.shape),
        "space directions: " + " ".join(vector(lps[:3, a]) for a in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: " + vector(lps[:3, 3]),
    ]
    lines += [f"{key}:={value}" for key, value in (fields or {}).items()]
    body = gzip.compress(np.asarray(data, data.dtype.newbyteorder("<")).ravel(order="F").tobytes(), mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n\n").encode() + body)


def _write_seg_nrrd(path: Path, label: np.ndarray, affine: np.ndarray) -> dict:
    """``label`` as 3D Slicer saves a segmentation: one layer, cropped to the labelled extent, per-segment
    metadata. Returns {"offset": the crop's first voxel in the image grid, "affine": the crop's RAS affine}."""
    nonzero = np.argwhere(label > 0)
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    crop = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    fields = {}
    colours = {1: "0.866667 0.509804 0.396078", 2: "0.615686 0.423529 0.635294", 3: "0.564706 0.933333 0.564706"}
    for n, (value, name) in enumerate(LABEL_NAMES.items()):
        where = np.argwhere(crop == value)
        extent = " ".join(f"{a} {b}" for a, b in zip(where.min(axis=0), where.max(axis=0))) if len(where) else ""
        fields.update(
            {
                f"Segment{n}_Color": colours[value],
                f"Segment{n}_ColorAutoGenerated": "0",
                f"Segment{n}_Extent": extent,
                f"Segment{n}_ID": f"Segment_{value}",
                f"Segment{n}_LabelValue": str(value),
                f"Segment{n}_Layer": "0",
                f"Segment{n}_Name": name,
                f"Segment{n}_NameAutoGenerated": "0",
                f"Segment{n}_Tags": "Segmentation.Status:inprogress|",
            }
        )
    fields.update(
        {
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|Closed surface|",
            "Segmentation_ConversionParameters": "Smoothing factor|0.5|Smoothing factor used in binary labelmap to "
            "closed surface conversion.&Compute surface normals|1|Compute surface normals. 1 (default) = surface "
            "normals are computed. 0 = surface normals are not computed.",
            "Segmentation_MasterRepresentation": "Binary labelmap",
            "Segmentation_ReferenceImageExtentOffset": " ".join(str(int(v)) for v in lo),
        }
    )
    write_nrrd(path, crop.astype(np.uint8), crop_affine, fields)
    return {"offset": [int(v) for v in lo], "affine": crop_affine}


def _save(datasets: list[Dataset], paths: list[Path]) -> list[str]:
    for ds, path in zip(datasets, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return [str(p) for p in paths]


def _case(seed: int, case: int, shape: tuple[int, int, int]):
    image, label, affine = synthetic_ct(np.random.default_rng([seed, case]), tuple(shape))
    return image, label, _round_affine(affine)


def make_archive(
    out_dir: str | os.PathLike,
    seed: int = 0,
    shape: tuple[int, int, int] = (36, 36, 24),
    extra: int = 0,
    extra_labelled: int = 0,
) -> dict:
    """Write the archive and its labels under ``out_dir`` (see the module docstring); ``extra`` more CT series in
    ``archive/more/extra_<n>/`` (the first ``extra_labelled`` of them labelled as ``labels/more/extra_<n>.nii.gz``),
    for a demo that has something to learn from.

    Returns:
        ``root`` (the archive folder), ``labels_dir``, ``phi`` (the identifying values written: the tests search
        every output for them), ``phi_attributes`` ({keyword: value}), ``sources`` ({name: {"kind": "dicom" |
        "file" | "nifti" | "nrrd", "paths", "use": bool, "reason_contains" (when not used), "series_key" (DICOM
        series)}}), ``labels`` ({source name: {"path", "format", "values"}}; seg.nrrd adds the crop "offset"),
        ``truth`` ({source name: {"image": HU [i, j, k] with slices ascending along the normal, "label",
        "affine": RAS}}) for the volumes that are used, and the one with the missing slice.
    """
    out = Path(out_dir)
    root, labels_dir = out / "archive", out / "labels"
    shape = tuple(int(n) for n in shape)
    sources: dict[str, dict] = {}
    truth: dict[str, dict] = {}
    labels: dict[str, dict] = {}

    def dicom_source(name, datasets, paths, use=True, reason=None):
        sources[name] = {
            "kind": "dicom",
            "paths": _save(datasets, paths),
            "use": use,
            "series_key": series_key(str(datasets[0].SeriesInstanceUID)),
        }
        if reason:
            sources[name]["reason_contains"] = reason

    root.mkdir(parents=True, exist_ok=True)
    (root / "README.txt").write_text("Exported images. Open with a DICOM viewer.\n")
    sources["readme"] = {
        "kind": "file",
        "paths": [str(root / "README.txt")],
        "use": False,
        "reason_contains": "not a DICOM file",
    }

    # study A: A1 and A2 interleaved in one flat folder with a localizer first and the dose report last
    study_a = {"uid": _uid(seed, "study", "a"), "id": "1"}
    image1, label1, affine1 = _case(seed, 1, shape)
    image2, label2, affine2 = _case(seed, 2, (shape[0], shape[1], max(3, shape[2] * 2 // 3)))
    a1 = ct_slices(image1, affine1, study_a, _uid(seed, "A1"), _uid(seed, "frame", "a"), 2, "ABDOMEN 5mm", seed)
    a2 = ct_slices(image2, affine2, study_a, _uid(seed, "A2"), _uid(seed, "frame", "a2"), 3, "ABDOMEN thick", seed)
    for n, ds in enumerate(reversed(a2)):  # stored top slice first, as many scanners number them
        ds.InstanceNumber = n + 1
    localizer, report = _localizer(image1, affine1, study_a, seed), _dose_report(study_a, seed)
    order = localizer + [ds for pair in zip(a1, a2) for ds in pair] + a1[len(a2) :] + a2[len(a1) :] + [report]
    names = {id(ds): root / "study_a" / f"IM{n + 1:04d}" for n, ds in enumerate(order)}
    for name, datasets, reason in (
        ("A1", a1, None),
        ("A2", a2, None),
        ("localizer", localizer, "localizer"),
        ("dose_report", [report], "X-Ray Radiation Dose SR"),
    ):
        dicom_source(name, datasets, [names[id(ds)] for ds in datasets], reason is None, reason)
    truth["A1"] = {"image": image1, "label": label1, "affine": affine1}
    truth["A2"] = {"image": image2, "label": label2, "affine": affine2}

    # study B: one series over nested folders, its Slicer segmentation, and a screenshot
    study_b = {"uid": _uid(seed, "study", "b"), "id": "2"}
    image3, label3, affine3 = _case(seed, 3, shape)
    b1 = ct_slices(image3, affine3, study_b, _uid(seed, "B1"), _uid(seed, "frame", "b"), 2, "ABDOMEN 5mm", seed)
    half = len(b1) // 2
    folder = root / "study_b" / "series_1"
    paths = [folder / "part1" / f"slice_{k + 1:03d}.dcm" for k in range(half)]
    paths += [folder / "part2" / "more" / f"slice_{k + 1:03d}.dcm" for k in range(half, len(b1))]
    dicom_source("series_1", b1, paths)
    truth["series_1"] = {"image": image3, "label": label3, "affine": affine3}
    seg = _write_seg_nrrd(labels_dir / "series_1.seg.nrrd", label3, affine3)
    labels["series_1"] = {
        "path": str(labels_dir / "series_1.seg.nrrd"),
        "format": "seg.nrrd",
        "values": dict(LABEL_NAMES),
        **seg,
    }
    screenshot = _screenshot(study_b, seed, np.random.default_rng([seed, 99]))
    dicom_source("screenshot", [screenshot], [root / "study_b" / "screenshot.dcm"], False, "Secondary Capture")

    # study C: a series with its middle slice missing, and a truncated copy of one of its slices
    study_c = {"uid": _uid(seed, "study", "c"), "id": "3"}
    image4, label4, affine4 = _case(seed, 4, shape)
    c1 = ct_slices(image4, affine4, study_c, _uid(seed, "C1"), _uid(seed, "frame", "c"), 2, "ABDOMEN 5mm", seed)
    kept = [ds for k, ds in enumerate(c1) if k != len(c1) // 2]
    dicom_source(
        "missing_slice",
        kept,
        [root / "study_c" / f"{int(ds.InstanceNumber):04d}.dcm" for ds in kept],
        False,
        "missing slice",
    )
    truth["missing_slice"] = {"image": image4, "label": label4, "affine": affine4}
    whole = Path(sources["missing_slice"]["paths"][0]).read_bytes()
    (root / "study_c" / "broken.dcm").write_bytes(whole[: len(whole) - image4[:, :, 0].nbytes // 2])
    sources["broken"] = {
        "kind": "file",
        "paths": [str(root / "study_c" / "broken.dcm")],
        "use": False,
        "reason_contains": "truncated",
    }

    # volumes already converted, with their labels on the same grid
    image5, label5, affine5 = _case(seed, 5, shape)
    save_nifti(image5, affine5, root / "volumes" / "case_nifti.nii.gz")
    save_nifti(label5, affine5, labels_dir / "case_nifti.nii.gz")
    sources["case_nifti"] = {"kind": "nifti", "paths": [str(root / "volumes" / "case_nifti.nii.gz")], "use": True}
    labels["case_nifti"] = {
        "path": str(labels_dir / "case_nifti.nii.gz"),
        "format": "nifti",
        "values": dict(LABEL_NAMES),
    }
    image6, label6, affine6 = _case(seed, 6, shape)
    write_nrrd(root / "volumes" / "case_nrrd.nrrd", image6, affine6)
    write_nrrd(labels_dir / "case_nrrd.nrrd", label6, affine6)
    sources["case_nrrd"] = {"kind": "nrrd", "paths": [str(root / "volumes" / "case_nrrd.nrrd")], "use": True}
    labels["case_nrrd"] = {"path": str(labels_dir / "case_nrrd.nrrd"), "format": "nrrd", "values": dict(LABEL_NAMES)}
    truth["case_nifti"] = {"image": image5, "label": label5, "affine": affine5}
    truth["case_nrrd"] = {"image": image6, "label": label6, "affine": affine6}

    for n in range(1, int(extra) + 1):
        image, label, affine = _case(seed, 100 + n, shape)
        study = {"uid": _uid(seed, "study", "extra", str(n)), "id": str(100 + n)}
        uid = _uid(seed, "extra", str(n))
        datasets = ct_slices(image, affine, study, uid, _uid(seed, "frame", "extra", str(n)), 2, "ABDOMEN", seed)
        folder = root / "more" / f"extra_{n}"
        dicom_source(f"extra_{n}", datasets, [folder / f"IM{k + 1:04d}" for k in range(len(datasets))])
        truth[f"extra_{n}"] = {"image": image, "label": label, "affine": affine}
        if n <= int(extra_labelled):  # named by the series folder's path, mirrored under labels/
            path = labels_dir / "more" / f"extra_{n}.nii.gz"
            save_nifti(label, affine, path)
            labels[f"extra_{n}"] = {"path": str(path), "format": "nifti", "values": dict(LABEL_NAMES)}

    return {
        "root": str(root),
        "labels_dir": str(labels_dir),
        "phi": sorted(set(PHI.values())),
        "phi_attributes": dict(PHI),
        "sources": sources,
        "labels": labels,
        "truth": truth,
    }


# ---------------------------------------------------------------------------------------------------- the demo
def make_demo(
    out_dir: str | os.PathLike,
    seed: int = 0,
    shape: tuple[int, int, int] = (36, 36, 24),
    extra: int = 8,
    extra_labelled: int = 5,
) -> str:
    """The archive (:func:`make_archive` with ``extra`` more series, ``extra_labelled`` of them labelled) and, in
    ``new_scans/``, a new study as a PACS export holds it (a CT series in its own folder, a dose report beside it)
    for inference. Returns the archive folder (what ``tools/prepare.py scans`` reads)."""
    info = make_archive(out_dir, seed, shape, extra, extra_labelled)
    image, _, affine = _case(seed, 999, tuple(int(n) for n in shape))
    study = {"uid": _uid(seed, "study", "new"), "id": "999"}
    series = ct_slices(image, affine, study, _uid(seed, "new"), _uid(seed, "frame", "new"), 2, "ABDOMEN 5mm", seed)
    folder = Path(out_dir) / "new_scans" / "study_999" / "ct"
    _save(series + [_dose_report(study, seed)], [folder / f"IM{k + 1:04d}" for k in range(len(series) + 1)])
    return info["root"]


def write_case(folder: Path, index: int, rng: np.random.Generator, shape: tuple[int, ...], spacing=None) -> dict:
    """One synthetic CT case as NIfTI files (the benchmarks' hook; data/demo/msd.py's CT layout)."""
    from .msd import write_case as msd_write_case

    return msd_write_case(folder, index, rng, shape, spacing, layout="ct")


def network_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A (1, *shape) CT case windowed to [0, 1], as the network sees it."""
    from .msd import network_input as msd_network_input

    return msd_network_input(rng, shape, layout="ct")
