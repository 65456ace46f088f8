"""tools/prepare.py scans (data/scans.py) on a generated hospital archive (data/demo/archive.py): two DICOM series
interleaved in one folder, one spread over nested folders, a localizer, a dose report, a screenshot, a series with a
missing slice, a truncated file, a README, a NIfTI and an NRRD volume, labels for three of them (NIfTI, NRRD,
Slicer .seg.nrrd), and patient-identifying values in every DICOM file. Then msd_seg's four stages run on the result
with no edit, inference on a DICOM series folder; and the same preparation from a real PACS (Orthanc, DICOMweb).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_runner import config_path, read_losses
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from selfmedmae_components.data import common, dicom, scans
from selfmedmae_components.data.demo import archive as demo

TINY = {"hidden_size": 48}


def snapshot(root: str | Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


def prepare(src, out, **kwargs) -> tuple[dict, str]:
    """scans.prepare_datalist with what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        datalist = scans.prepare_datalist(str(src), out=str(out), workers=1, **kwargs)
    return datalist, printed.getvalue()


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    return demo.make_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def prepared(archive, tmp_path_factory) -> dict:
    before = snapshot(Path(archive["root"]).parent)
    out = tmp_path_factory.mktemp("prepared")
    datalist, printed = prepare(archive["root"], out, labels=archive["labels_dir"])
    return {"out": out, "datalist": datalist, "printed": printed, "before": before}


def row_of(rows: list[dict], archive: dict, name: str) -> dict:
    """The manifest row of one of the archive's sources (a series by its key, a file by its path)."""
    source = archive["sources"][name]
    if "series_key" in source:
        (row,) = [r for r in rows if r["key"] == source["series_key"]]
    else:
        (row,) = [r for r in rows if r["source"] == os.path.relpath(source["paths"][0], archive["root"])]
    return row


def test_the_manifest_says_what_was_used_and_why_the_rest_was_not(archive, prepared):
    rows = read_manifest(prepared["out"])
    for name, source in archive["sources"].items():
        row = row_of(rows, archive, name)
        assert row["status"] == ("used" if source["use"] else "skipped"), (name, row)
        if not source["use"]:
            assert source["reason_contains"] in row["reason"], (name, row["reason"])
        else:
            assert row["shape"] and row["spacing_mm"] and row["orientation"] and row["modality"] == "CT", row
    # every file of the archive is accounted for: in a series row or a row of its own
    files = [p for p in Path(archive["root"]).rglob("*") if p.is_file()]
    assert sum(int(r["files"]) for r in rows if r["kind"] != "label") == len(files)
    # the two interleaved series are two rows, the nested one is one
    assert row_of(rows, archive, "A1")["key"] != row_of(rows, archive, "A2")["key"]
    assert row_of(rows, archive, "series_1")["source"] == "study_b/series_1/"
    assert int(row_of(rows, archive, "series_1")["files"]) == len(archive["sources"]["series_1"]["paths"])


def test_images_and_labels_are_the_painted_ones(archive, prepared):
    out, rows = prepared["out"], read_manifest(prepared["out"])
    for name, truth in archive["truth"].items():
        row = row_of(rows, archive, name)
        if row["status"] != "used":
            continue
        img = nib.load(out / "images" / f"{row['key']}.nii.gz")
        to_ours = ornt_transform(io_orientation(truth["affine"]), io_orientation(img.affine))
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), apply_orientation(truth["image"], to_ours))
        assert np.allclose(img.affine, truth["affine"], atol=1e-3), name
        if name in archive["labels"]:
            assert row["label"] == archive["labels"][name]["path"] and row["role"] != "unlabelled"
            label = np.asanyarray(nib.load(out / "labels" / f"{row['key']}.nii.gz").dataobj)
            np.testing.assert_array_equal(label, apply_orientation(truth["label"], to_ours))
        else:
            assert row["role"] == "unlabelled" and not (out / "labels" / f"{row['key']}.nii.gz").exists()


