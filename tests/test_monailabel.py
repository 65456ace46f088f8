"""MONAI Label serves the exported bundles (real server on 127.0.0.1, stock monaibundle app): the two
segmentation bundles, and cxr14_cls exported as ``cxr14_classification`` (MONAI Label takes the task from
the folder name).

Needs MONAI Label in its own virtualenv (``.venv-monailabel``, or ``MONAILABEL_VENV``): see
docs/MONAI_LABEL.md for the install command. Skipped when it is not there; not run by CI (the install
is several GB). Run it with:

    python -m pytest -m monailabel tests/test_monailabel.py

The fixture follows docs/MONAI_LABEL.md as written, with the weights a newcomer has: a training run per
bundle (the README demo's stages pretrain -> finetune, with the demo preset, tiny settings and one epoch
each, so that a CPU answers in seconds) is exported with ``tools/export_bundle.py --run <run folder>``
alone, the server is started with the doc's command (DICOM added to the datastore's file types), and:
a demo image is uploaded, ``/infer/<bundle>`` is called and the returned label map is checked against
the input (shape, affine) and the labels of the metadata's output ``channel_def``; for the classifier,
the returned class names and scores are checked against the bundle's own inference in the run folder
on the same file, for a PNG, a DICOM file put in the studies folder and a 2-D NIfTI film (as 3D Slicer
sends it).
"""

from __future__ import annotations

import json
import time
import urllib.error
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel_helpers import (
    SERVED,
    download_app,
    export,
    http,
    monailabel_missing,
    monailabel_server,
    own_scores,
    own_segmentation,
    tiny_run,
    upload,
)
from test_bundle_conformance import CASES, skip_reason

pytestmark = pytest.mark.monailabel

