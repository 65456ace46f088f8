"""BTCV datalist preparation on synthetic data in the download layout, and its error reports."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from selfmedmae_components.data import btcv
from selfmedmae_components.data.common import DatasetError
from selfmedmae_components.data.demo import btcv as btcv_demo


def _case(item: dict) -> int:
    return int(Path(item["image"]).name[3:7])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return Path(btcv_demo.make_demo(tmp_path_factory.mktemp("btcv") / "btcv", num_test_cases=2, shape=(32, 32, 12)))


@pytest.fixture
def demo_copy(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "btcv"))


def test_demo_layout_and_types(demo):
    assert len(list((demo / "RawData/Training/img").glob("img*.nii.gz"))) == 30
    assert len(list((demo / "RawData/Training/label").glob("label*.nii.gz"))) == 30
    assert sorted(p.name for p in (demo / "RawData/Testing/img").iterdir()) == ["img0061.nii.gz", "img0062.nii.gz"]
    img, lab = nib.load(demo / btcv.image_path(1)), nib.load(demo / btcv.label_path(1))
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, lab.affine)


def test_synthetic_ct_anatomy():
    """At the default shape every organ is present, HU are CT-like and the spacing anisotropic."""
    image, label, affine = btcv_demo.synthetic_ct(np.random.default_rng(3))
    assert image.shape == label.shape == (128, 128, 48)
    assert set(np.unique(label)) == set(range(14))
    assert image.min() <= -990 and image.max() >= 400  # air and bone
    spacing = np.abs(np.diag(affine)[:3])
    assert 2.5 <= spacing[0] == spacing[1] <= 3.2 and 4.0 <= spacing[2] <= 5.0
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    world = lambda value: affine[:3, :3] @ np.argwhere(label == value).mean(0) + affine[:3, 3]  # noqa: E731
    assert world(6)[0] > world(1)[0]  # liver on the patient's right (RAS +x), spleen on the left
    assert np.median(image[label == 6]) > np.median(image[label == 4])  # liver brighter than bile


def test_prepare_paper_split(demo, tmp_path):
    out = tmp_path / "datalist.json"
    d = btcv.prepare_datalist(demo, output=out, num_val_cases=3, seed=1)
    assert json.loads(out.read_text()) == d
    train, val = [_case(i) for i in d["training"]], [_case(i) for i in d["validation"]]
    assert len(val) == 3 and not set(train) & set(val)
    assert sorted(train + val) == sorted(btcv.TRAIN_CASES)
    assert [_case(i) for i in d["evaluation"]] == list(btcv.EVAL_CASES)
    assert d["test"] == [{"image": btcv.testing_image_path(61)}, {"image": btcv.testing_image_path(62)}]
    assert d["labels"]["6"] == "liver" and d["split"]["seed"] == 1
    assert btcv.prepare_datalist(demo, output=tmp_path / "again.json", num_val_cases=3, seed=1) == d
    for key in ("training", "validation", "evaluation", "test"):
        for item in load_decathlon_datalist(out, data_list_key=key, base_dir=demo):
            assert all(Path(p).is_file() for p in item.values())


def test_default_output_next_to_data(demo_copy):
    btcv.prepare_datalist(str(demo_copy))
    assert (demo_copy / "datalist.json").is_file()


def test_wrong_dataset_path(tmp_path, demo):
    with pytest.raises(DatasetError, match="does not exist") as err:
        btcv.prepare_datalist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "RawData/Training/img" in str(err.value)
    with pytest.raises(DatasetError, match="pass its parent"):
        btcv.prepare_datalist(demo / "RawData")


def test_bad_files_all_reported(demo_copy):
    (demo_copy / btcv.label_path(5)).unlink()
    data = (demo_copy / btcv.image_path(6)).read_bytes()
    (demo_copy / btcv.image_path(6)).write_bytes(data[: len(data) // 2])  # truncated download
    lab = nib.load(demo_copy / btcv.label_path(7))
    bad = np.asarray(lab.dataobj).copy()
    bad[0, 0, 0] = 14
    nib.save(nib.Nifti1Image(bad, lab.affine), demo_copy / btcv.label_path(7))
    nib.save(nib.Nifti1Image(bad[:-1], lab.affine), demo_copy / btcv.label_path(9))  # other shape
    shifted = lab.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), shifted), demo_copy / btcv.label_path(10))

    with pytest.raises(DatasetError) as err:
        btcv.prepare_datalist(demo_copy)
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert f"{demo_copy / btcv.label_path(5)}: missing" in msg
    assert f"{demo_copy / btcv.image_path(6)}: corrupt or truncated" in msg
    assert f"{demo_copy / btcv.label_path(7)}: label values must be integers 0..13, found [14]" in msg
    assert f"{demo_copy / btcv.label_path(9)}: label shape (31, 32, 12) differs" in msg
    assert f"{demo_copy / btcv.label_path(10)}: label affine differs" in msg
    assert not (demo_copy / "datalist.json").exists()
    # existence-only mode still catches the missing file
    with pytest.raises(DatasetError, match="label0005.nii.gz: missing"):
        btcv.prepare_datalist(demo_copy, check_files=False)


def test_not_a_nifti(demo_copy):
    (demo_copy / btcv.image_path(40)).write_bytes(b"<html>Synapse login</html>")
    with pytest.raises(DatasetError, match=r"img0040.nii.gz: (cannot be read|corrupt)"):
        btcv.prepare_datalist(demo_copy)


def test_bad_num_val_cases(demo):
    with pytest.raises(DatasetError, match="num_val_cases"):
        btcv.prepare_datalist(demo, num_val_cases=18)
