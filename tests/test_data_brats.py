"""MSD Task01_BrainTumour datalist preparation on synthetic data in the download layout."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from selfmedmae_components.data import brats
from selfmedmae_components.data.common import DatasetError
from selfmedmae_components.data.demo import brats as brats_demo

NUM_CASES = 10


def _names(items: list) -> set:
    return {Path(i["image"]).name for i in items}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msd")
    return Path(brats_demo.make_demo(out, num_cases=NUM_CASES, num_test_cases=1, shape=(24, 24, 16)))


@pytest.fixture
def demo_copy(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "Task01_BrainTumour"))


def test_demo_layout(demo):
    meta = json.loads((demo / "dataset.json").read_text())
    assert meta["name"] == "BRATS" and meta["tensorImageSize"] == "4D" and meta["numTraining"] == NUM_CASES
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    assert meta["test"] == ["./imagesTs/BRATS_485.nii.gz"]
    assert (demo / "imagesTr/._BRATS_001.nii.gz").is_file() and (demo / "labelsTr/._BRATS_001.nii.gz").is_file()
    img, lab = nib.load(demo / "imagesTr/BRATS_001.nii.gz"), nib.load(demo / "labelsTr/BRATS_001.nii.gz")
    assert img.shape == (24, 24, 16, 4) and img.get_data_dtype() == np.float32
    assert lab.shape == (24, 24, 16) and lab.get_data_dtype() == np.uint8


def test_synthetic_brain_contrast():
    """Tumour parts look as in glioma MRI, background is exactly 0, voxels 3 mm at the default shape."""
    image, label, affine = brats_demo.synthetic_brain(np.random.default_rng(7))
    assert image.shape == (64, 64, 48, 4) and set(np.unique(label)) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.diag(affine)[:3], 3.0)
    flair, t1gd = image[..., 0], image[..., 2]
    assert np.median(t1gd[label == 3]) > 1.3 * np.median(t1gd[label == 1])  # enhancing rim on T1gd
    assert np.median(flair[label == 1]) > 1.3 * np.median(flair[(label == 0) & (flair > 0)])  # edema on FLAIR
    assert image[0, 0, 0].tolist() == [0, 0, 0, 0]
    _, _, _ = brats_demo.synthetic_brain(np.random.default_rng(7), (32, 32, 24), skull_stripped=False)


def test_prepare_split(demo, tmp_path):
    out = tmp_path / "datalist.json"
    d = brats.prepare_datalist(demo, output=out)
    assert json.loads(out.read_text()) == d
    train, val, ev = _names(d["training"]), _names(d["validation"]), _names(d["evaluation"])
    assert (len(train), len(val), len(ev)) == (7, 1, 2)  # 80/20, validation 10% of the training part
    assert not (train & val or train & ev or val & ev)
    assert train | val | ev == {f"BRATS_{i:03d}.nii.gz" for i in range(1, NUM_CASES + 1)}
    assert d["split"]["seed"] == 12345 and d["test"] == [{"image": "imagesTs/BRATS_485.nii.gz"}]
    for key in ("training", "validation", "evaluation", "test"):
        for item in load_decathlon_datalist(out, data_list_key=key, base_dir=demo):
            assert all(Path(p).is_file() and not Path(p).name.startswith("._") for p in item.values())
    # determinism: same seed, same split; another seed, another split
    assert brats.prepare_datalist(demo, output=tmp_path / "again.json") == d
    other = brats.prepare_datalist(demo, output=tmp_path / "other.json", seed=2)
    assert (_names(other["evaluation"]), _names(other["validation"])) != (ev, val)
    assert len(brats.prepare_datalist(demo, output=tmp_path / "v2.json", num_val_cases=2)["validation"]) == 2


def test_resource_forks_listed_in_dataset_json_are_skipped(demo_copy):
    meta = json.loads((demo_copy / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/._BRATS_001.nii.gz", "label": "./labelsTr/._BRATS_001.nii.gz"})
    (demo_copy / "dataset.json").write_text(json.dumps(meta))
    d = brats.prepare_datalist(str(demo_copy))
    assert len(d["training"] + d["validation"] + d["evaluation"]) == NUM_CASES
    assert (demo_copy / "datalist.json").is_file()


def test_wrong_dataset_path(demo, tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as err:
        brats.prepare_datalist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(DatasetError, match="Pass its Task01_BrainTumour subfolder"):
        brats.prepare_datalist(demo.parent)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/dataset.json").write_text('{"training": [{"img": "x"}]}')
    with pytest.raises(DatasetError, match="not a valid MSD dataset.json"):
        brats.prepare_datalist(tmp_path / "bad")


def test_bad_files_all_reported(demo_copy):
    (demo_copy / "labelsTr/BRATS_002.nii.gz").unlink()
    data = (demo_copy / "imagesTr/BRATS_003.nii.gz").read_bytes()
    (demo_copy / "imagesTr/BRATS_003.nii.gz").write_bytes(data[: len(data) // 2])
    img = nib.load(demo_copy / "imagesTr/BRATS_004.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :3], img.affine), demo_copy / "imagesTr/BRATS_004.nii.gz")
    lab = nib.load(demo_copy / "labelsTr/BRATS_005.nii.gz")
    challenge = np.asarray(lab.dataobj).copy()
    challenge[challenge == 3] = 4  # BraTS challenge numbering
    nib.save(nib.Nifti1Image(challenge, lab.affine), demo_copy / "labelsTr/BRATS_005.nii.gz")
    nib.save(nib.Nifti1Image(challenge[:, :-2], lab.affine), demo_copy / "labelsTr/BRATS_006.nii.gz")

    with pytest.raises(DatasetError) as err:
        brats.prepare_datalist(demo_copy)
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert f"{demo_copy / 'labelsTr/BRATS_002.nii.gz'}: missing" in msg
    assert f"{demo_copy / 'imagesTr/BRATS_003.nii.gz'}: corrupt or truncated" in msg
    assert f"{demo_copy / 'imagesTr/BRATS_004.nii.gz'}: expected a 4-D image with 4 channels" in msg
    assert "got shape (24, 24, 16, 3)" in msg
    assert f"{demo_copy / 'labelsTr/BRATS_005.nii.gz'}: label values must be integers 0..3, found [4]" in msg
    assert "BraTS challenge labels (4 = enhancing) -- MSD uses 3" in msg
    assert f"{demo_copy / 'labelsTr/BRATS_006.nii.gz'}: label shape (24, 22, 16) differs" in msg
    assert "._BRATS" not in msg and not (demo_copy / "datalist.json").exists()


def test_bad_split_arguments(demo):
    with pytest.raises(DatasetError, match="eval_fraction"):
        brats.prepare_datalist(demo, eval_fraction=1.0)
    with pytest.raises(DatasetError, match="too few"):
        brats.prepare_datalist(demo, num_val_cases=8)
