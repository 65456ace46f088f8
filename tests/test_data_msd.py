"""data/msd.py: any MSD-format dataset is checked file by file, split with a saved seed, and the bundle's defaults
(channels, labels, intensity, spacing, ROI) are derived from it as documented; data/demo/msd.py writes it.
Small generated sets, no training: a few seconds."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from selfmedmae_components.data import msd
from selfmedmae_components.data.common import DatasetError
from selfmedmae_components.data.demo import msd as demo
from selfmedmae_components.transforms.msd import intensity


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """{layout: dataset folder} of 8 labelled and 1 test case each (untouched: tests copy before breaking)."""
    root = tmp_path_factory.mktemp("msd_sets")
    return {
        layout: Path(demo.make_demo(root, layout=layout, num_cases=8, num_test_cases=1, shape=(24, 24, 12)))
        for layout in demo.LAYOUTS
    }


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_mr_defaults_come_from_dataset_json_and_the_headers(sets, tmp_path):
    data = msd.prepare_datalist(sets["mr"], output=tmp_path / "d.json", eval_fraction=0.25, num_val_cases=1)
    props = data["properties"]
    assert props["channels"] == 2 and props["modality"] == {"0": "T2", "1": "ADC"}
    assert props["labels"] == {"0": "background", "1": "peripheral zone", "2": "transition zone"}
    assert props["normalization"] == "zscore" and props["hu_min"] is None and props["hu_max"] is None
    spacings = [np.abs(np.diag(nib.load(sets["mr"] / i["image"]).affine)[:3]) for i in data["training"]]
    np.testing.assert_allclose(props["pixdim"], np.median(spacings, axis=0), atol=0.006)
    # 24 x 24 x 12 voxels of 6 x 6 x ~6.7 mm: 24 x 24 x ~12 at the median spacing -> 16 x 16 x 16 at least 16
    assert props["roi_size"] == [16, 16, 16]
    assert [len(data[k]) for k in ("training", "validation", "evaluation", "test")] == [5, 1, 2, 1]
    assert not any(
        Path(i["image"]).name.startswith("._") for k in ("training", "validation", "evaluation") for i in data[k]
    )
    props = msd.dataset_properties(tmp_path / "d.json")
    assert props["class_names"] == ["peripheral zone", "transition zone"] and props["out_channels"] == 3


def test_ct_window_is_the_foreground_percentiles_of_the_training_cases(sets, tmp_path):
    data = msd.prepare_datalist(sets["ct"], output=tmp_path / "d.json", eval_fraction=0.25, num_val_cases=1)
    props = data["properties"]
    assert props["channels"] == 1 and props["normalization"] == "window" and len(props["labels"]) == 4
    values = []
    for item in data["training"]:  # fewer than 10000 foreground voxels a case: all of them
        image, label = (np.asanyarray(nib.load(sets["ct"] / item[k]).dataobj) for k in ("image", "label"))
        values.append(image[label > 0])
    lo, hi = np.percentile(np.concatenate(values), [0.5, 99.5])
    assert props["hu_min"] == pytest.approx(lo, abs=0.06) and props["hu_max"] == pytest.approx(hi, abs=0.06)
    assert -100 < props["hu_min"] < props["hu_max"] < 250  # the organs' HU, not air or fat
    # the CT demo is LPS: the spacing is in RAS order all the same, and positive
    assert all(v > 0 for v in props["pixdim"])


def test_given_settings_replace_the_derived_ones(sets, tmp_path):
    data = msd.prepare_datalist(
        sets["ct"],
        output=tmp_path / "d.json",
        hu_window=[-100, 240],
        pixdim=[2.0, 2.0, 3.0],
        roi_size=[64, 64, 32],
        check_files=False,
    )
    props = data["properties"]
    assert (props["hu_min"], props["hu_max"], props["pixdim"], props["roi_size"]) == (
        -100,
        240,
        [2.0, 2.0, 3.0],
        [64, 64, 32],
    )
    assert {props["derived"][k] for k in ("window", "pixdim", "roi_size")} == {"given"}
    data = msd.prepare_datalist(sets["ct"], output=tmp_path / "z.json", normalization="zscore")
    assert data["properties"]["normalization"] == "zscore" and data["properties"]["hu_min"] is None
    with pytest.raises(DatasetError, match="multiples of 16"):
        msd.prepare_datalist(sets["ct"], output=tmp_path / "bad.json", roi_size=[40, 40, 40])


def test_split_is_seeded_and_saved(sets, tmp_path):
    a = msd.prepare_datalist(sets["mr"], output=tmp_path / "a.json", seed=3, check_files=False)
    b = msd.prepare_datalist(sets["mr"], output=tmp_path / "b.json", seed=3, check_files=False)
    c = msd.prepare_datalist(sets["mr"], output=tmp_path / "c.json", seed=4, check_files=False)
    assert a == b and a["split"]["seed"] == 3 and json.loads((tmp_path / "a.json").read_text()) == a
    assert [a[k] for k in ("training", "validation", "evaluation")] != [
        c[k] for k in ("training", "validation", "evaluation")
    ]
    cases = [i["image"] for k in ("training", "validation", "evaluation") for i in a[k]]
    assert sorted(cases) == sorted(set(cases)) and len(cases) == 8


def test_every_bad_file_is_named(sets, tmp_path):
    root = copy(sets["mr"], tmp_path)
    names = sorted(p.name for p in (root / "imagesTr").glob("demo*"))
    (root / "imagesTr" / names[0]).unlink()  # missing image
    img = nib.load(root / "imagesTr" / names[1])  # one channel instead of two
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), root / "imagesTr" / names[1])
    lab = nib.load(root / "labelsTr" / names[2])  # label 3 where dataset.json lists 0..2
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, lab.affine), root / "labelsTr" / names[2])
    lab = nib.load(root / "labelsTr" / names[3])  # another grid
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:-1], lab.affine), root / "labelsTr" / names[3])
    (root / "labelsTr" / names[4]).write_bytes((root / "labelsTr" / names[4]).read_bytes()[:200])  # truncated
    with pytest.raises(DatasetError) as raised:
        msd.prepare_datalist(root)
    message = str(raised.value)
    assert "5 problem(s)" in message, message
    assert f"{names[0]}: missing" in message
    assert f"{names[1]}: expected a 4-D image with 2 channels" in message
    assert "found [3]" in message and names[2] in message
    assert "differs from the image's spatial shape" in message and names[3] in message
    assert names[4] in message and "corrupt or truncated" in message
    assert not (root / "datalist.json").exists()


def test_bad_dataset_json_is_explained(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        msd.prepare_datalist(tmp_path / "nope")
    (tmp_path / "Task09_Spleen").mkdir()
    (tmp_path / "Task09_Spleen" / "dataset.json").write_text("{}")
    with pytest.raises(DatasetError, match="Pass its subfolder Task09_Spleen"):
        msd.prepare_datalist(tmp_path)
    with pytest.raises(DatasetError, match="not a valid MSD dataset.json"):
        msd.prepare_datalist(tmp_path / "Task09_Spleen")
    (tmp_path / "Task09_Spleen" / "dataset.json").write_text(
        json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": []})
    )
    with pytest.raises(DatasetError, match="background"):
        msd.prepare_datalist(tmp_path / "Task09_Spleen")


def test_properties_reader_names_the_prepare_tool(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/prepare.py msd"):
        msd.dataset_properties(tmp_path / "datalist.json")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatasetError, match="no 'properties' block"):
        msd.dataset_properties(tmp_path / "datalist.json")


def test_intensity_follows_the_normalisation():
    import torch

    x = {"image": torch.tensor([[[[0.0, 50.0, 100.0, 400.0]]]])}
    np.testing.assert_allclose(intensity("window", 0, 200)(dict(x))["image"].flatten(), [0, 0.25, 0.5, 1.0])
    z = intensity("zscore")(dict(x))["image"].flatten()
    assert z[0] == 0 and abs(float(z[1:].mean())) < 1e-6  # zeros stay zero, the rest has zero mean
    with pytest.raises(ValueError, match="hu_min < hu_max"):
        intensity("window", None, None)
    with pytest.raises(ValueError, match="window"):
        intensity("minmax")


def test_prepare_tool_dispatches_msd(sets, tmp_path):
    import subprocess
    import sys

    from bundle_runner import REPO

    out = tmp_path / "d.json"
    proc = subprocess.run(
        [sys.executable, "tools/prepare.py", "msd", str(sets["ct"]), "--output", str(out), "--hu_window", "[-50,200]"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    props = json.loads(out.read_text())["properties"]
    assert (props["hu_min"], props["hu_max"]) == (-50, 200)
