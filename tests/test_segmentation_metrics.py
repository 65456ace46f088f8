"""HD95 in millimetres from each case's own spacing, and the evaluation report's averages (REFERENCE.md, section 4):
Dice per class per case, classes absent from the ground truth (NaN) left out, then the mean over the class-case
pairs of a group; HD95 cases where a class is missed (infinite) counted and left out of the mean."""

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from selfmedmae_components.metrics import HausdorffDistance95mm, HausdorffDistanceMMMetric, SegmentationReport


def one_voxel(position, spacing) -> MetaTensor:
    """(background, foreground) one-hot of an 8^3 grid whose foreground is the voxel at ``position``."""
    fg = torch.zeros(1, 8, 8, 8)
    fg[(0, *position)] = 1
    return MetaTensor(torch.cat([1 - fg, fg]), affine=torch.diag(torch.tensor([*spacing, 1.0])))


def test_hd95_is_in_millimetres_of_each_cases_spacing():
    """One foreground voxel in the prediction and one in the label, (2, 1, 0) voxels apart: the distance is the
    Euclidean one in mm, with the spacing of each case (two cases on different grids in one batch)."""
    metric = HausdorffDistanceMMMetric(include_background=False, percentile=95, reduction="mean")
    cases = [((3.0, 1.0, 1.0), (2, 2, 2), (4, 3, 2)), ((0.5, 2.0, 4.0), (1, 1, 1), (3, 2, 1))]
    preds = [one_voxel(p, s) for s, p, _ in cases]
    labels = [one_voxel(t, s) for s, _, t in cases]
    got = metric(preds, labels).squeeze(1).tolist()
    expected = [float(np.linalg.norm((np.subtract(t, p)) * np.array(s))) for s, p, t in cases]
    assert got == pytest.approx(expected, rel=1e-6)  # [sqrt(36 + 1), sqrt(1 + 4)]


def test_report_means_skip_absent_classes_and_count_misses(tmp_path):
    nan, inf = math.nan, math.inf
    dice = [[0.5, nan, 0.9], [1.0, 0.2, 0.0]]  # case 0 has no class b
    hd95 = [[inf, nan, 3.0], [4.0, 2.0, inf]]  # case 0 misses class a, case 1 class c
    report = SegmentationReport(str(tmp_path), ["a", "b", "c"], groups={"all": ["a", "b", "c"], "a, b": ["a", "b"]})
    details = {"dice": torch.tensor(dice), "hd95": torch.tensor(hd95)}
    engine = Engine(lambda e, batch: None)  # an evaluator whose metric handlers leave these details
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "metric_details", details))
    report.attach(engine)
    image = lambda i: MetaTensor(torch.zeros(1), meta={"filename_or_obj": f"/data/img{i}.nii.gz"})
    engine.run([[{"image": image(1)}], [{"image": image(2)}]], max_epochs=1)  # one case per batch, as decollated
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_cases"] == 2
    assert summary["per_class"]["dice"] == pytest.approx({"a": 0.75, "b": 0.2, "c": 0.45})
    assert summary["per_class"]["hd95"] == pytest.approx({"a": 4.0, "b": 2.0, "c": 3.0})
    assert summary["groups"]["all"] == pytest.approx({"dice": 2.6 / 5, "hd95": 9.0 / 3, "hd95_missed": 2})
    assert summary["groups"]["a, b"] == pytest.approx({"dice": 1.7 / 3, "hd95": 6.0 / 2, "hd95_missed": 1})
    with open(tmp_path / "per_case.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case", "dice_a", "dice_b", "dice_c", "hd95_a", "hd95_b", "hd95_c"]
    assert rows[1] == ["img1.nii.gz", "0.5000", "nan", "0.9000", "inf", "nan", "3.0000"]
    assert (tmp_path / "summary.md").read_text() == (
        "Evaluation on 2 cases (Dice in %, HD95 in mm)\n\n| class | dice | hd95 |\n|---|---|---|\n"
        "| **mean, all** | 52.00 | 3.00 |\n| **mean, a, b** | 56.67 | 3.00 |\n"
        "| a | 75.00 | 4.00 |\n| b | 20.00 | 2.00 |\n| c | 45.00 | 3.00 |\n"
    )


def reference_hd95(pred: np.ndarray, label: np.ndarray, spacing, q: float = 95) -> float:
    """Surface voxels (the mask minus its erosion), each one's nearest surface voxel of the other mask in mm, the
    q-th percentile of each direction, the larger of the two."""
    from scipy.ndimage import binary_erosion

    edges = [np.argwhere(m & ~binary_erosion(m)) * np.asarray(spacing) for m in (pred, label)]
    d = np.linalg.norm(edges[0][:, None] - edges[1][None], axis=-1)
    return max(np.percentile(d.min(1), q), np.percentile(d.min(0), q))


