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
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import REPO
from test_bundle_conformance import CASES, skip_reason

pytestmark = pytest.mark.monailabel

VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
SEG_BUNDLES = ("btcv_seg", "brats_seg")
# served name of each bundle: MONAI Label treats a bundle as a classifier only if its name says so
SERVED = {"btcv_seg": "btcv_seg", "brats_seg": "brats_seg", "cxr14_cls": "cxr14_classification"}
STARTUP_TIMEOUT_S = 600


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _upload(base: str, image_id: str, path: Path) -> None:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    _http(
        "PUT",
        f"{base}/datastore/image?image={image_id}",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )


def _tiny_run(bundle: str, dataset_dir: Path, run: Path) -> None:
    """The README demo's training stages (pretrain -> finetune from the MAE encoder) with the demo preset and
    the tiny settings, one epoch each, into the run folder ``run`` (its models/, as demo_runs/<bundle>/)."""
    from bundle_runner import configs, run_bundle

    tiny = {k: json.dumps(v) for k, v in CASES[bundle].tiny.items()}
    common = dict(dataset_dir=dataset_dir, bundle_root=run, max_epochs=1, amp=False, **tiny)
    run_bundle("pretrain", configs(bundle, "pretrain", "demo"), **common)
    run_bundle("finetune", configs(bundle, "finetune", "demo"), validation_mode="none", **common)
    model = run / "models" / "model.pt"
    state = torch.load(model, weights_only=True)
    if "head.weight" in state["model"]:  # the classifier's head is still near zero after one epoch (all scores
        # ~0.5): spread the scores, so that a mix-up of classes would show
        torch.manual_seed(0)
        state["model"]["head.weight"] = torch.randn_like(state["model"]["head.weight"])
        torch.save(state, model)


