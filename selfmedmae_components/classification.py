"""Multi-label classification: ROC AUC over the classes present, an evaluation report, a
per-image probability CSV, and input discovery for chest X-ray inference.

MONAI's ``ROCAUCMetric`` returns NaN for a class with no positive (or no negative) case, so its
macro mean becomes NaN as soon as one class is absent (a rare class in a small validation set).
Here such classes are reported as ``n/a (absent)`` and left out of the mean, never counted as 0
or 0.5. Each per-class AUC is MONAI's own ``compute_roc_auc``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.metrics import ROCAUCMetric, compute_roc_auc

from .data.dicom import has_dicom_marker
from .io import write_json_atomic, write_text_atomic

__all__ = [
    "ABSENT",
    "IMAGE_SUFFIXES",
    "ClassificationReport",
    "MeanROCAUC",
    "PresentClassROCAUCMetric",
    "ProbabilityCSVWriter",
    "class_names_from_metadata",
    "find_images",
    "mean_auc",
    "per_class_auc",
]

ABSENT = "n/a (absent)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd")  # a radiograph as 3D Slicer saves it: one slice


# ------------------------------------------------------------------------------------ metric
def per_class_auc(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> list[float | None]:
    """ROC AUC of each column of (N, K) probabilities against (N, K) binary labels; ``None`` for a
    class with no positive or no negative case (its AUC is undefined)."""
    probs = torch.as_tensor(probs, dtype=torch.float64).detach().cpu()
    labels = torch.as_tensor(labels, dtype=torch.float64).detach().cpu()
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(
            f"expected probabilities and labels of the same shape (N, K), got "
            f"{tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    out: list[float | None] = []
    for k in range(probs.shape[1]):
        y = labels[:, k]
        if y.min() == y.max():
            out.append(None)
        else:
            out.append(float(compute_roc_auc(probs[:, k], y)))
    return out


def mean_auc(aucs: Sequence[float | None]) -> float:
    """Mean over the classes whose AUC is defined (NaN if none is)."""
    present = [a for a in aucs if a is not None]
    return sum(present) / len(present) if present else float("nan")


class PresentClassROCAUCMetric(ROCAUCMetric):
    """MONAI's ROCAUCMetric whose aggregate is the mean AUC over the classes present (see module)."""

    def aggregate(self, average: Any = None) -> float:  # noqa: ARG002 - always the mean over present classes
        y_pred, y = self.get_buffer()
        if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError("y_pred and y must be PyTorch Tensors.")
        return mean_auc(per_class_auc(y_pred.reshape(len(y_pred), -1), y.reshape(len(y), -1)))


class MeanROCAUC(IgniteMetricHandler):
    """Ignite handler: mean ROC AUC over the classes with positives and negatives (the key metric
    for checkpoint selection). Feed it probabilities (or logits: AUC is rank-based) and labels."""

    def __init__(self, output_transform: Any = lambda x: x) -> None:
        super().__init__(metric_fn=PresentClassROCAUCMetric(), output_transform=output_transform, save_details=False)


# ---------------------------------------------------------------------------- report and CSV
def _filename(image: Any, fallback: str) -> str:
    if isinstance(image, (str, os.PathLike)) and str(image):  # the name itself (inference postprocessing keeps only it)
        return str(image)
    if isinstance(image, MetaTensor):
        return str(image.meta.get("filename_or_obj", fallback))
    return fallback


class ProbabilityCSVWriter:
    """Collects the evaluator's per-image probabilities (``pred`` after the sigmoid) and writes
    ``output_file``: a header ``image,<class names>`` and one row per image, in loader order.

    Args:
        output_file: the CSV to write (atomically, at the end of the run).
        class_names: column names, in output-channel order.
        pred_key, image_key: keys of the decollated engine output.
    """

    def __init__(
        self, output_file: str, class_names: Sequence[str], pred_key: str = "pred", image_key: str = "image"
    ) -> None:
        self.output_file = Path(output_file)
        self.class_names = list(class_names)
        self.pred_key, self.image_key = pred_key, image_key
        self.names: list[str] = []
        self.probs: list[list[float]] = []
        self.labels: list[list[float] | None] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.names, self.probs, self.labels = [], [], []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            pred = torch.as_tensor(item[self.pred_key]).detach().float().cpu().reshape(-1)
            if len(pred) != len(self.class_names):
                raise ValueError(
                    f"the network gives {len(pred)} outputs per image but {len(self.class_names)} "
                    f"class names were given: {self.class_names}"
                )
            self.names.append(_filename(item.get(self.image_key), f"image{len(self.names)}"))
            self.probs.append(pred.tolist())
            label = item.get("label")
            self.labels.append(None if label is None else torch.as_tensor(label).float().cpu().reshape(-1).tolist())

    def __call__(self, engine: Engine) -> None:
        lines = [",".join(["image", *self.class_names])]
        lines += [",".join([_csv_cell(n)] + [f"{p:.6f}" for p in probs]) for n, probs in zip(self.names, self.probs)]
        write_text_atomic("\n".join(lines) + "\n", self.output_file)
        print(f"Probabilities of {len(self.names)} image(s) written to {self.output_file}", flush=True)