SEG_BUNDLES = ("btcv_seg", "brats_seg")
# MONAI Label's default datastore file types leave out DICOM files: the doc adds them with this variable
FILE_EXT = json.dumps(["*.nii.gz", "*.nii", "*.nrrd", "*.jpg", "*.png", "*.dcm"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if monailabel_missing():  # (run as `python -m monailabel.main`: the `monailabel` script puts the folder
        # above the venv, here this repository, on PYTHONPATH)
        pytest.skip(monailabel_missing())
    bundles = [b for b in SERVED if skip_reason(b) is None]
    root = tmp_path_factory.mktemp("monailabel")
    app = download_app(root)

    inputs, runs = {}, {}
    for b in bundles:
        dataset_dir, folder = CASES[b].make_data(root / f"{b}_data")
        inputs[b] = sorted(folder.glob("*.nii*") if CASES[b].segmentation else folder.glob("*.png"))[0]
        runs[b] = root / "runs" / b
        tiny_run(b, dataset_dir, runs[b])
        export(runs[b], app / "model", SERVED[b])
    studies = root / "studies"
    studies.mkdir()
    if "cxr14_cls" in bundles:  # a DICOM chest film put straight into the studies folder
        from cxr_helpers import write_dicom
        from PIL import Image

        pixels = np.asarray(Image.open(inputs["cxr14_cls"]).convert("L"), dtype=np.uint16) * 257  # 8 -> 16 bit
        write_dicom(studies / "film_dicom.dcm", pixels, "MONOCHROME2", bits_stored=16)
    with monailabel_server(
        app,
        str(studies),
        [SERVED[b] for b in bundles],
        root / "server.log",
        dict(MONAI_LABEL_DATASTORE_FILE_EXT=FILE_EXT),
    ) as (base, info):
        yield base, info, inputs, app, root, runs


@pytest.mark.parametrize("bundle", SEG_BUNDLES)
def test_monailabel_segments_an_uploaded_image(server, bundle, tmp_path):
    base, info, inputs, app, root, runs = server
    if bundle not in inputs:
        pytest.skip(skip_reason(bundle) or f"{bundle} not served")
    assert bundle in info["models"], (
        f"{bundle} not among the served models {list(info['models'])}: see {root / 'server.log'}"
    )
    meta = json.loads((app / "model" / bundle / "configs" / "metadata.json").read_text())
    labels = {int(k) for k in meta["network_data_format"]["outputs"]["pred"]["channel_def"]}

    image = inputs[bundle]
    image_id = image.name.split(".")[0]
    upload(base, image_id, image)
    try:
        answer = http(
            "POST",
            f"{base}/infer/{bundle}?image={image_id}&output=image",
            b"",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{bundle}: {e.code} {e.read()[-3000:]!r}\n{(root / 'server.log').read_text()[-6000:]}")
    out = tmp_path / ("label.nii.gz" if answer[:2] == b"\x1f\x8b" else "label.nii")
    out.write_bytes(answer)
    seg, img = nib.load(out), nib.load(image)
    assert seg.shape == img.shape[:3]
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-3)
    values = set(np.unique(np.asarray(seg.dataobj)).astype(int).tolist())
    assert values <= labels, f"label values {sorted(values)} outside the metadata's {sorted(labels)}"


def _classify(base: str, root: Path, name: str, image_id: str) -> list[dict]:
    try:
        answer = json.loads(
            http(
                "POST",
                f"{base}/infer/{name}?image={image_id}&output=json",
                b"",
                {"Content-Type": "application/x-www-form-urlencoded"},
            )
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{name}: {e.code} {e.read()[-3000:]!r}\n{(root / 'server.log').read_text()[-6000:]}")
    return answer["prediction"]


def test_monailabel_classifies_an_uploaded_chest_xray(server, tmp_path):
    """MONAI Label appends its ``Restored`` step to every bundle's postprocessing; on the classifier's
    14-vector it must change nothing, and the scores must be the bundle's own."""
    base, info, inputs, app, root, runs = server
    if "cxr14_cls" not in inputs:
        pytest.skip(skip_reason("cxr14_cls") or "cxr14_cls not served")
    name = SERVED["cxr14_cls"]
    assert name in info["models"], (
        f"{name} not among the served models {list(info['models'])}: see {root / 'server.log'}"
    )
    assert info["models"][name]["type"] == "classification"
    meta = json.loads((app / "model" / name / "configs" / "metadata.json").read_text())
    classes = meta["network_data_format"]["outputs"]["pred"]["channel_def"]

    image = inputs["cxr14_cls"]
    upload(base, image.stem, image)
    prediction = _classify(base, root, name, image.stem)
    assert [p["label"] for p in prediction] == [classes[str(i)].lower() for i in range(len(classes))]

    # the same file through the bundle's own inference config (this repository, the run's weights and settings)
    own = own_scores(runs["cxr14_cls"], image, tmp_path / "predictions.csv")
    scores = [p["score"] for p in prediction]
    assert max(scores) - min(scores) > 0.1, scores  # distinct scores: a mix-up of classes would show
    np.testing.assert_allclose(scores, own, atol=1e-5)


def test_monailabel_lists_and_classifies_a_dicom_film_in_the_studies_folder(server, tmp_path):
    """With ``MONAI_LABEL_DATASTORE_FILE_EXT`` including ``*.dcm`` (docs/MONAI_LABEL.md), a DICOM file put in
    the studies folder is listed and classified as the bundle's own inference classifies it."""
    base, info, inputs, app, root, runs = server
    if "cxr14_cls" not in inputs:
        pytest.skip(skip_reason("cxr14_cls") or "cxr14_cls not served")
    listed = json.loads(http("GET", f"{base}/datastore/?output=all"))
    assert "film_dicom" in listed.get("objects", listed), f"film_dicom.dcm not listed: {str(listed)[:2000]}"
    prediction = _classify(base, root, SERVED["cxr14_cls"], "film_dicom")
    own = own_scores(runs["cxr14_cls"], root / "studies" / "film_dicom.dcm", tmp_path / "predictions.csv")
    np.testing.assert_allclose([p["score"] for p in prediction], own, atol=1e-5)


def test_monailabel_classifies_a_2d_nifti_film(server, tmp_path):
    """A chest film as 3D Slicer sends it after loading a PNG (a NIfTI volume with one slice) gets the PNG's scores."""
    import itk

    base, info, inputs, app, root, runs = server
    if "cxr14_cls" not in inputs:
        pytest.skip(skip_reason("cxr14_cls") or "cxr14_cls not served")
    png = inputs["cxr14_cls"]
    nifti = tmp_path / "film_nifti.nii.gz"
    itk.imwrite(itk.imread(str(png)), str(nifti))
    upload(base, "film_nifti", nifti)
    prediction = _classify(base, root, SERVED["cxr14_cls"], "film_nifti")
    own = own_scores(runs["cxr14_cls"], png, tmp_path / "predictions.csv")
    np.testing.assert_allclose([p["score"] for p in prediction], own, atol=1e-5)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _segment(base: str, root: Path, bundle: str, image_id: str, out: Path) -> np.ndarray:
    try:
        answer = http(
            "POST",
            f"{base}/infer/{bundle}?image={image_id}&output=image",
            b"",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{bundle}: {e.code} {e.read()[-3000:]!r}\n{(root / 'server.log').read_text()[-6000:]}")
    out = out.with_name(out.name + (".nii.gz" if answer[:2] == b"\x1f\x8b" else ".nii"))
    out.write_bytes(answer)
    return np.asarray(nib.load(out).dataobj)


def test_monailabel_trains_from_the_mae_encoder_and_serves_the_new_model(server, tmp_path):
    """Two labels saved in the datastore, POST /train/btcv_seg (model_filename=mae_pretrain.pt: UNETR starts
    from the shipped MAE encoder, not from the served model.pt), a new models/model.pt, and the next /infer answers with it
    (the label map of the bundle's own inference on the new weights, not the old)."""
    base, info, inputs, app, root, runs = server
    bundle = "btcv_seg"
    if bundle not in inputs:
        pytest.skip(skip_reason(bundle) or f"{bundle} not served")
    assert bundle in info.get("trainers", {}), (
        f"no trainer for {bundle}: {list(info.get('trainers', {}))}; see {root / 'server.log'}"
    )
    bundle_dir = app / "model" / bundle
    model = bundle_dir / "models" / "model.pt"
    old = tmp_path / "model_before.pt"
    old.write_bytes(model.read_bytes())

    dataset_dir = next((root / f"{bundle}_data").glob("*/datalist.json")).parent
    for i, case in enumerate(json.loads((dataset_dir / "datalist.json").read_text())["training"][:2]):
        upload(base, f"labelled_{i}", dataset_dir / case["image"])
        label = dataset_dir / case["label"]
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{label.name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + label.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        http(
            "PUT",
            f"{base}/datastore/label?image=labelled_{i}&tag=final",
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
    listed = json.loads(http("GET", f"{base}/datastore/?output=all"))
    assert sum(1 for v in listed["objects"].values() if "final" in v.get("labels", {})) == 2, str(listed)[:2000]

    image = inputs[bundle]
    upload(base, "unseen", image)
    before = _segment(base, root, bundle, "unseen", tmp_path / "before")

    start = time.time()
    # model_filename: the weights MONAI Label loads (non-strictly) before training; the MAE checkpoint's encoder
    # names are UNETR's (pretrained=false would be the other way, but monailabel 0.8.5 fails on it: TypeError
    # in BundleTrainTask._load_checkpoint)
    params = {
        "max_epochs": 2,
        "model_filename": "mae_pretrain.pt",
        "val_split": 0.0,
        "device": "cpu",
        "multi_gpu": False,
    }
    try:
        http(
            "POST",
            f"{base}/train/{bundle}?run_sync=true",
            json.dumps(params).encode(),
            {"Content-Type": "application/json"},
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"/train/{bundle}: {e.code} {e.read()[-3000:]!r}\n{(root / 'server.log').read_text()[-8000:]}")
    log = (root / "server.log").read_text()
    assert _sha(model) != _sha(old), f"no new model.pt after training:\n{log[-8000:]}"
    assert f"Weight transfer from {bundle_dir / 'models' / 'mae_pretrain.pt'}" in log, log[-8000:]
    assert model.stat().st_mtime >= start

    after = _segment(base, root, bundle, "unseen", tmp_path / "after")
    np.testing.assert_array_equal(after, own_segmentation(bundle_dir, image, model, tmp_path / "own_new"))
    np.testing.assert_array_equal(before, own_segmentation(bundle_dir, image, old, tmp_path / "own_old"))
    assert not np.array_equal(before, after), "inference did not change after training"
