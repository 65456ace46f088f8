"""Classification pieces of the cxr14_cls bundle: AUC over present classes, the evaluation report,
the probability CSV, inference input discovery, and RandAugment."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.metrics import compute_roc_auc
from PIL import Image

from selfmedmae_components.classification import (
    ABSENT,
    ClassificationReport,
    MeanROCAUC,
    ProbabilityCSVWriter,
    class_names_from_metadata,
    find_images,
    mean_auc,
    per_class_auc,
)
from selfmedmae_components.config_helpers import existing_files
from selfmedmae_components.data.cxr14 import CLASSES
from selfmedmae_components.transforms.randaugment import OPS, RandAugmentd, apply_op

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cxr14_cls"


def _scores():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) < 0.4).astype(np.float32)
    labels[:, 2] = 0  # class 2: no positive case
    probs = np.clip(labels * 0.3 + rng.random((40, 3)) * 0.7, 0, 1).astype(np.float32)
    return torch.from_numpy(probs), torch.from_numpy(labels)


def test_absent_class_is_excluded_from_the_mean_not_scored():
    probs, labels = _scores()
    aucs = per_class_auc(probs, labels)
    assert aucs[2] is None
    for k in (0, 1):  # each present class is MONAI's own AUC
        assert aucs[k] == pytest.approx(float(compute_roc_auc(probs[:, k], labels[:, k])))
    assert mean_auc(aucs) == pytest.approx((aucs[0] + aucs[1]) / 2)
    labels[:, 1] = 1  # no negative case is absent too
    assert per_class_auc(probs, labels)[1] is None
    assert math.isnan(mean_auc([None, None]))
    with pytest.raises(ValueError, match="same shape"):
        per_class_auc(probs, labels[:, :2])


def test_metric_handler_and_report(tmp_path):
    probs, labels = _scores()
    names = ["a", "b", "c"]
    report = ClassificationReport(str(tmp_path / "eval"), names, paper={"paper mean": 0.815})
    metric = MeanROCAUC(output_transform=lambda out: ([o["pred"] for o in out], [o["label"] for o in out]))
    engine = Engine(lambda e, batch: batch)
    metric.attach(engine, "mean_auc")
    report.attach(engine)
    items = [
        {
            "pred": probs[i],
            "label": labels[i],
            "image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/x/img,{i}.png"}),
        }
        for i in range(len(probs))
    ]
    engine.run([items[:25], items[25:]], max_epochs=1)

    expected = mean_auc(per_class_auc(probs, labels))
    assert engine.state.metrics["mean_auc"] == pytest.approx(expected)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["mean_auc"] == pytest.approx(expected)
    assert summary["num_images"] == 40 and summary["num_classes_in_mean"] == 2
    assert summary["per_class"]["c"] == {"auc": ABSENT, "positives": 0}
    assert summary["absent_classes"] == ["c"]
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert f"| c | {ABSENT} | 0 |" in md and "paper mean" in md and f"{100 * expected:.2f}" in md
    with open(tmp_path / "eval" / "probabilities.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", *names] and len(rows) == 41
    assert rows[2][0] == "/x/img,1.png"  # a comma in the path is quoted
    assert [float(v) for v in rows[1][1:]] == pytest.approx(probs[0].tolist(), abs=1e-6)


def test_probability_writer_checks_the_class_count(tmp_path):
    writer = ProbabilityCSVWriter(str(tmp_path / "p.csv"), ["a", "b"])
    engine = Engine(lambda e, batch: batch)
    writer.attach(engine)
    with pytest.raises(ValueError, match="3 outputs per image but 2 class names"):
        engine.run([[{"pred": torch.zeros(3)}]], max_epochs=1)


def test_metadata_class_names_are_the_datasets():
    meta = BUNDLE / "configs" / "metadata.json"
    assert class_names_from_metadata(meta) == list(CLASSES)
    assert class_names_from_metadata(json.loads(meta.read_text())) == list(CLASSES)
    with pytest.raises(ValueError, match="channel_def"):
        class_names_from_metadata({})


def test_find_images_formats_and_errors(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.PNG")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "c.dcm").write_bytes(b"x")  # by suffix
    (tmp_path / "d").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 8)  # extension-less DICOM
    (tmp_path / "e").write_bytes(b"\0" * 200)  # extension-less, not DICOM
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    assert [Path(p).name for p in find_images(tmp_path)] == ["a.jpg", "b.PNG", "c.dcm", "d"]
    with pytest.raises(FileNotFoundError, match="Input folder not found"):
        find_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No chest X-ray images"):
        find_images(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        existing_files(
            [str(tmp_path / "a.jpg"), str(tmp_path / "missing.png")], "input_files", "PNG, JPEG or DICOM files"
        )
    with pytest.raises(FileNotFoundError, match="empty"):
        existing_files([], "input_files", "PNG, JPEG or DICOM files")


def test_randaugment_ops_keep_shape_range_and_type():
    img = MetaTensor(torch.rand(1, 32, 40), meta={"filename_or_obj": "x.png"})
    for name in OPS:
        for sign in (1.0, -1.0):
            out = apply_op(name, img, 9, sign)
            assert isinstance(out, MetaTensor) and out.shape == img.shape and out.dtype == torch.float32, name
            assert -1e-6 <= float(out.min()) and float(out.max()) <= 1 + 1e-6, name
    assert torch.allclose(apply_op("invert", img, 9), 1 - img)
    assert torch.allclose(apply_op("brightness", img, 0), img)  # magnitude 0 is the identity for enhancers
    rotated = apply_op("rotate", torch.zeros(1, 16, 16), 10, fill=0.5)
    assert rotated[0, 0, 0] == pytest.approx(0.5)  # the uncovered corner takes the fill value
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op("color", img, 9)


def test_randaugment_is_seeded_and_can_be_disabled():
    img = torch.rand(1, 32, 32)
    aug = lambda seed, **kw: RandAugmentd("image", **kw).set_random_state(seed)
    a, b = aug(0), aug(0)
    outs_a = [a({"image": img})["image"] for _ in range(5)]
    outs_b = [b({"image": img})["image"] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert any(not torch.equal(x, img) for x in outs_a)
    off = aug(0, num_ops=0)
    assert torch.equal(off({"image": img})["image"], img)
    with pytest.raises(ValueError, match="magnitude"):
        RandAugmentd("image", magnitude=12)


def reference_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney: the fraction of (positive, negative) pairs ranked right, ties counting half."""
    pos, neg = scores[positive == 1][:, None], scores[positive == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _auc_on_rank(rank: int, store: str, probs, labels, answers) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metric = MeanROCAUC(output_transform=lambda out: ([o["pred"] for o in out], [o["label"] for o in out]))
        engine = Engine(lambda e, batch: batch)
        metric.attach(engine, "mean_auc")
        mine = [{"pred": probs[i], "label": labels[i]} for i in range(rank, len(probs), 2)]  # each image to one rank
        engine.run([mine[:7], mine[7:]], max_epochs=1)
        answers.put((rank, engine.state.metrics["mean_auc"]))
    except Exception as e:
        answers.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def test_auc_over_two_processes_is_the_auc_of_all_predictions(tmp_path):
    """The cxr14 card's claim: validation gives each image to one of 2 processes (21 and 20 here) and the AUC is
    computed on the gathered probabilities, the AUC of all 41 in one process. The mean of the ranks' own AUCs
    differs from it on these scores (AUC ranks pairs across the shards), so a per-rank metric fails."""
    import multiprocessing

    rng = np.random.default_rng(3)
    labels = (rng.random((41, 3)) < 0.4).astype(np.float32)
    probs = np.clip(labels * 0.3 + rng.random((41, 3)) * 0.7, 0, 1).astype(np.float32)
    expected = np.mean([reference_auc(probs[:, k], labels[:, k]) for k in range(3)])
    per_rank = np.mean([reference_auc(probs[r::2, k], labels[r::2, k]) for r in (0, 1) for k in range(3)])
    assert abs(per_rank - expected) > 1e-3  # the scores tell the two apart
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    args = (str(tmp_path / "store"), torch.from_numpy(probs), torch.from_numpy(labels), answers)
    procs = [context.Process(target=_auc_on_rank, args=(rank, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = dict(answers.get(timeout=5) for _ in procs)
    assert got[0] == pytest.approx(expected, abs=1e-9) and got[1] == pytest.approx(expected, abs=1e-9), got
