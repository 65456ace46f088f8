"""MONAI Label against a real PACS: Orthanc over DICOMweb (docs/MONAI_LABEL.md, "With a PACS (DICOMweb)").

A private Orthanc (tests/orthanc.py) holds generated DICOM in the demo data's geometry: three CT series made from
BTCV demo cases, three from msd_seg's CT demo task, and a CR chest film made from a cxr14 demo image. Three MONAI
Label servers read it, as the doc says to run them, each listing its own series by its search filter: btcv_seg and
brats_seg; msd_seg; cxr14_classification. The tests then:

- segment a CT series from the PACS and compare the answer with the bundle's own inference on the same series
  read from its DICOM files here (geometry and label values);
- save labels through MONAI Label, find them in Orthanc as DICOM SEG, and read them back with pydicom: our label
  names, the referenced series, and each frame on its slice;
- train btcv_seg and msd_seg from those SEG labels (``POST /train`` from the shipped MAE encoder), then check what
  they trained on and that the next ``/infer`` answers with the new weights;
- classify the film with the scores the bundle's own inference gives for the same DICOM file;
- send a one-channel series to brats_seg, which must answer with an error that says why, and no label map.

Needs Orthanc with its DICOMweb plugin (``apt-get install orthanc orthanc-dicomweb``) and MONAI Label with dcmqi in
``.venv-monailabel`` (docs/MONAI_LABEL.md); skipped with the reason otherwise. Run it with:

    python -m pytest -m pacs tests/test_pacs.py
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.error
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monailabel_helpers import (
    FORM,
    SERVED,
    VENV,
    answer_or_fail,
    download_app,
    export,
    http,
    monailabel_missing,
    monailabel_server,
    multipart,
    own_scores,
    own_segmentation,
    tiny_run,
)
from orthanc import OrthancServer, orthanc_available
from pydicom.uid import generate_uid
from test_bundle_conformance import CASES

from selfmedmae_components.data.demo.archive import ct_slices

pytestmark = pytest.mark.pacs

BUNDLES = ("btcv_seg", "brats_seg", "cxr14_cls")
BODY_PART = {"btcv": "ABDOMEN", "msd": "LIVER"}  # of each task's series: the servers' filters tell them apart


def _write_series(image_file: Path, folder: Path, name: str, body_part: str) -> str:
    """A CT series of the NIfTI ``image_file`` (int16 HU, its own geometry) in ``folder``, described as ``name``, of
    the body part ``body_part``; its SeriesInstanceUID."""
    image = nib.load(image_file)
    hu = np.clip(np.rint(np.asarray(image.dataobj)), -1024, 3071).astype(np.int16)
    study = {"uid": generate_uid(), "id": name}
    series_uid = generate_uid()
    folder.mkdir(parents=True)
    for k, ds in enumerate(ct_slices(hu, image.affine, study, series_uid, generate_uid(), 1, name)):
        ds.BodyPartExamined = body_part
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return series_uid


def _write_film(png: Path, folder: Path) -> str:
    from cxr_helpers import write_dicom
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 257  # 8 -> 16 bit
    series_uid = generate_uid()
    folder.mkdir(parents=True)
    write_dicom(
        folder / "film.dcm",
        pixels,
        "MONOCHROME2",
        bits_stored=16,
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=series_uid,
        PatientID="demo-film",
        Modality="CR",
        SeriesNumber=1,
        InstanceNumber=1,
    )
    return series_uid


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    for reason in (orthanc_available(), monailabel_missing()):
        if reason:
            pytest.skip(reason)
    if not (VENV / "bin" / "itkimage2segimage").is_file():
        pytest.skip(f"dcmqi is not installed in {VENV} (pip install dcmqi; docs/MONAI_LABEL.md)")
    root = tmp_path_factory.mktemp("pacs")
    app = download_app(root)
    data, runs = {}, {}
    for b in BUNDLES:
        data[b] = CASES[b].make_data(root / f"{b}_data")
        runs[b] = root / "runs" / b
        tiny_run(b, data[b][0], runs[b])
        export(runs[b], app / "model", SERVED[b])
    data["msd_seg"] = _msd_run(root, app)

    cases = {}
    for task, bundle in (("btcv", "btcv_seg"), ("msd", "msd_seg")):
        dataset_dir, inputs = data[bundle]
        training = json.loads((dataset_dir / "datalist.json").read_text())["training"]
        cases[f"{task}_unseen"] = (sorted(inputs.glob("*.nii*"))[0], None)
        for i, c in enumerate(training[:2]):
            cases[f"{task}_labelled_{i}"] = (dataset_dir / c["image"], dataset_dir / c["label"])
    series = {
        name: _write_series(image, root / "dicom" / name, name, BODY_PART[name.split("_")[0]])
        for name, (image, _) in cases.items()
    }
    film = sorted(data["cxr14_cls"][1].glob("*.png"))[0]
    series["film"] = _write_film(film, root / "dicom" / "film")

    with contextlib.ExitStack() as stack:
        orthanc = stack.enter_context(OrthancServer(root / "orthanc"))
        orthanc.upload(sorted((root / "dicom").rglob("*.dcm")))
        user, password = orthanc.credentials
        servers = {}
        # a server trains each model on every labelled series it lists: btcv_seg's 13 organs and msd_seg's task
        # need servers that list different series (here by body part: filter values match exactly, docs)
        for name, models, search in (
            ("ct", ["btcv_seg", "brats_seg"], {"Modality": "CT", "BodyPartExamined": "ABDOMEN"}),
            ("msd", ["msd_seg"], {"Modality": "CT", "BodyPartExamined": "LIVER"}),
            ("cr", ["cxr14_classification"], {"Modality": "CR"}),
        ):
            env = dict(
                MONAI_LABEL_DICOMWEB_USERNAME=user,
                MONAI_LABEL_DICOMWEB_PASSWORD=password,
                MONAI_LABEL_DICOMWEB_SEARCH_FILTER=json.dumps(search),
                MONAI_LABEL_DICOMWEB_CACHE_PATH=str(root / f"cache_{name}"),
            )
            log = root / f"server_{name}.log"
            base, info = stack.enter_context(monailabel_server(app, orthanc.url, models, log, env))
            servers[name] = dict(base=base, info=info, log=log)
        yield dict(
            root=root, app=app, orthanc=orthanc, servers=servers, series=series, cases=cases, runs=runs, film=film
        )


def _msd_run(root: Path, app: Path) -> tuple[Path, Path]:
    """msd_seg on its CT demo task: prepared, a tiny pretrain -> finetune run, exported into the app; (dataset_dir,
    folder of images to infer)."""
    from bundle_runner import configs, run_bundle

    from selfmedmae_components.data import msd
    from selfmedmae_components.data.demo import msd as msd_demo

    dataset = Path(
        msd_demo.make_demo(root / "msd_seg_data", layout="ct", num_cases=6, num_test_cases=1, shape=(36, 36, 24))
    )
    msd.prepare_datalist(dataset, eval_fraction=0.25, num_val_cases=1)
    run = root / "runs" / "msd_seg"
    common = dict(dataset_dir=dataset, bundle_root=run, max_epochs=1, amp=False, hidden_size=48, num_workers=0)
    run_bundle("pretrain", configs("msd_seg", "pretrain", "demo"), **common)
    run_bundle("finetune", configs("msd_seg", "finetune", "demo"), validation_mode="none", **common)
    export(run, app / "model", "msd_seg")
    return dataset, dataset / "imagesTs"


def _stats(server: dict) -> dict:
    return json.loads(http("GET", f"{server['base']}/datastore/?output=stats"))


def test_the_search_filter_decides_which_series_each_server_lists(pacs):
    """A DICOMweb datastore lists the PACS's series that match its filter (MONAI Label counts them in the datastore's
    stats and draws from them the next image to label); its own cache is not the listing."""
    ct, cr = pacs["servers"]["ct"], pacs["servers"]["cr"]
    assert _stats(ct)["total"] == 3, "the three BTCV CT series, not msd_seg's nor the film"
    assert _stats(pacs["servers"]["msd"])["total"] == 3, "msd_seg's three CT series"
    assert _stats(cr)["total"] == 1, "the film alone"
    first = json.loads(
        answer_or_fail(
            "POST", f"{cr['base']}/activelearning/first", cr["log"], b"{}", {"Content-Type": "application/json"}
        )
    )
    assert first["id"] == pacs["series"]["film"]


def _segment(server: dict, bundle: str, series_uid: str, out: Path) -> nib.Nifti1Image:
    answer = answer_or_fail("POST", f"{server['base']}/infer/{bundle}?image={series_uid}&output=image", server["log"])
    out = out.with_name(out.name + (".nii.gz" if answer[:2] == b"\x1f\x8b" else ".nii"))
    out.write_bytes(answer)
    return nib.load(out)


def test_a_ct_series_from_the_pacs_is_segmented_as_the_bundle_segments_it_here(pacs, tmp_path):
    from selfmedmae_components.data.dicom import load_volume, scan_files

    ct = pacs["servers"]["ct"]
    folder = pacs["root"] / "dicom" / "btcv_unseen"
    seg = _segment(ct, "btcv_seg", pacs["series"]["btcv_unseen"], tmp_path / "answer")
    # the series as this project reads DICOM (RAS affine from the LPS header), and as it was written
    (series,), _ = scan_files(sorted(folder.glob("*.dcm")))
    volume, affine = load_volume(series)
    assert seg.shape == volume.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-3)
    np.testing.assert_allclose(seg.affine, nib.load(pacs["cases"]["btcv_unseen"][0]).affine, atol=1e-3)
    bundle_dir = pacs["app"] / "model" / "btcv_seg"
    own = own_segmentation(bundle_dir, folder, bundle_dir / "models" / "model.pt", tmp_path / "own")
    np.testing.assert_array_equal(np.asarray(seg.dataobj), own)
    assert len(np.unique(own)) > 1, "an all-background answer would compare equal to anything blank"


def _label_names(info: dict, bundle: str) -> dict[int, str]:
    """Label value -> name, as the server's /info/ gives them (from the metadata's channel_def)."""
    return {int(value): name for name, value in info["models"][bundle]["labels"].items()}


def _orthanc_segs(orthanc: OrthancServer) -> list[pydicom.Dataset]:
    query = json.dumps({"Level": "Instance", "Query": {"Modality": "SEG"}}).encode()
    ids = json.loads(orthanc.request("POST", "/tools/find", query))
    return [pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{i}/file"))) for i in ids]


def _save_labels(pacs: dict, server: str, bundle: str, task: str, keep: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The two labelled cases' labels of ``task`` saved through MONAI Label, as a viewer saves them: ``PUT
    /datastore/label?tag=final`` with ``label_info``, one entry per label value present, in increasing order (MONAI
    Label 0.8.5 names the i-th value present by the i-th entry). The second label keeps only the values ``keep``, so
    that its segment numbers differ from its label values. {case: the saved label map}."""
    served = pacs["servers"][server]
    names = _label_names(served["info"], bundle)
    labels = {}
    for i in range(2):
        name = f"{task}_labelled_{i}"
        source = nib.load(pacs["cases"][name][1])
        values = np.asarray(source.dataobj).astype(np.uint8)
        if i == 1:
            values[~np.isin(values, keep)] = 0
        path = pacs["root"] / "labels" / f"{name}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(values, source.affine), path)
        present = sorted(set(np.unique(values).tolist()) - {0})
        body, headers = multipart("label", path, {"label_info": [{"name": names[v]} for v in present]})
        url = f"{served['base']}/datastore/label?image={pacs['series'][name]}&tag=final"
        answer_or_fail("PUT", url, served["log"], body, headers)
        labels[name] = values
    return labels


