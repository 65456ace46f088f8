"""Inference goes on past bad inputs: each bundle, run by MONAI's bundle runner over a folder of good and
bad files, writes every good output, names each bad file with what is wrong, and exits non-zero.

Nothing is trained: the networks are the conformance tests' tiny ones with random weights, on the same
demo data (made once per session, shared with tests/test_bundle_conformance.py). Also here: BraTS'
channel check, a 4-D BraTS image stored sagittally (MONAI 1.6.1 could not write its label map), the
missing input folder, and the mechanism itself in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import REPO, configs
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import Lambdad
from test_bundle_conformance import CASES, bundle, checkpoint, data  # noqa: F401 - fixtures reused

from selfmedmae_components.inference import FailSoftDataset, InferenceReport, collate_loaded
from selfmedmae_components.transforms.brats import CheckModalitiesd


def _run(bundle_name: str, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run inference`` of a bundle (+ demo), returning its exit status and output."""
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        configs(bundle_name, "inference", "demo"),
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _as_sagittal(src: Path, dst: Path) -> Path:
    """The same 4-D image stored with its voxel axes rotated (x, y, z) -> (y, z, x), the affine to match:
    a sagittal acquisition of the same head."""
    image = nib.load(src)
    affine = image.affine.copy()
    affine[:3, :3] = image.affine[:3, [1, 2, 0]]
    nib.save(nib.Nifti1Image(np.transpose(np.asarray(image.dataobj), (1, 2, 0, 3)), affine), dst)
    return dst


def _one_channel(src: Path, dst: Path) -> Path:
    image = nib.load(src)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine), dst)
    return dst


def _inputs(bundle_name: str, good: list[Path], folder: Path) -> dict[str, list[Path]]:
    """Copies ``good`` into ``folder`` beside bad files; names sort so that good files come after bad ones."""
    folder.mkdir()
    goods = []
    for p in good:
        goods.append(folder / p.name)
        goods[-1].write_bytes(p.read_bytes())
    if bundle_name == "cxr14_cls":
        bad = [_truncated(good[0], folder / "0_truncated.png"), folder / "notes.png"]
        bad[1].write_text("not an image\n")
    else:
        bad = [_truncated(good[0], folder / "0_truncated.nii.gz"), folder / "notes.nii.gz"]
        bad[1].write_text("not an image\n")
    if bundle_name == "brats_seg":
        bad.append(_one_channel(good[0], folder / "0_flair_only.nii.gz"))
        goods.append(_as_sagittal(good[0], folder / "z_sagittal.nii.gz"))
    return {"good": goods, "bad": bad}


