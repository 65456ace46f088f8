"""Segmentation metrics in millimetres and a per-case report with class names.

MONAI's Ignite HausdorffDistance handler cannot pass the voxel spacing, so its HD95 is in voxels;
``HausdorffDistance95mm`` reads each case's spacing from its MetaTensor. ``SegmentationReport``
writes the per-case Dice / HD95 table (CSV, named classes) and the averages over class groups
(for BTCV: the paper's 8 organs and all 13).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import HausdorffDistanceMetric
from monai.utils import optional_import

from .io import write_json_atomic, write_text_atomic

HAS_CUCIM = optional_import("cucim")[1]  # MONAI's distance transform runs on the GPU with it


class HausdorffDistanceMMMetric(HausdorffDistanceMetric):
    """HausdorffDistanceMetric that takes each case's voxel spacing from ``y.pixdim`` (a MetaTensor).

    Read per call of ``_compute_tensor``, where both of MONAI's input forms arrive: a list of cases (one call
    each) and a batch, which is how Ignite 0.5 hands the evaluators' per-case lists over (it unrolls them into
    one-case batches, so a spacing read only for lists was never used: the handler gave voxels).
    Computed on the CPU unless cuCIM is installed: without it, MONAI's distance transform of a GPU tensor
    is scipy's on a host copy, with more copies back and forth per class; one copy of each case up front
    is cheaper.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("spacing") is None and isinstance(y, MetaTensor):
            pixdim = y.pixdim  # one case: its spacing; a collated batch: a list of them
            kwargs["spacing"] = [p.tolist() for p in pixdim] if isinstance(pixdim, list) else pixdim.tolist()
        if not HAS_CUCIM:
            y_pred, y = y_pred.cpu(), y.cpu()
        with warnings.catch_warnings():  # empty classes give NaN / inf on purpose; SegmentationReport handles them
            warnings.filterwarnings("ignore", message=".*is all 0, this may result in nan/inf distance")
            return super()._compute_tensor(y_pred.detach(), y.detach(), **kwargs)


class HausdorffDistance95mm(IgniteMetricHandler):
    """Ignite handler: 95th-percentile Hausdorff distance in millimetres, background excluded."""

    def __init__(
        self, include_background: bool = False, output_transform: Any = lambda x: x, save_details: bool = True
    ):
        metric = HausdorffDistanceMMMetric(include_background=include_background, percentile=95, reduction="mean")
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class SegmentationReport:
    """At the end of an evaluation, writes ``per_case.csv`` (one row per case, Dice and HD95 per
    named class) and ``summary.json`` / ``summary.md`` (means per class and per class group), and
    prints the summary table.

    Dice as in the original SelfMedMAE code: per class per case, classes absent from the ground truth ignored (NaN),
    then averaged over classes and cases. HD95 cases where a class is missed entirely (infinite
    distance) are counted and left out of the mean.

    Args:
        output_dir: folder for the report files.
        class_names: names of the foreground classes, in channel order (background excluded).
        groups: {group name: class names} to average over, e.g. the paper's 8 organs.
        dice_name, hd95_name: the evaluator's metric names whose details are read.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        groups: dict[str, Sequence[str]] | None = None,
        dice_name: str = "dice",
        hd95_name: str = "hd95",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.groups = dict(groups or {"all": self.class_names})
        self.dice_name, self.hd95_name = dice_name, hd95_name
        self._cases: list[str] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.COMPLETED, self)

    def _collect_names(self, engine: Engine) -> None:
        for item in engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]:
            image, number = item["image"], f"case{len(self._cases)}"  # a case without a file name: its number
            name = image.meta.get("filename_or_obj", number) if isinstance(image, MetaTensor) else number
            self._cases.append(Path(str(name)).name or number)

    def __call__(self, engine: Engine) -> None:
        details = engine.state.metric_details
        tables = {
            m: details[n].float().cpu().tolist()
            for m, n in (("dice", self.dice_name), ("hd95", self.hd95_name))
            if n in details
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "per_case.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case"] + [f"{m}_{c}" for m in tables for c in self.class_names])
            for i, case in enumerate(self._cases):
                w.writerow([case] + [f"{tables[m][i][j]:.4f}" for m in tables for j in range(len(self.class_names))])
        per_class = {
            m: {c: _finite_mean([row[j] for row in rows]) for j, c in enumerate(self.class_names)}
            for m, rows in tables.items()
        }
        self.summary = {"num_cases": len(self._cases), "per_class": per_class, "groups": {}}
        for g, names in self.groups.items():
            idx = [self.class_names.index(n) for n in names]
            self.summary["groups"][g] = {
                m: _finite_mean([rows[i][j] for i in range(len(rows)) for j in idx]) for m, rows in tables.items()
            }
            if "hd95" in tables:
                self.summary["groups"][g]["hd95_missed"] = sum(
                    math.isinf(tables["hd95"][i][j]) for i in range(len(self._cases)) for j in idx
                )
        write_json_atomic(self.summary, self.output_dir / "summary.json")
        text = self.markdown()
        write_text_atomic(text, self.output_dir / "summary.md")
        print(text, flush=True)

    def markdown(self) -> str:
        metrics = list(self.summary["per_class"])
        lines = [f"Evaluation on {self.summary['num_cases']} cases (Dice in %, HD95 in mm)", ""]
        lines += ["| class | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        fmt = {"dice": lambda v: f"{100 * v:.2f}", "hd95": lambda v: f"{v:.2f}"}
        for g, vals in self.summary["groups"].items():
            lines.append(f"| **mean, {g}** | " + " | ".join(fmt[m](vals[m]) for m in metrics) + " |")
        for c in self.class_names:
            lines.append(f"| {c} | " + " | ".join(fmt[m](self.summary["per_class"][m][c]) for m in metrics) + " |")
        return "\n".join(lines) + "\n"