def _csv_cell(text: str) -> str:
    if any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class ClassificationReport(ProbabilityCSVWriter):
    """At the end of an evaluation, writes ``probabilities.csv`` (image + one column per class),
    ``summary.json`` and ``summary.md`` (per-class ROC AUC, positives, mean AUC) into
    ``output_dir`` and prints the table. A class without positives (or negatives) in the evaluated
    images is reported as ``n/a (absent)`` and excluded from the mean.

    Args:
        output_dir: folder for the report files.
        class_names: class names in output-channel order.
        paper: optional {row name: value} shown beside the result (e.g. the paper's mean AUC).
    """

    def __init__(self, output_dir: str, class_names: Sequence[str], paper: dict[str, float] | None = None) -> None:
        super().__init__(os.path.join(output_dir, "probabilities.csv"), class_names)
        self.output_dir = Path(output_dir)
        self.paper = dict(paper or {})
        self.summary: dict[str, Any] = {}

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        if any(lab is None for lab in self.labels):
            raise ValueError("ClassificationReport needs a 'label' for every evaluated image.")
        probs, labels = np.asarray(self.probs), np.asarray(self.labels)
        aucs = per_class_auc(probs, labels) if len(probs) else [None] * len(self.class_names)
        positives = labels.sum(axis=0).astype(int).tolist() if len(labels) else [0] * len(self.class_names)
        present = [c for c, a in zip(self.class_names, aucs) if a is not None]
        self.summary = {
            "num_images": len(self.names),
            "mean_auc": mean_auc(aucs),
            "num_classes_in_mean": len(present),
            "absent_classes": [c for c in self.class_names if c not in present],
            "per_class": {
                c: {"auc": a if a is not None else ABSENT, "positives": p}
                for c, a, p in zip(self.class_names, aucs, positives)
            },
            "paper": self.paper,
        }
        write_json_atomic(self.summary, self.output_dir / "summary.json")
        text = self.markdown()
        write_text_atomic(text, self.output_dir / "summary.md")
        print(text, flush=True)

    def markdown(self) -> str:
        s = self.summary
        mean = s["mean_auc"]
        mean_txt = f"{100 * mean:.2f}" if math.isfinite(mean) else ABSENT
        lines = [
            f"ROC AUC (%) on {s['num_images']} images",
            "",
            "| class | AUC | positives |",
            "|---|---|---|",
            f"| **mean over {s['num_classes_in_mean']} classes** | **{mean_txt}** | |",
        ]
        lines += [f"| {name} (paper) | {100 * v:.2f} | |" for name, v in self.paper.items()]
        for c, row in s["per_class"].items():
            auc = row["auc"]
            lines.append(f"| {c} | {auc if isinstance(auc, str) else f'{100 * auc:.2f}'} | {row['positives']} |")
        if s["absent_classes"]:
            lines += [
                "",
                f"{ABSENT}: no positive or no negative image, so no AUC; left out of the mean: "
                + ", ".join(s["absent_classes"]),
            ]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- inference input
def find_images(input_dir: str | os.PathLike) -> list[str]:
    """Sorted image files of a folder (not recursive): ``.png .jpg .jpeg .dcm`` (any case), extension-less
    files that carry the DICOM ``DICM`` preamble, and single-slice ``.nii .nii.gz .nrrd`` volumes.

    Raises:
        FileNotFoundError: the folder does not exist or holds no such file (the message names it).
    """
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Input folder not found: {folder} (set --input_dir, or --input_files to a list of images)."
        )
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    found = [
        os.fspath(p)
        for p in files
        if p.suffix.lower() in IMAGE_SUFFIXES
        or p.name.lower().endswith(VOLUME_SUFFIXES)
        or (p.suffix == "" and has_dicom_marker(p))
    ]
    if not found:
        raise FileNotFoundError(
            f"No chest X-ray images in {folder}: expected {', '.join(IMAGE_SUFFIXES)} files "
            f"or extension-less DICOM files."
        )
    return found


def class_names_from_metadata(metadata: dict | str | os.PathLike, output: str = "pred") -> list[str]:
    """Class names, in channel order, from a bundle's metadata (the dict a bundle config sees as
    ``@_meta_``, or the path of ``metadata.json``): ``network_data_format.outputs.<output>.channel_def``."""
    if not isinstance(metadata, dict):
        with open(metadata) as f:
            metadata = json.load(f)
    try:
        channel_def = metadata["network_data_format"]["outputs"][output]["channel_def"]
        return [str(channel_def[str(i)]) for i in range(len(channel_def))]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"the bundle metadata has no class names (network_data_format -> outputs -> {output} -> "
            f"channel_def with keys '0', '1', ...): missing {e}. Run the bundle from its configs/ "
            f"folder so that configs/metadata.json is read, or set --class_names."
        ) from None
