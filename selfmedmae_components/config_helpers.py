"""Small helpers the bundle configs call (bundle_root, input file checks, switches); the configs load this module
through selfmedmae_components.config_imports."""

from __future__ import annotations

import inspect
import os
from pathlib import Path


def default_bundle_root() -> str:
    """The bundle folder of the config being run: the parent of its ``configs/`` folder.

    MONAI's ConfigWorkflow knows the config folder (it adds the bundle root to ``sys.path`` the same
    way) but does not expose it to the config, whose ``bundle_root`` is usually hard-coded ``"."``.
    This looks up the workflow that is parsing the config, so that
    ``python -m monai.bundle run --config_file bundles/btcv_seg/configs/finetune.yaml`` writes into
    ``bundles/btcv_seg`` from any working directory. ``--bundle_root`` still overrides it; without a
    workflow on the stack (a plain ConfigParser) it falls back to the working directory.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            root = Path(candidate.config_root_path)
            return os.fspath(root.parent if root.name == "configs" else root)
        frame = frame.f_back
    return os.getcwd()


def existing_files(
    files: list[str] | str,
    what: str = "input_files",
    expected: str = "an existing folder of .nii/.nii.gz files",
    folder: str | os.PathLike | None = None,
) -> list[str]:
    """The given files as paths, checked: an empty list or a missing file is an error that names it.

    ``folder`` is the folder the files were listed from (``input_dir``): when nothing was found, the
    error says whether it does not exist or holds no such file.
    """
    files = [os.fspath(files)] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
    if not files and folder is not None and not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Input folder not found: {os.fspath(folder)} does not exist or is not a folder "
            f"(set --input_dir, or --input_files to a list of images)."
        )
    if not files:
        where = f" in {os.fspath(folder)}" if folder is not None else ""
        raise FileNotFoundError(f"No input images found{where} ({what} is empty): give {expected}.")
    missing = [f for f in files if not os.path.exists(f)]  # a file, or a folder of one DICOM series
    if missing:
        raise FileNotFoundError(f"Input image(s) not found: {missing}")
    return files


def as_bool(value: bool | str | int) -> bool:
    """A config switch as a bool. ``--resume false`` reaches a MONAI config as the string "false",
    which Python would take as true; fire only converts ``True``/``False``."""
    if isinstance(value, str):
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean switch (true/false), got {value!r}")
    return bool(value)