def test_bad_inputs_are_named_and_skipped_and_the_run_fails_at_the_end(bundle, data, checkpoint, tmp_path):
    case = CASES[bundle]
    _, images = data
    good = sorted(images.glob("*.nii.gz") if case.segmentation else images.glob("*.png"))
    files = _inputs(bundle, good, tmp_path / "in")
    out = tmp_path / "out"
    # brats with two loader workers: failures come back from the worker processes too
    tiny = dict(case.tiny, num_workers=2) if bundle == "brats_seg" else case.tiny
    proc = _run(bundle, input_dir=tmp_path / "in", checkpoint=checkpoint, output_dir=out, bundle_root=tmp_path, **tiny)
    log = proc.stdout + proc.stderr

    assert proc.returncode != 0, log
    for f in files["bad"]:
        assert f"Skipped {f}: " in proc.stderr, log
    where = out if case.segmentation else out / "predictions.csv"
    assert f"{len(files['good'])} input(s) written to {where}, {len(files['bad'])} failed" in proc.stdout, log
    assert f"{len(files['bad'])} of {len(files['good']) + len(files['bad'])} input(s) could not be processed" in log
    if case.segmentation:
        written = sorted(p.name for p in out.iterdir())
        assert written == sorted(f.name.replace(".nii.gz", "_seg.nii.gz") for f in files["good"]), log
    else:
        rows = (out / "predictions.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == [str(f) for f in files["good"]]
    if bundle == "brats_seg":
        assert "0_flair_only.nii.gz: ValueError: 1 channel(s), expected 4 (FLAIR, T1w, T1gd, T2w)" in proc.stderr
        _check_sagittal(
            out / f"{good[0].name[:-7]}_seg.nii.gz",
            out / "z_sagittal_seg.nii.gz",
            tmp_path / "in" / "z_sagittal.nii.gz",
        )


def _check_sagittal(axial_seg: Path, sagittal_seg: Path, sagittal_input: Path) -> None:
    """The sagittally stored copy's label map is in its own grid and, voxel for voxel, the axial one's."""
    seg, image = nib.load(sagittal_seg), nib.load(sagittal_input)
    assert seg.shape == image.shape[:3] and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    axial = np.asarray(nib.load(axial_seg).dataobj)
    assert len(np.unique(axial)) > 1  # a real map to compare, not all background
    np.testing.assert_array_equal(np.asarray(seg.dataobj), np.transpose(axial, (1, 2, 0)))


@pytest.mark.parametrize("bundle_name", list(CASES))
def test_a_missing_input_folder_is_named(bundle_name, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs(bundle_name, "inference"))
    parser.update({"input_dir": str(tmp_path / "nowhere"), "bundle_root": str(tmp_path)})
    with pytest.raises(Exception) as exc:  # MONAI wraps it: "Failed to evaluate ConfigExpression ..."
        parser.get_parsed_content("data")
    messages = []
    e = exc.value
    while e is not None:
        messages.append(str(e))
        e = e.__cause__
    assert any(m.startswith(f"Input folder not found: {tmp_path / 'nowhere'}") for m in messages), messages


def test_brats_channel_check_names_the_file_and_the_modalities():
    check = CheckModalitiesd("image")
    four = MetaTensor(torch.zeros(4, 3, 3, 3))
    assert check({"image": four})["image"] is four
    with pytest.raises(ValueError, match=r"^/d/t1\.nii\.gz: 1 channel\(s\), expected 4 \(FLAIR, T1w, T1gd, T2w\)"):
        check({"image": MetaTensor(torch.zeros(1, 3, 3, 3), meta={"filename_or_obj": "/d/t1.nii.gz"})})


def test_failures_in_loading_or_writing_skip_only_their_inputs():
    def load(name: str) -> MetaTensor:  # stands in for LoadImaged: "bad*" files cannot be read
        if name.startswith("bad"):
            raise OSError("image file is truncated")
        return MetaTensor(torch.ones(1, 2, 2), meta={"filename_or_obj": name})

    written = []

    def save(item: dict) -> dict:  # stands in for the writer: one input cannot be written
        name = item["image"].meta["filename_or_obj"]
        if name == "unwritable":
            raise OSError("No space left on device")
        written.append(name)
        return item

    names = ["a", "bad1", "b", "c", "unwritable", "bad2"]
    dataset = FailSoftDataset([{"image": n} for n in names], transform=Lambdad("image", load))
    report = InferenceReport(output="out/")
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=DataLoader(dataset, batch_size=2, collate_fn=collate_loaded),
        network=torch.nn.Identity(),
        postprocessing=save,
        val_handlers=[report],
        iteration_update=report.iteration,
    )
    with pytest.raises(
        ValueError, match=r"3 of 6 input\(s\) could not be processed \(the other 3 were written to out/\)"
    ):
        evaluator.run()
    assert written == ["a", "b", "c"] and report.written == 3
    assert [(f.source, f.reason) for f in report.failed] == [
        ("bad1", "OSError: image file is truncated"),
        ("bad2", "OSError: image file is truncated"),  # a load failure is reported when its batch arrives
        ("unwritable", "OSError: No space left on device"),
    ]
