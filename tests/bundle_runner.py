"""Run a bundle config the way users do (``python -m monai.bundle run``), for the tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def config_path(bundle: str, name: str) -> Path:
    """A bundle's config ``name`` (e.g. "finetune"); the multi-GPU overlays are one file for every bundle."""
    if name.startswith("multi_gpu_"):
        return REPO / "bundles" / "common" / f"{name}.yaml"
    return REPO / "bundles" / bundle / "configs" / f"{name}.yaml"


def configs(bundle: str, *names: str) -> str:
    """A MONAI ``--config_file`` value layering ``names`` (e.g. "finetune", "demo") of a bundle."""
    files = [str(config_path(bundle, n)) for n in names]
    return files[0] if len(files) == 1 else "[" + ",".join(repr(f) for f in files) + "]"


def run_bundle(run_id: str | None, config_file: str, timeout: int = 1800, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] --config_file ... --key value``; raises with the log on failure."""
    cmd = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else []) + ["--config_file", config_file]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_bundle_expect_error(run_id: str | None, config_file: str, **overrides) -> str:
    """Run a config that must fail; returns its combined output for the error message checks."""
    try:
        run_bundle(run_id, config_file, **overrides)
    except RuntimeError as e:
        return str(e)
    raise AssertionError("the bundle run was expected to fail")


def read_losses(csv_file: str | Path) -> list[float]:
    """The per-epoch mean losses written by EpochLossLogger."""
    with open(csv_file) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]
