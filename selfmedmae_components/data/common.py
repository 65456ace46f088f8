"""Helpers shared by the dataset preparation modules."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class DatasetError(ValueError):
    """A dataset on disk is not in the expected form; the message names the file and what was expected."""


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename, so a crash never
    leaves a truncated file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