def test_hd95_handler_is_the_95th_percentile_of_foreground_surface_distances_in_mm():
    """The evaluators' handler on one case: foreground only, the 95th percentile (the 96th differs here), the mean
    over the batch, the per-case value kept for the report; plain tensors (no spacing) count in voxels."""
    pred, label = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    pred[2:7, 2:6, 3:7], label[3:9, 2:8, 3:5] = True, True
    spacing = (2.0, 1.0, 0.5)
    expected = reference_hd95(pred, label, spacing)
    assert abs(reference_hd95(pred, label, spacing, 96) - expected) > 0.01
    onehot = lambda m: torch.from_numpy(np.stack([~m, m])).float()  # noqa: E731
    case = {"pred": onehot(pred), "label": MetaTensor(onehot(label), affine=torch.diag(torch.tensor([*spacing, 1.0])))}
    engine = Engine(lambda e, batch: batch)
    HausdorffDistance95mm(output_transform=lambda out: ([o["pred"] for o in out], [o["label"] for o in out])).attach(
        engine, "hd95"
    )
    engine.run([[case]], max_epochs=1)
    assert engine.state.metrics["hd95"] == pytest.approx(expected, rel=1e-5)
    assert engine.state.metric_details["hd95"].shape == (1, 1)
    metric = HausdorffDistanceMMMetric(include_background=False, percentile=95)
    voxels = metric([onehot(pred)], [onehot(label)]).item()
    assert voxels == pytest.approx(reference_hd95(pred, label, (1, 1, 1)), rel=1e-5)


def test_report_defaults_and_output(tmp_path, capsys):
    """One group of all classes by default; a class absent from every case is NaN; the output folder is made with
    its parents; the table is printed."""
    report = SegmentationReport(str(tmp_path / "eval" / "run1"), ["a", "b"])
    engine = Engine(lambda e, batch: None)
    details = {"dice": torch.tensor([[0.5, math.nan]])}
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "metric_details", details))
    report.attach(engine)
    engine.run([{"image": MetaTensor(torch.zeros(1))}], max_epochs=1)  # a batch that is not a list
    engine.run([{"image": MetaTensor(torch.zeros(1))}], max_epochs=1)  # run again: the cases start afresh
    summary = json.loads((tmp_path / "eval" / "run1" / "summary.json").read_text())
    assert list(summary["groups"]) == ["all"] and math.isnan(summary["per_class"]["dice"]["b"])
    assert (tmp_path / "eval" / "run1" / "per_case.csv").read_text().splitlines()[1].startswith("case0,")
    assert capsys.readouterr().out.endswith((tmp_path / "eval" / "run1" / "summary.md").read_text() + "\n")


def test_hd95_of_a_collated_batch_and_of_a_given_spacing():
    """A batch collated by MONAI carries one spacing per case; a spacing the caller gives wins over the image's; an
    empty class is NaN without a warning."""
    from monai.data import list_data_collate

    cases = [((3.0, 1.0, 1.0), (2, 2, 2), (4, 3, 2)), ((0.5, 2.0, 4.0), (1, 1, 1), (3, 2, 1))]
    preds = torch.stack([one_voxel(p, s).as_tensor() for s, p, _ in cases])
    labels = list_data_collate([{"y": one_voxel(t, s)} for s, _, t in cases])["y"]
    metric = HausdorffDistanceMMMetric(include_background=False, percentile=95)
    assert metric(preds, labels).squeeze(1).tolist() == pytest.approx([math.sqrt(37), math.sqrt(5)], rel=1e-6)
    given = metric(list(preds), [one_voxel(t, s) for s, _, t in cases], spacing=[1.0, 1.0, 1.0])
    assert given.squeeze(1).tolist() == pytest.approx([math.sqrt(5), math.sqrt(5)], rel=1e-6)
    empty = one_voxel((0, 0, 0), (1.0, 1.0, 1.0))
    empty[1] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert math.isnan(metric([empty], [empty]).item())
    assert not [w for w in caught if "is all 0" in str(w.message)]


def test_report_names_each_case_by_its_file_or_else_its_number(tmp_path):
    report = SegmentationReport(str(tmp_path), ["a"])
    engine = Engine(lambda e, batch: None)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "metric_details", {"dice": torch.ones(4, 1)}))
    report.attach(engine)
    named = MetaTensor(torch.zeros(1), meta={"filename_or_obj": "/data/imagesTs/img0007.nii.gz"})
    batch = [
        {"image": named},
        {"image": torch.zeros(1)},
        {"image": MetaTensor(torch.zeros(1))},
        {"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": ""})},
    ]
    engine.run([batch], max_epochs=1)
    rows = (tmp_path / "per_case.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["img0007.nii.gz", "case1", "case2", "case3"]


def test_hd95_hides_only_the_empty_class_warning(monkeypatch):
    """Empty classes are NaN on purpose (the report counts them); any other warning of the computation shows."""
    import monai.metrics.hausdorff_distance as monai_hd

    original = monai_hd.compute_hausdorff_distance

    def warns_too(*args, **kwargs):
        warnings.warn("the spacing looks odd", UserWarning, stacklevel=2)
        return original(*args, **kwargs)

    monkeypatch.setattr(monai_hd, "compute_hausdorff_distance", warns_too)
    case = one_voxel((1, 1, 1), (1.0, 1.0, 1.0))
    # recorded, not pytest.warns: that would re-emit MONAI's own deprecation warnings of the computation past the
    # module-specific filters in setup.cfg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HausdorffDistanceMMMetric(include_background=False, percentile=95)([case], [case])
    assert any(issubclass(w.category, UserWarning) and "the spacing looks odd" in str(w.message) for w in caught)
