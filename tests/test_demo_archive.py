"""data/demo/archive.py: the synthetic hospital archive is laid out as documented, reproducible from its seed, has
the identifying values in every DICOM file (and in no file name), and its NIfTI, NRRD and Slicer segmentation files
hold the painted volumes and labels in the stated geometry. One small archive: about a second."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from selfmedmae_components.data.demo.archive import LABEL_NAMES, PHI, make_archive, series_key

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_archive")
    return out, make_archive(out)


def read_itk(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(array [i, j, k], RAS affine) as ITK reads the file."""
    import itk

    image = itk.imread(path)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()) @ np.diag(np.asarray(image.GetSpacing()))
    lps[:3, 3] = np.asarray(image.GetOrigin())
    return itk.array_from_image(image).transpose(2, 1, 0), LPS @ lps


def test_layout_as_documented(archive):
    out, desc = archive
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    study_a = [f for f in files if f.startswith("archive/study_a/")]
    assert all(re.fullmatch(r"archive/study_a/IM\d{4}", f) for f in study_a)
    assert len(study_a) == sum(len(desc["sources"][n]["paths"]) for n in ("A1", "A2", "localizer", "dose_report"))
    series = [pydicom.dcmread(out / f, stop_before_pixels=True).SeriesInstanceUID for f in study_a]
    assert sum(a != b for a, b in zip(series, series[1:])) > len(series) // 2  # A1 and A2 interleaved
    nested = desc["sources"]["series_1"]["paths"]
    assert {str(Path(p).parent.relative_to(out / "archive")) for p in nested} == {
        "study_b/series_1/part1",
        "study_b/series_1/part2/more",
    }
    assert {
        "archive/README.txt",
        "archive/study_b/screenshot.dcm",
        "archive/study_c/broken.dcm",
        "archive/volumes/case_nifti.nii.gz",
        "archive/volumes/case_nrrd.nrrd",
        "labels/series_1.seg.nrrd",
        "labels/case_nifti.nii.gz",
        "labels/case_nrrd.nrrd",
    } <= set(files)
    listed = {str(Path(p).relative_to(out)) for s in desc["sources"].values() for p in s["paths"]}
    assert listed | {str(Path(lab["path"]).relative_to(out)) for lab in desc["labels"].values()} == set(files)
    missing = desc["sources"]["missing_slice"]
    assert len(missing["paths"]) == desc["truth"]["missing_slice"]["image"].shape[2] - 1
    whole = Path(missing["paths"][0]).read_bytes()
    broken = (out / "archive/study_c/broken.dcm").read_bytes()
    assert whole.startswith(broken) and len(whole) - len(broken) < 36 * 36 * 2  # cut inside the pixel data


def test_every_dicom_file_identifies_the_patient_and_no_name_does(archive):
    out, desc = archive
    assert sorted(desc["phi"]) == sorted(set(PHI.values())) and desc["phi_attributes"] == PHI
    paths = [p for s in desc["sources"].values() if s["kind"] == "dicom" for p in s["paths"]]
    for path in paths:
        ds = pydicom.dcmread(path)
        assert {k: str(ds.get(k)) for k in PHI} == PHI, path
    for name, source in desc["sources"].items():
        if source["kind"] == "dicom":
            uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in source["paths"]}
            assert [series_key(u) for u in uids] == [source["series_key"]], name
    names = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert not [v for v in PHI.values() for n in names if v.lower() in n.lower()]


def test_the_same_seed_writes_the_same_archive(archive, tmp_path):
    out, desc = archive
    again = make_archive(tmp_path, seed=0)
    for name, source in desc["sources"].items():
        assert again["sources"][name].get("series_key") == source.get("series_key")
        if source["kind"] in ("dicom", "nrrd"):
            rel = [Path(p).relative_to(out) for p in source["paths"]]
            assert [(tmp_path / r).read_bytes() for r in rel] == [Path(p).read_bytes() for p in source["paths"]]
    other = make_archive(tmp_path / "other", seed=1)
    assert other["sources"]["A1"]["series_key"] != desc["sources"]["A1"]["series_key"]