def _export(run: Path, model_dir: Path, name: str) -> Path:
    """docs/MONAI_LABEL.md, section 2: ``python tools/export_bundle.py --run ... --out ... --no-zip [--name]``."""
    proc = subprocess.run([sys.executable, str(REPO / "tools/export_bundle.py"), "--run", str(run), "--out", str(model_dir),
                           "--no-zip", "--name", name], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return model_dir / name


# MONAI Label's default datastore file types leave out DICOM files: the doc adds them with this variable
FILE_EXT = json.dumps(["*.nii.gz", "*.nii", "*.nrrd", "*.jpg", "*.png", "*.dcm"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (VENV / "bin" / "monailabel").is_file():  # (run as `python -m monailabel.main`: the `monailabel`
        # script puts the folder above the venv, here this repository, on PYTHONPATH)
        pytest.skip(f"MONAI Label is not installed in {VENV} (docs/MONAI_LABEL.md)")
    bundles = [b for b in SERVED if skip_reason(b) is None]
    root = tmp_path_factory.mktemp("monailabel")
    apps = root / "apps"
    monailabel = [str(_venv_python()), "-m", "monailabel.main"]
    subprocess.run(
        [*monailabel, "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=root,
    )  # fmt: skip  (copied from the installed wheel)
    app = apps / "monaibundle"
    sys.path.insert(0, str(REPO / "tools"))

    inputs, runs = {}, {}
    for b in bundles:
        dataset_dir, folder = CASES[b].make_data(root / f"{b}_data")
        inputs[b] = sorted(folder.glob("*.nii*") if CASES[b].segmentation else folder.glob("*.png"))[0]
        runs[b] = root / "runs" / b
        _tiny_run(b, dataset_dir, runs[b])
        _export(runs[b], app / "model", SERVED[b])
    studies = root / "studies"
    studies.mkdir()
    if "cxr14_cls" in bundles:  # a DICOM chest film put straight into the studies folder
        from cxr_helpers import write_dicom
        from PIL import Image

        pixels = np.asarray(Image.open(inputs["cxr14_cls"]).convert("L"), dtype=np.uint16) * 257  # 8 -> 16 bit
        write_dicom(studies / "film_dicom.dcm", pixels, "MONOCHROME2", bits_stored=16)
    port = _free_port()
    log = open(root / "server.log", "w")
    cmd = [
        *monailabel,
        "start_server",
        "--app",
        str(app),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "models",
        ",".join(SERVED[b] for b in bundles),
        "--conf",
        "zoo_source",
        "ngc",  # any source but the default monaihosting: local bundles, no zoo query
        "--conf",
        "sam2",
        "false",  # else the app adds SAM2, whose weights are downloaded
        "--conf",
        "skip_trainers",
        "false",
    ]  # fmt: skip  (the segmentation bundles train: configs/train.yaml)
    env = dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ['PATH']}", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               MONAI_LABEL_DATASTORE_FILE_EXT=FILE_EXT)  # fmt: skip
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label exited ({proc.returncode}):\n{(root / 'server.log').read_text()[-6000:]}")
            try:
                info = json.loads(_http("GET", f"{base}/info/", timeout=10))
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail(
                        f"MONAI Label did not answer in {STARTUP_TIMEOUT_S} s:\n{(root / 'server.log').read_text()[-6000:]}"
                    )
                time.sleep(2)
        yield base, info, inputs, app, root, runs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, by the server's own id
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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
    _upload(base, image_id, image)
    try:
        answer = _http("POST", f"{base}/infer/{bundle}?image={image_id}&output=image", b"",
                       {"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{bundle}: {e.code} {e.read()[-3000:]!r}\n{(root / 'server.log').read_text()[-6000:]}")
    out = tmp_path / ("label.nii.gz" if answer[:2] == b"\x1f\x8b" else "label.nii")
    out.write_bytes(answer)
    seg, img = nib.load(out), nib.load(image)
    assert seg.shape == img.shape[:3]
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-3)
    values = set(np.unique(np.asarray(seg.dataobj)).astype(int).tolist())
    assert values <= labels, f"label values {sorted(values)} outside the metadata's {sorted(labels)}"


def _own_scores(runs: dict, image: Path, out: Path) -> list[float]:
    """The bundle's own inference config on ``image`` in the run folder (its weights, the run's settings)."""
    from bundle_runner import configs, run_bundle

    run_bundle("inference", configs("cxr14_cls", "inference", "demo"), input_files=[str(image)], bundle_root=runs["cxr14_cls"],
               output_file=out, **{k: json.dumps(v) for k, v in CASES["cxr14_cls"].tiny.items()})  # fmt: skip
    return [float(v) for v in out.read_text().splitlines()[1].split(",")[1:]]


def _classify(base: str, root: Path, name: str, image_id: str) -> list[dict]:
    try:
        answer = json.loads(_http("POST", f"{base}/infer/{name}?image={image_id}&output=json", b"",
                                  {"Content-Type": "application/x-www-form-urlencoded"}))  # fmt: skip
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
    _upload(base, image.stem, image)
    prediction = _classify(base, root, name, image.stem)
    assert [p["label"] for p in prediction] == [classes[str(i)].lower() for i in range(len(classes))]

    # the same file through the bundle's own inference config (this repository, the run's weights and settings)
    own = _own_scores(runs, image, tmp_path / "predictions.csv")
    scores = [p["score"] for p in prediction]
    assert max(scores) - min(scores) > 0.1, scores  # distinct scores: a mix-up of classes would show
    np.testing.assert_allclose(scores, own, atol=1e-5)


def test_monailabel_lists_and_classifies_a_dicom_film_in_the_studies_folder(server, tmp_path):
    """With ``MONAI_LABEL_DATASTORE_FILE_EXT`` including ``*.dcm`` (docs/MONAI_LABEL.md), a DICOM file put in
    the studies folder is listed and classified as the bundle's own inference classifies it."""
    base, info, inputs, app, root, runs = server
    if "cxr14_cls" not in inputs:
        pytest.skip(skip_reason("cxr14_cls") or "cxr14_cls not served")
    listed = json.loads(_http("GET", f"{base}/datastore/?output=all"))
    assert "film_dicom" in listed.get("objects", listed), f"film_dicom.dcm not listed: {str(listed)[:2000]}"
    prediction = _classify(base, root, SERVED["cxr14_cls"], "film_dicom")
    own = _own_scores(runs, root / "studies" / "film_dicom.dcm", tmp_path / "predictions.csv")
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
    _upload(base, "film_nifti", nifti)
    prediction = _classify(base, root, SERVED["cxr14_cls"], "film_nifti")
    own = _own_scores(runs, png, tmp_path / "predictions.csv")
    np.testing.assert_allclose([p["score"] for p in prediction], own, atol=1e-5)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _segment(base: str, root: Path, bundle: str, image_id: str, out: Path) -> np.ndarray:
    try:
        answer = _http("POST", f"{base}/infer/{bundle}?image={image_id}&output=image", b"",
                       {"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{bundle}: {e.code} {e.read()[-3000:]!r}\n{(root / 'server.log').read_text()[-6000:]}")
    out = out.with_name(out.name + (".nii.gz" if answer[:2] == b"\x1f\x8b" else ".nii"))
    out.write_bytes(answer)
    return np.asarray(nib.load(out).dataobj)


def _own_segmentation(bundle_dir: Path, image: Path, checkpoint: Path, out_dir: Path) -> np.ndarray:
    """The exported bundle's own inference config, run by MONAI's bundle runner in MONAI Label's venv (the
    same torch as the server) on ``checkpoint``."""
    out_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(_venv_python()), "-m", "monai.bundle", "run", "inference", "--config_file",
                           str(bundle_dir / "configs" / "inference.yaml"), "--input_files", repr([str(image)]),
                           "--output_dir", str(out_dir), "--checkpoint", str(checkpoint), "--num_workers", "0"],
                          capture_output=True, text=True, timeout=600, cwd=out_dir, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return np.asarray(nib.load(next(out_dir.glob("*_seg.nii*"))).dataobj)


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
        _upload(base, f"labelled_{i}", dataset_dir / case["image"])
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
        _http("PUT", f"{base}/datastore/label?image=labelled_{i}&tag=final", body,
              {"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    listed = json.loads(_http("GET", f"{base}/datastore/?output=all"))
    assert sum(1 for v in listed["objects"].values() if "final" in v.get("labels", {})) == 2, str(listed)[:2000]

    image = inputs[bundle]
    _upload(base, "unseen", image)
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
        _http(
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
    np.testing.assert_array_equal(after, _own_segmentation(bundle_dir, image, model, tmp_path / "own_new"))
    np.testing.assert_array_equal(before, _own_segmentation(bundle_dir, image, old, tmp_path / "own_old"))
    assert not np.array_equal(before, after), "inference did not change after training"
