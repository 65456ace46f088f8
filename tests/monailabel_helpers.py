"""A real MONAI Label server for the opt-in tests (tests/test_monailabel.py, tests/test_pacs.py): the steps of
docs/MONAI_LABEL.md, from a training run's weights to a server answering on 127.0.0.1.

MONAI Label lives in its own virtualenv (``.venv-monailabel``, or ``MONAILABEL_VENV``): see docs/MONAI_LABEL.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
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
from orthanc import free_port
from test_bundle_conformance import CASES

VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
# served name of each bundle: MONAI Label treats a bundle as a classifier only if its name says so
SERVED = {"btcv_seg": "btcv_seg", "brats_seg": "brats_seg", "cxr14_cls": "cxr14_classification"}
STARTUP_TIMEOUT_S = 600
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def monailabel_missing() -> str | None:
    """Why no MONAI Label server can be started here, or None."""
    if not (VENV / "bin" / "monailabel").is_file():
        return f"MONAI Label is not installed in {VENV} (docs/MONAI_LABEL.md)"
    return None


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def multipart(field: str, path: Path, params: dict | None = None) -> tuple[bytes, dict]:
    """A multipart/form-data body with the file ``path`` as ``field`` (and ``params`` as MONAI Label's JSON
    ``params`` field); the body and its headers."""
    boundary = uuid.uuid4().hex
    body = b""
    if params is not None:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n'
        ).encode()
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(base: str, image_id: str, path: Path) -> None:
    http("PUT", f"{base}/datastore/image?image={image_id}", *multipart("file", path))


def tiny_run(bundle: str, dataset_dir: Path, run: Path) -> None:
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


def export(run: Path, model_dir: Path, name: str) -> Path:
    """docs/MONAI_LABEL.md, section 2: ``python tools/export_bundle.py --run ... --out ... --no-zip [--name]``."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/export_bundle.py"),
            "--run",
            str(run),
            "--out",
            str(model_dir),
            "--no-zip",
            "--name",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return model_dir / name


def download_app(root: Path) -> Path:
    """``monailabel apps --download --name monaibundle`` (copied from the installed wheel, no network)."""
    apps = root / "apps"
    subprocess.run(
        [
            str(venv_python()),
            "-m",
            "monailabel.main",
            "apps",
            "--download",
            "--name",
            "monaibundle",
            "--output",
            str(apps),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=root,
    )
    return apps / "monaibundle"


@contextlib.contextmanager
def monailabel_server(app: Path, studies: str, models: list[str], log_path: Path, env: dict | None = None):
    """docs/MONAI_LABEL.md's ``start_server`` command on a free port; yields (base URL, /info/). Stopped, with the
    workers it started, by its process group at the end."""
    port = free_port()
    conf = {
        "models": ",".join(models),
        "zoo_source": "ngc",  # any source but the default monaihosting: local bundles, no zoo query
        "sam2": "false",  # else the app adds SAM2, whose weights are downloaded
        "skip_trainers": "false",  # the segmentation bundles train (configs/train.yaml)
    }
    cmd = [str(venv_python()), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    full_env = dict(
        os.environ,
        PATH=f"{VENV / 'bin'}:{os.environ['PATH']}",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        **(env or {}),
    )
    full_env.pop("PYTHONPATH", None)
    log = open(log_path, "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=app.parent.parent, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label exited ({proc.returncode}):\n{log_path.read_text()[-6000:]}")
            try:
                info = json.loads(http("GET", f"{base}/info/", timeout=10))
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() > deadline:
                    pytest.fail(f"MONAI Label did not answer in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
                time.sleep(2)
        yield base, info
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, by the server's own id
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def answer_or_fail(method: str, url: str, log_path: Path, body: bytes = b"", headers: dict | None = None) -> bytes:
    """The server's answer, or a test failure with its HTTP error and the end of the server's log."""
    try:
        return http(method, url, body, headers if headers is not None else FORM)
    except urllib.error.HTTPError as e:
        pytest.fail(f"{url}: {e.code} {e.read()[-3000:]!r}\n{log_path.read_text()[-8000:]}")


def own_segmentation(bundle_dir: Path, image: Path, checkpoint: Path, out_dir: Path) -> np.ndarray:
    """The exported bundle's own inference config, run by MONAI's bundle runner in MONAI Label's venv (the
    same torch as the server) on ``checkpoint``."""
    out_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            str(venv_python()),
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            str(bundle_dir / "configs" / "inference.yaml"),
            "--input_files",
            repr([str(image)]),
            "--output_dir",
            str(out_dir),
            "--checkpoint",
            str(checkpoint),
            "--num_workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out_dir,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return np.asarray(nib.load(next(out_dir.glob("*_seg.nii*"))).dataobj)


def own_scores(run: Path, image: Path, out: Path) -> list[float]:
    """The bundle's own inference config on ``image`` in the run folder ``run`` (its weights, the run's settings)."""
    from bundle_runner import configs, run_bundle

    run_bundle(
        "inference",
        configs("cxr14_cls", "inference", "demo"),
        input_files=[str(image)],
        bundle_root=run,
        output_file=out,
        **{k: json.dumps(v) for k, v in CASES["cxr14_cls"].tiny.items()},
    )
    return [float(v) for v in out.read_text().splitlines()[1].split(",")[1:]]
