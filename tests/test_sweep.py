"""tools/sweep.py end to end: a 2 x 1 grid (two mask ratios, one epoch budget) of tiny btcv_seg configs,
through `python -m monai.bundle run pretrain/finetune/evaluate`, writes the CSV, the table and the plot."""

import csv
import json
import sys
from pathlib import Path

from PIL import Image

from selfmedmae_components.data import btcv
from selfmedmae_components.data.demo import btcv as btcv_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import sweep  # noqa: E402


def test_sweep_2x1_grid_writes_csv_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the bundle subprocesses: far faster than 2 threads on a shared CPU
    data = tmp_path / "btcv"
    data.mkdir()
    btcv_demo.make_demo(data, num_test_cases=0, shape=(64, 64, 24))
    btcv.prepare_datalist(data)
    datalist = json.loads((data / "datalist.json").read_text())
    datalist.update(
        training=datalist["training"][:2], validation=datalist["validation"][:1], evaluation=datalist["evaluation"][:1]
    )
    (data / "datalist_tiny.json").write_text(json.dumps(datalist))
    out = tmp_path / "sweep"
    overrides = [
        "roi_size=[32,32,32]",
        "pixdim=[8.0,8.0,8.0]",
        "hidden_size=48",
        "num_workers=0",
        "batch_size=1",
        f"datalist_file={data / 'datalist_tiny.json'}",
        "pretrain:decoder_hidden_size=48",
        "finetune:max_epochs=1",
        "finetune:validation_mode=none",
    ]
    sweep.main(
        [
            "--bundle",
            "btcv_seg",
            "--mask_ratios",
            "0.25,0.75",
            "--pretrain_epochs",
            "1",
            "--dataset_dir",
            str(data),
            "--out",
            str(out),
            "--preset",
            "demo",
            "--override",
            *overrides,
        ]
    )

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["mask_ratio"], r["pretrain_epochs"]) for r in rows] == [("0.25", "1"), ("0.75", "1")]
    for r in rows:
        assert 0.0 <= float(r["dice:8 organs (paper)"]) <= 1.0 and "hd95:13 organs" in r
    for ratio in ("0.25", "0.75"):  # each cell pre-trained with its own mask ratio, in its own bundle_root
        cell = out / "cells" / f"mask{ratio}_ep1"
        assert (cell / "models/mae_pretrain.pt").is_file() and (cell / "eval/summary.json").is_file()
        assert f"--mask_ratio {ratio}" in (cell / "sweep.log").read_text()
    table = (out / "results.md").read_text().splitlines()
    assert table[4].startswith("| bundle | mask_ratio | pretrain_epochs | dice:8 organs (paper)") and len(table) == 8
    img = Image.open(out / "results.png")
    assert img.format == "PNG" and img.size == (640, 440)
    # a second call finds the cells evaluated with the same commands and only rewrites the results
    (out / "results.csv").unlink()
    sweep.main(
        [
            "--bundle",
            "btcv_seg",
            "--mask_ratios",
            "0.25,0.75",
            "--pretrain_epochs",
            "1",
            "--dataset_dir",
            str(data),
            "--out",
            str(out),
            "--preset",
            "demo",
            "--override",
            *overrides,
        ]
    )
    assert (out / "results.csv").is_file()


def test_override_syntax():
    per_stage = sweep.parse_overrides(["hidden_size=48", "finetune:max_epochs=3"])
    assert per_stage["pretrain"] == {"hidden_size": "48"} and per_stage["finetune"] == {
        "hidden_size": "48",
        "max_epochs": "3",
    }