def test_the_datalist_is_msd_segs(prepared):
    datalist, out = prepared["datalist"], prepared["out"]
    assert json.loads((out / "datalist.json").read_text()) == datalist
    assert [len(datalist[k]) for k in ("training", "validation", "evaluation", "unlabelled")] == [1, 1, 1, 2]
    props = datalist["properties"]
    assert props["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "lesion"}  # from the .seg.nrrd
    assert props["normalization"] == "window" and props["hu_min"] < 0 < props["hu_max"]
    assert props["cache"] == "disk" and props["pretrain_steps"] >= 30000
    assert props["pretrain_lists"] == ["training", "validation", "unlabelled"]
    assert all(v % 16 == 0 for v in props["roi_size"]) and len(props["pixdim"]) == 3
    items = common.load_datalist(out / "datalist.json", props["pretrain_lists"], out)
    assert len(items) == 4 and all(Path(i["image"]).is_file() for i in items)  # MAE: all but the evaluation case


def test_no_patient_value_or_uid_reaches_any_output(archive, prepared):
    uids = set()
    for source in archive["sources"].values():
        for path in source["paths"]:
            with contextlib.suppress(dicom.DicomError):
                header = dicom.read_instance(path).header
                uids |= {str(header.get(k)) for k in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID")}
    assert_clean(prepared["out"], archive["phi"], uids, prepared["printed"])


def assert_clean(folder: Path, phi: list[str], uids: set[str], printed: str = "") -> None:
    """No identifying value in any file under ``folder`` (gzip files decompressed) nor in ``printed``."""
    needles = {v for p in phi for v in (p, p.replace("^", " "), p.replace("^", ", "))} | uids
    assert len(needles) > 10
    for path in [p for p in Path(folder).rglob("*") if p.is_file()]:
        data = path.read_bytes()
        data = gzip.decompress(data) if path.name.endswith(".gz") else data
        found = [n for n in needles if n.encode() in data]
        assert not found, (path, found)
    assert not [n for n in needles if n in printed]


def test_the_source_is_never_written_and_cannot_be_the_output(archive, prepared, tmp_path):
    assert snapshot(Path(archive["root"]).parent) == prepared["before"]
    with pytest.raises(common.DatasetError, match="lies inside the source"):
        scans.prepare_datalist(archive["root"], out=Path(archive["root"]) / "prepared")
    with pytest.raises(common.DatasetError, match=r"source folder .*nowhere does not exist"):
        scans.prepare_datalist(tmp_path / "nowhere", out=tmp_path / "out")
    with pytest.raises(common.DatasetError, match="--out is required"):
        scans.prepare_datalist(archive["root"])


def test_a_second_call_converts_only_what_changed(archive, tmp_path, monkeypatch):
    src = tmp_path / "archive"
    shutil.copytree(archive["root"], src)
    first, _ = prepare(src, tmp_path / "out", labels=archive["labels_dir"])
    converted = []
    original = scans.convert
    monkeypatch.setattr(scans, "convert", lambda s, *a: converted.append(s.where) or original(s, *a))
    again, printed = prepare(src, tmp_path / "out", labels=archive["labels_dir"])
    assert again == first and converted == []
    nifti = src / "volumes" / "case_nifti.nii.gz"
    os.utime(nifti, ns=(nifti.stat().st_atime_ns, nifti.stat().st_mtime_ns + 10**9))  # re-exported
    prepare(src, tmp_path / "out", labels=archive["labels_dir"])
    assert converted == ["volumes/case_nifti.nii.gz"]


def test_label_files_that_fit_no_image_are_named(archive, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(archive["labels_dir"], labels)
    shutil.copy(labels / "case_nifti.nii.gz", labels / "case_nifti_label.nii.gz")  # a second label for one image
    shutil.copy(labels / "case_nifti.nii.gz", labels / "somebody_else.nii.gz")
    (labels / "notes.txt").write_text("which label is which")
    img = nib.load(labels / "case_nifti.nii.gz")
    nib.save(nib.Nifti1Image(-np.asanyarray(img.dataobj).astype(np.int16), img.affine), labels / "study_c.nii.gz")
    datalist, printed = prepare(archive["root"], tmp_path / "out", labels=labels)
    reasons = {Path(r["source"]).name: r["reason"] for r in read_manifest(tmp_path / "out") if r["kind"] == "label"}
    assert "a second label for image" in reasons["case_nifti_label.nii.gz"]  # case_nifti.nii.gz came first
    assert "matches no image" in reasons["somebody_else.nii.gz"]
    assert "not a label volume" in reasons["notes.txt"]
    assert "matches no image" in reasons["study_c.nii.gz"]  # the series of study_c was not used (missing slice)
    assert "label file(s) not used" in printed


def test_volume_files_need_a_modality_when_no_dicom_says_it(archive, tmp_path):
    with pytest.raises(common.DatasetError, match="--modality CT or --modality MR"):
        scans.prepare_datalist(Path(archive["root"]) / "volumes", out=tmp_path / "out", workers=1)
    datalist, _ = prepare(Path(archive["root"]) / "volumes", tmp_path / "out2", modality="CT")
    assert len(datalist["unlabelled"]) == 2 and datalist["properties"]["modality"] == {"0": "CT"}


# ------------------------------------------------------------------------------------------ msd_seg on it
def run_here(stage: str, **overrides) -> None:
    """``monai.bundle.run`` of msd_seg's ``stage`` with the demo preset, in this process."""
    from monai.bundle import run

    files = [str(config_path("msd_seg", n)) for n in (stage, "demo")]
    run(stage, config_file=files, **{k: str(v) if isinstance(v, Path) else v for k, v in overrides.items()})


@pytest.fixture(scope="module")
def bundle_run(archive, prepared, one_thread, tmp_path_factory) -> dict:
    """pretrain -> finetune -> evaluate -> inference of msd_seg on the prepared archive, no edit: the dataset's own
    settings (disk cache included), a narrower ViT; inference on a DICOM series exported beside a dose report."""
    root = tmp_path_factory.mktemp("bundle")
    new_scans = root / "new_scans"
    shutil.copytree(Path(archive["root"]) / "study_b", new_scans / "study_b")  # series_1 over subfolders + a screenshot
    common_args = dict(dataset_dir=prepared["out"], bundle_root=root / "run", **TINY)
    run_here("pretrain", max_epochs=8, mask_ratio=0.5, **common_args)
    run_here("finetune", max_epochs=8, val_interval=4, **common_args)
    run_here("evaluate", **common_args)
    run_here("inference", input_dir=new_scans, **common_args)
    return {"root": root / "run", "new_scans": new_scans}


def test_msd_seg_pretrains_with_the_disk_cache_and_learns(bundle_run):
    root = bundle_run["root"]
    losses = read_losses(root / "logs" / "pretrain" / "loss.csv")
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    assert (
        read_losses(root / "logs" / "finetune" / "loss.csv")[-1]
        < read_losses(root / "logs" / "finetune" / "loss.csv")[0]
    )
    entries = [p for p in (root / "cache").glob("*/*") if not p.name.startswith(".")]
    assert entries  # the datalist's cache: disk reached the stages


def test_evaluation_names_the_segments(bundle_run):
    with open(bundle_run["root"] / "eval" / "per_case.csv") as f:
        header = next(csv.reader(f))
    assert any("liver" in h for h in header) and any("lesion" in h for h in header), header


def test_inference_on_a_dicom_series_writes_the_series_geometry(archive, bundle_run):
    (prediction,) = (bundle_run["root"] / "predictions").glob("*_seg.nii.gz")
    assert prediction.name == "series_1_seg.nii.gz"
    paths = archive["sources"]["series_1"]["paths"]
    series, _ = dicom.scan_files(paths)
    data, affine = dicom.load_volume(series[0])
    pred = nib.load(prediction)
    assert pred.shape == data.shape and np.allclose(pred.affine, affine, atol=1e-3)


def test_no_patient_value_reaches_the_run(archive, bundle_run):
    assert_clean(bundle_run["root"], archive["phi"], set())


# ------------------------------------------------------------------------------------------ from a PACS
def test_the_same_archive_from_a_pacs(archive, prepared, tmp_path, monkeypatch):
    """The archive's DICOM files uploaded to a real Orthanc, prepared over DICOMweb: the same series used and
    skipped for the same reasons, the same volumes; a second call retrieves nothing."""
    from orthanc import OrthancServer, orthanc_available

    if orthanc_available():
        pytest.skip(orthanc_available())
    from selfmedmae_components.data import dicomweb

    local = {r["key"]: r for r in read_manifest(prepared["out"]) if r["kind"] == "dicom"}
    uploads = [p for s in archive["sources"].values() if s["kind"] == "dicom" for p in s["paths"]]
    with OrthancServer(tmp_path / "orthanc") as server:
        server.upload(uploads)
        out = tmp_path / "out"
        datalist, printed = prepare(server.url_with_credentials(), out)
        remote = {r["key"]: r for r in read_manifest(out)}
        assert set(remote) == set(local)
        for key, row in local.items():
            assert remote[key]["status"] == row["status"], (row, remote[key])
            if row["status"] == "used":
                a, b = (
                    nib.load(out / "images" / f"{key}.nii.gz"),
                    nib.load(prepared["out"] / "images" / f"{key}.nii.gz"),
                )
                np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
                assert np.allclose(a.affine, b.affine)
            else:
                assert remote[key]["reason"].split(":")[0] == row["reason"].split(":")[0]
        assert server.credentials[1] not in printed + (out / "manifest.csv").read_text() + json.dumps(datalist)
        monkeypatch.setattr(dicomweb, "retrieve_series", lambda *a, **k: pytest.fail("retrieved again"))
        again, _ = prepare(server.url_with_credentials(), out)
        assert again == datalist
    assert_clean(out, archive["phi"], set())