@pytest.fixture(scope="module")
def saved_labels(pacs):
    """btcv_seg's two labels (the second with spleen, liver and pancreas only) and msd_seg's (the second with the
    spleen only), saved through their servers."""
    return {
        "btcv_seg": _save_labels(pacs, "ct", "btcv_seg", "btcv", keep=(1, 6, 11)),
        "msd_seg": _save_labels(pacs, "msd", "msd_seg", "msd", keep=(2,)),
    }


def _slice_index(folder: Path) -> dict[tuple, int]:
    """ImagePositionPatient (rounded to 0.01 mm) -> slice index k of the series written by _write_series."""
    index = {}
    for path in sorted(folder.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        index[tuple(np.round(np.array(header.ImagePositionPatient, float), 2))] = int(header.InstanceNumber) - 1
    return index


def test_a_label_saved_through_monailabel_is_a_dicom_seg_in_the_pacs(pacs, saved_labels):
    """Read back from Orthanc with pydicom alone: one SEG per saved label, referencing its series, with our label
    names, and every frame on its slice of the source series (positions, spacing, orientation), so that the decoded
    volume equals the label map that was saved."""
    segs = {str(s.ReferencedSeriesSequence[0].SeriesInstanceUID): s for s in _orthanc_segs(pacs["orthanc"])}
    assert len(segs) == 4
    for bundle, server in (("btcv_seg", "ct"), ("msd_seg", "msd")):
        _check_segs(pacs, segs, _label_names(pacs["servers"][server]["info"], bundle), saved_labels[bundle])


def _check_segs(pacs: dict, segs: dict, names: dict[int, str], saved: dict[str, np.ndarray]) -> None:
    for name, expected in saved.items():
        seg = segs[pacs["series"][name]]
        folder = pacs["root"] / "dicom" / name
        source = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True)
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        shared = seg.SharedFunctionalGroupsSequence[0]
        np.testing.assert_allclose(
            [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
            [float(v) for v in source.PixelSpacing],
            atol=1e-4,
        )
        np.testing.assert_allclose(
            [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
            [float(v) for v in source.ImageOrientationPatient],
            atol=1e-4,
        )
        segment_names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        present = sorted(set(np.unique(expected).tolist()) - {0})
        assert sorted(segment_names.values()) == sorted(names[v] for v in present)
        value_of = {n: v for v, n in names.items()}

        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        index = _slice_index(folder)
        decoded = np.zeros_like(expected)
        for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
            number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            position = tuple(np.round(np.array(groups.PlanePositionSequence[0].ImagePositionPatient, float), 2))
            assert position in index, f"a frame of {name}'s SEG lies on no slice of the series: {position}"
            decoded[:, :, index[position]][frame.T > 0] = value_of[segment_names[number]]  # [row, col] -> [i, j]
        np.testing.assert_array_equal(decoded, expected)


def _train(pacs: dict, server: str, bundle: str, saved: dict[str, np.ndarray]) -> None:
    """POST /train/<bundle> from the shipped MAE encoder; checks that a new model.pt was written from the MAE weights,
    and that the labels it trained on are the saved ones (values and grid), those alone."""
    served = pacs["servers"][server]
    bundle_dir = pacs["app"] / "model" / bundle
    params = {
        "max_epochs": 2,
        "model_filename": "mae_pretrain.pt",
        "val_split": 0.0,
        "device": "cpu",
        "multi_gpu": False,
    }
    start = time.time()
    answer_or_fail(
        "POST",
        f"{served['base']}/train/{bundle}?run_sync=true",
        served["log"],
        json.dumps(params).encode(),
        {"Content-Type": "application/json"},
    )
    log = served["log"].read_text()
    assert (bundle_dir / "models" / "model.pt").stat().st_mtime >= start, f"no new model.pt:\n{log[-8000:]}"
    assert f"Weight transfer from {bundle_dir / 'models' / 'mae_pretrain.pt'}" in log, log[-8000:]

    # what the training read: MONAI Label's datalist, labels converted from the SEG series it fetched
    datalist = json.loads(http("GET", f"{served['base']}/datastore/?output=train"))
    by_image = {_image_id(d["image"]): d["label"] for d in datalist}
    assert set(by_image) == {pacs["series"][name] for name in saved}
    for name, expected in saved.items():
        trained_on = _on_grid(by_image[pacs["series"][name]], nib.load(pacs["cases"][name][0]))
        np.testing.assert_array_equal(trained_on, expected, err_msg=f"{name}: the label MONAI Label trains on")


def test_btcv_seg_trains_from_the_seg_labels_in_the_pacs(pacs, saved_labels, tmp_path):
    """Trained from the SEG labels in Orthanc, the next /infer answers with the new weights: exactly the bundle's own
    inference with them on the series' DICOM files."""
    ct = pacs["servers"]["ct"]
    bundle_dir = pacs["app"] / "model" / "btcv_seg"
    before = _segment(ct, "btcv_seg", pacs["series"]["btcv_unseen"], tmp_path / "before")
    _train(pacs, "ct", "btcv_seg", saved_labels["btcv_seg"])
    after = _segment(ct, "btcv_seg", pacs["series"]["btcv_unseen"], tmp_path / "after")
    own = own_segmentation(
        bundle_dir, pacs["root"] / "dicom" / "btcv_unseen", bundle_dir / "models" / "model.pt", tmp_path / "own_new"
    )
    np.testing.assert_array_equal(np.asarray(after.dataobj), own)
    assert not np.array_equal(np.asarray(before.dataobj), np.asarray(after.dataobj)), "the answer did not change"


def test_msd_seg_trains_from_its_own_seg_labels_in_the_pacs(pacs, saved_labels, tmp_path):
    """msd_seg on its own server (its series alone listed, so btcv_seg's 13-organ labels stay out of its training):
    trained from its SEG labels, the next /infer answers differently, in the series' geometry."""
    msd = pacs["servers"]["msd"]
    before = _segment(msd, "msd_seg", pacs["series"]["msd_unseen"], tmp_path / "before")
    _train(pacs, "msd", "msd_seg", saved_labels["msd_seg"])
    after = _segment(msd, "msd_seg", pacs["series"]["msd_unseen"], tmp_path / "after")
    assert after.shape == nib.load(pacs["cases"]["msd_unseen"][0]).shape
    np.testing.assert_allclose(after.affine, nib.load(pacs["cases"]["msd_unseen"][0]).affine, atol=1e-3)
    assert not np.array_equal(np.asarray(before.dataobj), np.asarray(after.dataobj)), "the answer did not change"


def _on_grid(label_file: str, image: nib.Nifti1Image) -> np.ndarray:
    """A label file's values on ``image``'s voxel grid, by world coordinates (nearest voxel; 0 outside)."""
    from monai.transforms import LoadImage

    label = LoadImage(image_only=True, reader="ITKReader")(label_file)  # RAS affine, as nibabel's
    data = np.asarray(label)
    ijk = np.indices(image.shape[:3]).reshape(3, -1)
    world = image.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    source = np.rint(np.linalg.inv(np.asarray(label.affine, float)) @ world)[:3].astype(int)
    inside = np.all((source >= 0) & (source < np.array(data.shape)[:, None]), axis=0)
    out = np.zeros(ijk.shape[1], np.uint8)
    out[inside] = data[tuple(source[:, inside])]
    return out.reshape(image.shape[:3])


def _image_id(path: str) -> str:
    name = Path(path).name  # a SeriesInstanceUID and an extension: the UID has dots of its own
    return next(name[: -len(ext)] for ext in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", "") if name.endswith(ext))


def test_a_film_from_the_pacs_is_classified_with_the_bundles_own_scores(pacs, tmp_path):
    cr = pacs["servers"]["cr"]
    name = SERVED["cxr14_cls"]
    url = f"{cr['base']}/infer/{name}?image={pacs['series']['film']}&output=json"
    prediction = json.loads(answer_or_fail("POST", url, cr["log"]))["prediction"]
    own = own_scores(pacs["runs"]["cxr14_cls"], pacs["root"] / "dicom" / "film" / "film.dcm", tmp_path / "own.csv")
    scores = [p["score"] for p in prediction]
    assert max(scores) - min(scores) > 0.1, scores  # distinct scores: a mix-up of classes would show
    np.testing.assert_allclose(scores, own, atol=1e-5)


def test_a_single_channel_series_sent_to_brats_seg_is_refused_with_the_reason(pacs):
    """brats_seg needs the four MR modalities in one image; MONAI Label hands over one series per image. A
    one-channel series must end in an error that says so (the server's log, which the HTTP 500 points to), never in
    a label map."""
    ct = pacs["servers"]["ct"]
    url = f"{ct['base']}/infer/brats_seg?image={pacs['series']['btcv_unseen']}&output=image"
    with pytest.raises(urllib.error.HTTPError) as refused:
        http("POST", url, b"", FORM)
    assert refused.value.code == 500
    reason = "1 channel(s), expected 4 (FLAIR, T1w, T1gd, T2w)"
    deadline = time.time() + 30  # the server logs the traceback after it has answered
    while reason not in ct["log"].read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert reason in ct["log"].read_text(), ct["log"].read_text()[-6000:]
