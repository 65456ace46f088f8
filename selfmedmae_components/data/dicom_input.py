"""DICOM series as inference inputs: a folder per series, read as the archive preparation reads it.

``input_images(input_dir)`` lists what an inference run segments: the volume files at the top of ``input_dir``
(NIfTI, NRRD, MetaImage) and, for each CT, MR, PET or NM series of the DICOM files under it, the deepest folder
holding the series' files (any layout: a folder per series, a series spread over subfolders, ``input_dir`` itself).
:class:`DicomSeriesReader`, given to ``LoadImaged`` beside MONAI's readers, reads such a folder with data/dicom.py:
the one image series in it (a localizer or dose report beside it does not count), with the affine ITK would give
(tests/test_dicom.py checks the two agree), so the prediction is written in the series' own geometry. Its metadata
holds the geometry only: no DICOM attribute, no UID.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data.image_reader import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from . import dicom, volumes

__all__ = ["DicomSeriesReader", "input_images"]

IMAGE_MODALITIES = ("CT", "MR", "PT", "NM")


def input_images(input_dir: str | os.PathLike) -> list[str]:
    """The inputs of an inference run over ``input_dir``: the volume files at its top, and the folder of each
    cross-sectional DICOM series under it (the deepest folder holding all its files, so a series spread over
    subfolders is one input; headers only are read). A series that is not one volume (a missing slice, ...) is
    listed too: its input fails with the reason, it is not left out in silence."""
    root = Path(input_dir)
    if not root.is_dir():
        return []
    files = sorted(
        str(p) for p in root.iterdir() if p.is_file() and volumes.volume_suffix(p) and not p.name.startswith(".")
    )
    candidates = sorted(Path(d) / f for d, _, names in os.walk(root) for f in names)
    series, _ = dicom.scan_files([p for p in candidates if not volumes.volume_suffix(p) and dicom.has_dicom_marker(p)])
    images = [s for s in series if s.modality.upper() in IMAGE_MODALITIES and not _localizer(s)]
    return files + sorted({dicom.series_folder(s) for s in images})


def _localizer(series: dicom.Series) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in series.instances[0].header.get("ImageType", [])]


class DicomSeriesReader(ImageReader):
    """MONAI image reader for a folder holding one DICOM image series (files at any depth; other objects such as a
    localizer, a dose report or a screenshot beside it are left out).

    Raises (on read):
        ValueError: no image series in the folder, or several (named by their keys), or the series is not one volume
        (a missing slice, ...: data/dicom.py's reason).

    Example::

        LoadImaged("image", reader=DicomSeriesReader(), ensure_channel_first=True)   # NIfTI files still by nibabel
    """

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and os.path.isdir(names[0])

    def read(self, data: Sequence[str] | str, **kwargs) -> dicom.Series:
        folder = os.fspath(data[0] if not isinstance(data, (str, os.PathLike)) else data)
        files = sorted(str(Path(d) / f) for d, _, names in os.walk(folder) for f in names)
        series, _ = dicom.scan_files(files)
        problems = {s.key: dicom.volume_problem(s) for s in series}
        usable = [s for s in series if problems[s.key] is None]
        if len(usable) == 1:
            return usable[0]
        if usable:
            keys = ", ".join(s.key for s in usable)
            raise ValueError(
                f"{folder} holds {len(usable)} image series ({keys}): give one folder per series "
                f"(or convert the tree with tools/prepare.py scans)"
            )
        why = "; ".join(f"{k}: {p}" for k, p in problems.items()) or "no DICOM series"
        raise ValueError(f"{folder} holds no DICOM series that is one volume ({why})")

    def get_data(self, img: dicom.Series) -> tuple[np.ndarray, dict]:
        data, affine = dicom.load_volume(img)
        meta = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(data.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            MetaKeys.SPACE: SpaceKeys.RAS,
        }
        return data, meta
