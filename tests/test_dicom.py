"""data/dicom.py: a messy archive (data/demo/archive.py) is grouped into series whatever its folders, every series
or file left out has its reason, and a loaded volume has the painted HU and exactly the geometry MONAI's ITKReader
(GDCM) gives the same folder, in whatever order its slices are stored. Small synthetic files: a few seconds."""

import locale
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.fileset import FileSet
from pydicom.pixels.decoders import RLELosslessDecoder
from pydicom.uid import RLELossless, SegmentationStorage
from scipy.spatial.transform import Rotation

from selfmedmae_components.data import dicom
from selfmedmae_components.data.demo.archive import ct_slices, make_archive

STUDY = {"uid": "1.2.826.0.1.3680043.8.498.1", "id": "1"}
SERIES_UID, FRAME_UID = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
AXIAL = np.array([[-0.7, 0, 0, 100.5], [0, -0.8, 0, 80.25], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(make_archive's description, {key: Series} and {path: reason} of scan_files on every archive file)."""
    desc = make_archive(tmp_path_factory.mktemp("archive"))
    files = sorted(p for p in Path(desc["root"]).rglob("*") if p.is_file())
    series, skipped = dicom.scan_files(files)
    return desc, {s.key: s for s in series}, dict(skipped)


def small_image(seed: int = 0, shape=(8, 10, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def memory_series(image: np.ndarray, affine: np.ndarray = AXIAL) -> dicom.Series:
    """The image as an in-memory series (as DICOMweb gives it): header and dataset are the whole dataset."""
    datasets = ct_slices(image, affine, STUDY, SERIES_UID, FRAME_UID, 1, "test")
    return dicom.Series(SERIES_UID, [dicom.Instance("dicomweb", ds, ds) for ds in datasets])


def write_series(folder: Path, image: np.ndarray, affine: np.ndarray = AXIAL, compress=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(ct_slices(image, affine, STUDY, SERIES_UID, FRAME_UID, 1, "test")):
        if compress:
            ds.compress(compress)
        paths.append(folder / f"IM{k:04d}")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def load_files(paths) -> tuple[np.ndarray, np.ndarray]:
    series, skipped = dicom.scan_files(paths)
    assert len(series) == 1 and not skipped
    return dicom.load_volume(series[0])


# ------------------------------------------------------------------------------------------- the archive


def test_scan_groups_interleaved_and_nested_series_and_reports_unusable_files(archive):
    desc, series, skipped = archive
    expected = {s["series_key"]: s for s in desc["sources"].values() if s["kind"] == "dicom"}
    assert set(series) == set(expected)  # A1 and A2 apart in one folder, series_1 one series over two folders
    for key, source in expected.items():
        assert sorted(i.source for i in series[key].instances) == sorted(source["paths"])
    files = {name: desc["sources"][name]["paths"][0] for name in ("readme", "broken", "case_nifti", "case_nrrd")}
    assert set(skipped) == set(files.values())  # the NIfTI and NRRD volumes are not DICOM either
    assert skipped[files["readme"]].startswith("not a DICOM file (expected the 'DICM' marker at byte 128")
    assert skipped[files["broken"]].startswith("unreadable DICOM file (truncated: the pixel data needs")
    for name in ("readme", "broken"):
        assert desc["sources"][name]["reason_contains"] in skipped[files[name]]


def test_scan_in_worker_processes_gives_the_same_series(archive):
    desc, series, skipped = archive
    files = sorted(p for p in Path(desc["root"]).rglob("*") if p.is_file())
    parallel, parallel_skipped = dicom.scan_files(files, workers=2)
    assert [s.key for s in parallel] == sorted(series) and dict(parallel_skipped) == skipped
    values = lambda header: {e.tag: e.value for e in header} | {e.tag: e.value for e in header.file_meta}
    for s in parallel:  # the headers travel between processes as raw elements: the same values arrive
        assert [i.source for i in s.instances] == [i.source for i in series[s.key].instances]
        assert [values(i.header) for i in s.instances] == [values(i.header) for i in series[s.key].instances]
    a1 = next(s for s in parallel if s.key == desc["sources"]["A1"]["series_key"])
    np.testing.assert_array_equal(dicom.load_volume(a1)[0], desc["truth"]["A1"]["image"])


def test_volume_problem_says_why_each_archive_series_is_left_out(archive):
    desc, series, _ = archive
    problems = {
        name: dicom.volume_problem(series[s["series_key"]])
        for name, s in desc["sources"].items()
        if s["kind"] == "dicom"
    }
    assert {n for n, p in problems.items() if p is None} == {"A1", "A2", "series_1"}
    assert problems["localizer"].startswith("localizer (scout) images")
    assert problems["dose_report"] == "not a cross-sectional image: SOP class X-Ray Radiation Dose SR Storage"
    assert problems["screenshot"] == "not a cross-sectional image: SOP class Secondary Capture Image Storage"
    for name, problem in problems.items():
        assert desc["sources"][name]["use"] == (problem is None)
        assert problem is None or desc["sources"][name]["reason_contains"] in problem


def test_missing_slice_names_the_gap_between_its_neighbours(archive):
    desc, series, _ = archive
    problem = dicom.volume_problem(series[desc["sources"]["missing_slice"]["series_key"]])
    affine, depth = desc["truth"]["missing_slice"]["affine"], desc["truth"]["missing_slice"]["image"].shape[2]
    below, above = (affine[2, 3] + k * affine[2, 2] for k in (depth // 2 - 1, depth // 2 + 1))
    assert problem == (
        f"missing slice: a gap of {above - below:.2f} mm between positions {below:.2f} and {above:.2f} mm along "
        f"the slice normal, 2 times the usual {affine[2, 2]:.2f} mm step (1 slice(s) missing)"
    )
    with pytest.raises(dicom.DicomError, match="^missing slice: a gap of"):
        dicom.load_volume(series[desc["sources"]["missing_slice"]["series_key"]])


def test_load_volume_gives_the_painted_hu_and_affine(archive):
    desc, series, _ = archive
    for name in ("A1", "A2", "series_1"):  # A2 is stored top slice first
        data, affine = dicom.load_volume(series[desc["sources"][name]["series_key"]])
        assert data.dtype == np.int16
        np.testing.assert_array_equal(data, desc["truth"][name]["image"])
        np.testing.assert_allclose(affine, desc["truth"][name]["affine"], atol=1e-6)


def test_nothing_identifying_is_printed_logged_or_shown(archive, capsys, caplog, recwarn):
    desc, _, _ = archive
    caplog.set_level(logging.DEBUG)
    files = sorted(p for p in Path(desc["root"]).rglob("*") if p.is_file())
    series, skipped = dicom.scan_files(files)
    shown = [repr(s) + repr(s.instances) for s in series] + [reason for _, reason in skipped]
    for s in series:
        shown.append(str(dicom.volume_problem(s)))
        if dicom.volume_problem(s) is None:
            dicom.load_volume(s)
    captured = capsys.readouterr()
    text = "\n".join([captured.out, captured.err, caplog.text, *map(str, recwarn.list), *shown])
    uids = {s.uid for s in series} | {str(i.header.SOPInstanceUID) for s in series for i in s.instances}
    assert not [v for v in [*desc["phi"], *uids] if v in text]
    assert set(desc["phi"]) <= dicom.phi_values(series[0].instances[0].header)
    assert set(desc["phi_attributes"]) <= set(dicom.PHI_KEYWORDS)
    assert {"InstitutionAddress", "OtherPatientIDs", "PatientBirthDate"} <= set(dicom.PHI_KEYWORDS)


# ------------------------------------------------------------------------------------------- series checks


def tilt(datasets, degrees=15.0):
    """The gantry tilted about the patient's left-right axis: the image planes tilt, the table moves along z."""
    t = np.radians(degrees)
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0, np.cos(t), np.sin(t)]


def shift_from(datasets, k, mm):
    for ds in datasets[k:]:
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + mm]


def set_on(datasets, index, keyword, value):
    setattr(datasets[index], keyword, value)


CASES = {
    "segmentation": (
        lambda d: [set_on(d, i, "SOPClassUID", SegmentationStorage) for i in range(len(d))],
        "not a cross-sectional image: SOP class Segmentation Storage",
    ),
    "private class": (
        lambda d: set_on(d, 0, "SOPClassUID", "1.2.3.4.5.6"),
        "not a cross-sectional image: SOP class a private or unknown one",
    ),
    "scout": (lambda d: set_on(d, 0, "ImageType", ["ORIGINAL", "PRIMARY", "SCOUT"]), "localizer (scout) images"),
    "multi-frame": (
        lambda d: set_on(d, 2, "NumberOfFrames", 4),
        "multi-frame (enhanced) images (4 frames in a file): not supported yet; convert them with dcm2niix",
    ),
    "colour": (lambda d: set_on(d, 1, "SamplesPerPixel", 3), "colour images (SamplesPerPixel 3)"),
    "too few": (lambda d: d.__delitem__(slice(2, None)), "2 image(s): a volume needs at least 3"),
    "no position": (lambda d: d[3].__delattr__("ImagePositionPatient"), "images without ImagePositionPatient"),
    "sizes": (lambda d: set_on(d, 1, "Rows", 12), "images of different sizes in one series (8x10 and 8x12)"),
    "pixel spacings": (
        lambda d: set_on(d, 4, "PixelSpacing", [0.9, 0.7]),
        "images of different pixel spacings in one series (0.8x0.7 and 0.9x0.7 mm)",
    ),
    "orientations": (
        lambda d: set_on(d, 3, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]),
        "images of different orientations in one series (axial and coronal)",
    ),
    "duplicates": (
        lambda d: set_on(d, 3, "ImagePositionPatient", d[2].ImagePositionPatient),
        "several images at one position (5 positions for 6 images: multi-echo, dynamic or duplicate",
    ),
    "gantry tilt": (tilt, "gantry tilt: the slice positions run 15.0 degrees off the slice normal"),
    "uneven": (
        lambda d: shift_from(d, 3, 1.0),
        "uneven slice spacing: steps from 2.50 to 3.50 mm along the slice normal (usual 2.50 mm)",
    ),
    "two gaps": (
        lambda d: (shift_from(d, 2, 2.5), shift_from(d, 4, 5.0)),
        "missing slice: a gap of 5.00 mm between positions -27.50 and -22.50 mm along the slice normal, "
        "2 times the usual 2.50 mm step (3 slice(s) missing; 2 gaps in all)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_volume_problem_of_hand_made_series(case):
    series = memory_series(small_image())
    datasets = [i.header for i in series.instances]
    mutate, expected = CASES[case]
    mutate(datasets)
    series.instances = [dicom.Instance("dicomweb", ds, ds) for ds in datasets]
    assert dicom.volume_problem(series).startswith(expected)
    with pytest.raises(dicom.DicomError, match="^" + re.escape(expected)):
        dicom.load_volume(series)


def test_positions_rounded_as_scanners_write_them_are_one_even_stack():
    image = small_image(shape=(8, 10, 12))
    affine = AXIAL.copy()
    affine[2, 2] = 0.625
    series = memory_series(image, affine)
    for ds in (i.header for i in series.instances):  # 0.62 and 0.63 mm steps
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], f"{float(ds.ImagePositionPatient[2]):.2f}"]
    assert dicom.volume_problem(series) is None
    data, got = dicom.load_volume(series)
    np.testing.assert_array_equal(data, image)
    assert got[2, 2] == pytest.approx(0.625, abs=0.001)


# ------------------------------------------------------------------------------------------- loading


def oblique() -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = Rotation.from_euler("xyz", [20, -10, 30], degrees=True).as_matrix() @ np.diag([0.7, 0.8, 2.5])
    lps[:3, 3] = [10.0, -20.0, 30.0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


GEOMETRIES = {"ascending": AXIAL, "descending": AXIAL @ np.diag([1.0, 1.0, -1.0, 1.0]), "oblique": oblique()}


@pytest.mark.parametrize("order", GEOMETRIES)
def test_geometry_equals_monai_itkreader(order, tmp_path):
    """The contract the bundles' inference relies on: (data, affine) as MONAI's ITKReader reads the folder."""
    from monai.transforms import LoadImage

    image = small_image()
    paths = write_series(tmp_path / order, image, GEOMETRIES[order])  # IM0000 is slice k = 0 of the painting
    data, affine = load_files(paths)
    reference, meta = LoadImage(reader="ITKReader", image_only=False)(str(tmp_path / order))
    np.testing.assert_array_equal(data, np.asarray(reference))
    np.testing.assert_allclose(affine, np.asarray(meta["affine"]), atol=1e-4)
    # slices ascend along the normal: the painting's z runs the other way when stored top first
    np.testing.assert_array_equal(data, image[:, :, ::-1] if order == "descending" else image)
    assert np.cross(affine[:3, 0], affine[:3, 1]) @ affine[:3, 2] > 0


def test_dtype_follows_the_modality_values():
    image = small_image()
    series = memory_series(image)
    for i in series.instances:
        i.header.RescaleSlope = 0.5  # stored values HU + 1024: halves
    data, _ = dicom.load_volume(series)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, (image.astype(np.float64) + 1024) * 0.5 - 1024)
    bright = (small_image(1) + 31000).astype(np.int16)  # stored HU + 1024, up to 33523: beyond int16
    series = memory_series(bright)
    for i in series.instances:
        del i.header.RescaleSlope, i.header.RescaleIntercept
    data, _ = dicom.load_volume(series)
    assert data.dtype == np.float32 and data.max() > 32767
    np.testing.assert_array_equal(data, bright.astype(np.float64) + 1024)


def test_in_memory_datasets_without_file_meta_load():
    image = small_image()
    series = memory_series(image)
    for i in series.instances:  # as a DICOMweb client may hand them over
        del i.dataset.file_meta
    np.testing.assert_array_equal(dicom.load_volume(series)[0], image)
    assert not hasattr(series.instances[0].dataset, "file_meta")  # the caller's datasets are left as they were


def test_rle_compressed_files_load_the_same_and_through_itk_without_a_pydicom_decoder(tmp_path, monkeypatch):
    image = small_image()
    expected = load_files(write_series(tmp_path / "plain", image))
    paths = write_series(tmp_path / "rle", image, compress=RLELossless)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == RLELossless
    for got, want in zip(load_files(paths), expected):
        np.testing.assert_array_equal(got, want)
    # no RLE decoder: pydicom raises what it raises for a missing plugin, ITK (GDCM) decodes instead
    monkeypatch.setattr(RLELosslessDecoder, "_available", {})
    monkeypatch.setattr(RLELosslessDecoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")})
    with pytest.raises(RuntimeError, match="missing dependencies"):
        pydicom.pixels.pixel_array(str(paths[0]))
    calls = []
    itk_slice = dicom._itk_slice
    monkeypatch.setattr(dicom, "_itk_slice", lambda instance: calls.append(1) or itk_slice(instance))
    for got, want in zip(load_files(paths), expected):
        np.testing.assert_array_equal(got, want)
    series = memory_series(image)  # in memory (DICOMweb): ITK reads a temporary copy
    for i in series.instances:
        i.dataset.compress(RLELossless)
    np.testing.assert_array_equal(dicom.load_volume(series)[0], expected[0])
    assert len(calls) == 2 * image.shape[2]


def test_jpeg_lossless_written_by_gdcm_loads_the_same(tmp_path):
    """JPEG Lossless (process 14), which pydicom decodes only with plugins: GDCM reads it if pydicom cannot."""
    import itk

    image = small_image()
    plain = write_series(tmp_path / "plain", image)
    (tmp_path / "jpeg").mkdir()
    saved = locale.setlocale(locale.LC_ALL)
    try:
        for path in plain:
            io = itk.GDCMImageIO.New()
            io.SetCompressionType(itk.GDCMImageIOEnums.Compression_JPEG)
            io.KeepOriginalUIDOn()
            itk.imwrite(
                itk.imread(str(path), itk.SS, imageio=io),
                str(tmp_path / "jpeg" / path.name),
                imageio=io,
                compression=True,
            )
    finally:  # GDCM's writer leaves the process in the C locale: every later text decode would be ASCII
        locale.setlocale(locale.LC_ALL, saved)
    jpeg = sorted((tmp_path / "jpeg").iterdir())
    assert pydicom.dcmread(jpeg[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    for got, want in zip(load_files(jpeg), load_files(plain)):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------- bad input


def test_files_that_are_not_dicom_say_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("Patient list, do not share\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "garbage.dcm").write_bytes(bytes(128) + b"DICM" + np.random.default_rng(0).bytes(300))
    with pytest.raises(dicom.NotDicomError, match=r"^not a DICOM file \(expected the 'DICM' marker at byte 128"):
        dicom.read_instance(tmp_path / "notes.txt")
    with pytest.raises(dicom.NotDicomError, match=r"^not a DICOM file \(an empty file\)"):
        dicom.read_instance(tmp_path / "empty.dcm")
    with pytest.raises(dicom.DicomError, match=r"^unreadable DICOM file \(truncated or corrupt: element"):
        dicom.read_instance(tmp_path / "garbage.dcm")  # DICM, then noise
    with pytest.raises(dicom.DicomError, match=r"^unreadable file \(Is a directory\)"):
        dicom.read_instance(tmp_path)


def test_truncated_files_are_unreadable_wherever_they_are_cut(tmp_path):
    path = write_series(tmp_path / "s", small_image())[0]
    whole = path.read_bytes()
    pixels = 8 * 10 * 2
    expected = {
        len(whole) - pixels // 2: "truncated: the pixel data needs 160 bytes, 80 remain",
        whole.index(b"CT ABDOMEN") + 3: r"truncated or corrupt: element \(0008,1030\) runs past the end",
        200: "no data set after the file meta",
    }
    for cut, why in expected.items():
        (tmp_path / "cut.dcm").write_bytes(whole[:cut])
        with pytest.raises(dicom.DicomError, match=r"^unreadable DICOM file \(" + why):
            dicom.read_instance(tmp_path / "cut.dcm")
    dataset = pydicom.dcmread(path, stop_before_pixels=True)  # cut at an element boundary before the pixels
    dataset.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    with pytest.raises(dicom.DicomError, match="file ends before the pixel data of its image"):
        dicom.read_instance(tmp_path / "cut.dcm")


def test_dicomdir_raw_files_and_files_without_a_series(tmp_path):
    path = write_series(tmp_path / "s", small_image())[0]
    media = FileSet()  # a CD's index, as pydicom writes it
    media.add(path)
    media.write(tmp_path / "cd")
    with pytest.raises(dicom.DicomError, match=r"^DICOMDIR: an index of the media, not an image$"):
        dicom.read_instance(tmp_path / "cd" / "DICOMDIR")
    ds = pydicom.dcmread(path)  # without the preamble and file meta, as older media hold them
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
    ds.save_as(tmp_path / "raw", implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw").read_bytes()[:2] == b"\x08\x00"
    assert dicom.read_instance(tmp_path / "raw").header.SeriesInstanceUID == SERIES_UID
    ds = pydicom.dcmread(path)
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "orphan.dcm", enforce_file_format=True)
    series, skipped = dicom.scan_files([tmp_path / "raw", tmp_path / "orphan.dcm"])
    assert [len(s.instances) for s in series] == [1]
    assert skipped == [
        (str(tmp_path / "orphan.dcm"), "DICOM file without a SeriesInstanceUID (cannot be grouped into a series)")
    ]


def test_headers_keep_public_attributes_only(tmp_path):
    path = write_series(tmp_path / "s", small_image())[0]
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0029, "VENDOR CSA", create=True)
    block.add_new(0x10, "OB", bytes(4000))
    ds.ReferencedImageSequence = [pydicom.Dataset()]
    ds.save_as(path, enforce_file_format=True)
    header = dicom.read_instance(path).header
    assert not any(e.tag.is_private for e in header) and "ReferencedImageSequence" not in header
    assert "PixelData" not in header and header.Rows == 10


def test_pixel_data_that_cannot_be_decoded_names_the_image(tmp_path, monkeypatch):
    series = memory_series(small_image())
    series.instances[2].dataset.PixelData = bytes(10)  # 10 bytes for 8 x 10 pixels
    series.instances[2].source = "dicomweb:slice-3"
    with pytest.raises(dicom.DicomError, match=r"^dicomweb:slice-3: unreadable pixel data \("):
        dicom.load_volume(series)
    paths = write_series(tmp_path, small_image(), compress=RLELossless)
    whole = paths[2].read_bytes()
    paths[2].write_bytes(whole[: -8 * 10 - 8] + bytes(8 * 10) + whole[-8:])  # the RLE segments zeroed
    monkeypatch.setattr(RLELosslessDecoder, "_available", {})
    with pytest.raises(dicom.DicomError, match=f"^{re.escape(str(paths[2]))}: pixel data that neither pydicom nor ITK"):
        load_files(paths)