def test_the_non_volume_objects_are_what_they_claim(archive):
    _, desc = archive
    localizer = [pydicom.dcmread(p) for p in desc["sources"]["localizer"]["paths"]]
    assert [list(ds.ImageType) for ds in localizer] == [["ORIGINAL", "PRIMARY", "LOCALIZER"]] * 2
    report = pydicom.dcmread(desc["sources"]["dose_report"]["paths"][0])
    assert report.SOPClassUID == pydicom.uid.XRayRadiationDoseSRStorage and report.Modality == "SR"
    assert report.ValueType == "CONTAINER" and report.ConceptNameCodeSequence[0].CodeValue == "113701"
    assert "PixelData" not in report
    screenshot = pydicom.dcmread(desc["sources"]["screenshot"]["paths"][0])
    assert screenshot.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert screenshot.pixel_array.shape == (24, 32, 3)
    ct = pydicom.dcmread(desc["sources"]["A1"]["paths"][0])
    assert (ct.RescaleSlope, ct.RescaleIntercept, ct.PixelRepresentation) == (1, -1024, 0)
    assert list(ct.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and ct.file_meta.TransferSyntaxUID.is_little_endian


def test_nifti_and_nrrd_volumes_hold_the_painted_cases(archive):
    _, desc = archive
    for name in ("case_nifti", "case_nrrd"):
        truth = desc["truth"][name]
        assert truth["image"].dtype == np.int16 and np.diag(truth["affine"])[:2].max() < 0  # LPS voxel order
        for path, expected in (
            (desc["sources"][name]["paths"][0], truth["image"]),
            (desc["labels"][name]["path"], truth["label"]),
        ):
            if name == "case_nifti":
                image = nib.load(path)
                data, affine = np.asanyarray(image.dataobj), image.affine
            else:
                data, affine = read_itk(path)
            np.testing.assert_array_equal(data, expected)
            np.testing.assert_allclose(affine, truth["affine"], atol=1e-5)


def test_slicer_segmentation_is_the_label_cropped_to_its_extent(archive):
    _, desc = archive
    label, affine = desc["truth"]["series_1"]["label"], desc["truth"]["series_1"]["affine"]
    seg = desc["labels"]["series_1"]
    header = Path(seg["path"]).read_bytes().split(b"\n\n")[0].decode()
    assert "space: left-posterior-superior" in header and "space origin: (" in header
    fields = dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)
    for n, (value, name) in enumerate(LABEL_NAMES.items()):
        assert fields[f"Segment{n}_Name"] == name and fields[f"Segment{n}_LabelValue"] == str(value)
        assert fields[f"Segment{n}_ID"] and fields[f"Segment{n}_Layer"] == "0"
    crop, crop_affine = read_itk(seg["path"])
    assert crop.shape != label.shape and np.all(np.array(crop.shape) <= label.shape)
    lo = np.array(seg["offset"])
    np.testing.assert_allclose(crop_affine[:3, :3], affine[:3, :3], atol=1e-6)
    np.testing.assert_allclose(crop_affine[:3, 3], affine[:3, :3] @ lo + affine[:3, 3], atol=1e-4)
    placed = np.zeros_like(label)
    placed[lo[0] : lo[0] + crop.shape[0], lo[1] : lo[1] + crop.shape[1], lo[2] : lo[2] + crop.shape[2]] = crop
    np.testing.assert_array_equal(placed, label)
    for n, value in enumerate(LABEL_NAMES):  # each segment's extent: where its value lies in the crop
        where = np.argwhere(crop == value)
        assert [int(v) for v in fields[f"Segment{n}_Extent"].split()] == [
            int(v) for pair in zip(where.min(axis=0), where.max(axis=0)) for v in pair
        ]
