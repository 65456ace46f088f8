"""ChestX-ray14 datalist preparation on demo data in the NIH layout, and its error messages."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from selfmedmae_components.data.common import DatasetError, progress
from selfmedmae_components.data.cxr14 import CLASSES, parse_findings, prepare_datalist, split_by_patient
from selfmedmae_components.data.demo.cxr14 import make_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("cxr14") / "demo", num_images=80, image_size=64, seed=0)


@pytest.fixture
def copy(demo, tmp_path) -> Path:
    """A private copy of the demo that a test may damage."""
    return Path(shutil.copytree(demo, tmp_path / "demo"))


def _csv_rows(root: Path) -> dict[str, dict]:
    with open(root / "Data_Entry_2017.csv", newline="") as f:
        return {r["Image Index"]: r for r in csv.DictReader(f)}


def _names(path: Path) -> list[str]:
    return path.read_text().split()


def test_parse_findings():
    assert parse_findings("No Finding") == [0.0] * 14
    hot = parse_findings("Cardiomegaly|Effusion")
    assert [CLASSES[i] for i, v in enumerate(hot) if v] == ["Cardiomegaly", "Effusion"] and sum(hot) == 2
    assert parse_findings(" Hernia ")[13] == 1.0
    with pytest.raises(DatasetError, match="Pneumonitis"):
        parse_findings("Mass|Pneumonitis")
    for bad in ("", "No Finding|Mass", "Mass||Nodule"):
        with pytest.raises(DatasetError):
            parse_findings(bad)


def test_demo_layout(demo):
    assert (demo / "Data_Entry_2017.csv").read_text().splitlines()[0] == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    rows = _csv_rows(demo)
    train_val, test = _names(demo / "train_val_list.txt"), _names(demo / "test_list.txt")
    assert sorted(train_val + test) == sorted(rows) and len(rows) == 80
    patients = lambda names: {rows[n]["Patient ID"] for n in names}  # noqa: E731
    assert not patients(train_val) & patients(test)  # the official split is patient-wise
    for names in (train_val, test):  # every class in both splits
        assert np.sum([parse_findings(rows[n]["Finding Labels"]) for n in names], axis=0).min() >= 1
    no_finding = sum(r["Finding Labels"] == "No Finding" for r in rows.values()) / len(rows)
    assert 0.15 < no_finding < 0.6
    modes = {Image.open(p).mode for p in (demo / "images").iterdir()}
    assert modes == {"L", "RGB", "RGBA"}
    assert Image.open(next((demo / "images").iterdir())).size == (64, 64)
    again = make_demo(demo.parent / "again", num_images=80, image_size=64, seed=0)
    assert (again / "Data_Entry_2017.csv").read_bytes() == (demo / "Data_Entry_2017.csv").read_bytes()
    name = train_val[0]
    assert (again / "images" / name).read_bytes() == (demo / "images" / name).read_bytes()


def test_prepare_on_demo(copy, capsys):
    datalist = prepare_datalist(copy)  # decodes every image, RGB and RGBA included
    out, err = capsys.readouterr()
    assert "validation" in out and "Decoding the" in err  # says what it does before the minutes on 112k images
    assert json.loads((copy / "datalist.json").read_text()) == datalist
    assert datalist["labels"]["classes"] == list(CLASSES)
    rows = _csv_rows(copy)
    name = lambda item: Path(item["image"]).name  # noqa: E731
    # evaluation is exactly the official test list; training + validation exactly train_val
    assert [name(i) for i in datalist["evaluation"]] == _names(copy / "test_list.txt")
    train, val = ([name(i) for i in datalist[k]] for k in ("training", "validation"))
    assert sorted(train + val) == sorted(_names(copy / "train_val_list.txt"))
    assert val and not {rows[n]["Patient ID"] for n in train} & {rows[n]["Patient ID"] for n in val}
    # multi-hot labels follow the CSV
    for item in datalist["training"][:5] + datalist["evaluation"][:5]:
        findings = rows[name(item)]["Finding Labels"]
        expected = set() if findings == "No Finding" else set(findings.split("|"))
        assert {c for c, v in zip(CLASSES, item["label"]) if v == 1.0} == expected and len(item["label"]) == 14
    # MONAI reads it, with paths relative to the dataset folder
    items = load_decathlon_datalist(str(copy / "datalist.json"), data_list_key="validation", base_dir=str(copy))
    assert all(Path(i["image"]).is_file() for i in items)
    # seeded: same seed same split, another seed another split; no validation when asked
    out = copy / "other.json"
    assert prepare_datalist(copy, output=out, check_images=False)["validation"] == datalist["validation"]
    assert prepare_datalist(copy, output=out, seed=1, check_images=False)["validation"] != datalist["validation"]
    assert prepare_datalist(copy, output=out, val_fraction=0, check_images=False)["validation"] == []


def test_progress_lines():
    lines = io.StringIO()
    assert list(progress(range(4), 4, "Checking 4 files", every_s=0, stream=lines)) == [0, 1, 2, 3]
    assert lines.getvalue().splitlines() == [
        "Checking 4 files ...",
        "  1/4 (25%), 0:00 so far",
        "  2/4 (50%), 0:00 so far",
        "  3/4 (75%), 0:00 so far",
        "  4/4 done in 0:00",
    ]
    quiet = io.StringIO()  # a quick check: one line
    assert list(progress(range(4), 4, "Checking 4 files", stream=quiet)) == [0, 1, 2, 3]
    assert quiet.getvalue() == "Checking 4 files ...\n"


def test_split_by_patient_covers_classes():
    names = [f"{p}_{k}" for p in range(20) for k in range(3)]
    patients = {n: n.split("_")[0] for n in names}
    labels = {n: [0.0] * 14 for n in names}
    labels["7_1"][13] = labels["12_0"][13] = 1.0  # a rare class held by two patients
    train, val = split_by_patient(names, patients, labels, val_fraction=0.1, seed=0)
    assert sorted(train + val) == sorted(names) and len(val) == 6
    assert not {patients[n] for n in train} & {patients[n] for n in val}
    assert any(labels[n][13] for n in val) and any(labels[n][13] for n in train)


def test_kaggle_image_folders(copy):
    (copy / "images_001").mkdir()
    shutil.move(str(copy / "images"), str(copy / "images_001" / "images"))
    datalist = prepare_datalist(copy, check_images=False)
    assert datalist["training"][0]["image"].startswith("images_001/images/")


def test_cli(copy):
    out = copy / "cli.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "prepare.py"),
            "cxr14",
            "--dataset_dir",
            str(copy),
            "--output",
            str(out),
            "--check_images",
            "False",
        ],
        check=True,
        capture_output=True,
    )
    assert len(json.loads(out.read_text())["evaluation"]) == len(_names(copy / "test_list.txt"))


def test_missing_dataset_dir(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*images/\*\.png.*Data_Entry_2017\.csv"):
        prepare_datalist(tmp_path / "nowhere")


def test_missing_images(copy):
    names = sorted((copy / "images").iterdir())
    names[3].unlink()
    with pytest.raises(DatasetError, match=rf"1 listed image.*{names[3].name}"):
        prepare_datalist(copy, check_images=False)
    for p in names[4:20]:
        p.unlink()
    with pytest.raises(DatasetError, match=r"17 listed image.*and 7 more"):
        prepare_datalist(copy, check_images=False)


def test_corrupt_png(copy):
    bad = sorted((copy / "images").iterdir())[5]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated download
    with pytest.raises(DatasetError, match=rf"cannot be decoded.*{bad.name}"):
        prepare_datalist(copy)
    prepare_datalist(copy, check_images=False)  # the fast path checks existence only


def test_bad_csv(copy):
    csv_path = copy / "Data_Entry_2017.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Patient ID", "Patient", 1))
    with pytest.raises(DatasetError, match=r"Data_Entry_2017\.csv lacks column.*Patient ID"):
        prepare_datalist(copy)
    lines = text.splitlines()
    first = lines[1].split(",")[0]
    csv_path.write_text("\n".join([lines[0], lines[1].replace(lines[1].split(",")[1], "Pneumonitis", 1)] + lines[2:]))
    with pytest.raises(DatasetError, match=rf"Data_Entry_2017\.csv, line 2 \({first}\).*Pneumonitis"):
        prepare_datalist(copy)
    csv_path.write_text("\n".join(lines[:1] + lines[2:]))  # a listed image absent from the CSV
    with pytest.raises(DatasetError, match=rf"_list\.txt names 1 image.*absent from Data_Entry_2017\.csv: {first}"):
        prepare_datalist(copy)
    csv_path.unlink()
    with pytest.raises(DatasetError, match=r"Data_Entry_2017\.csv"):
        prepare_datalist(copy)
