"""Atomic file writes: a crash never leaves a truncated report, summary, datalist or log behind.

Shared by the dataset preparation (datalists), the evaluation reports (metrics, classification) and the
handlers, none of which should need the others to write a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_text_atomic", "write_json_atomic"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; a datalist, report or log is meant to be read by the team, as open() would leave it
_FILE_MODE = 0o666 & ~_current_umask()


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a crash never leaves a
    truncated file behind (line ends as given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (:func:`write_text_atomic`)."""
    return write_text_atomic(json.dumps(data, indent=2) + "\n", path)
