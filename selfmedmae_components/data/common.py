"""Helpers shared by the dataset preparation modules."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO, TypeVar

import numpy as np

from ..errors import UserError
from ..io import write_json_atomic, write_text_atomic  # noqa: F401 - their home is io.py; importable here as before


class DatasetError(UserError, ValueError):
    """A dataset on disk is not in the expected form; the message names the file and what was expected."""


T = TypeVar("T")

SPLIT_METHOD = (
    "numpy.random.default_rng(seed).permutation of the dataset.json cases sorted by image path: "
    "first round(n * eval_fraction) -> evaluation, next num_val_cases -> validation, rest -> training"
)


def seeded_split(n: int, n_eval: int, n_val: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """The (training, validation, evaluation) indices of ``n`` cases (sorted by image path), each list sorted:
    :data:`SPLIT_METHOD`, so the same seed and files always give the same split."""
    perm = np.random.default_rng(seed).permutation(n)
    evaluation, validation, training = np.split(perm, [n_eval, n_eval + n_val])
    return sorted(training.tolist()), sorted(validation.tolist()), sorted(evaluation.tolist())


def split_record(seed: int, eval_fraction: float, num_val_cases: int) -> dict:
    """How the split was drawn, saved in the datalist beside it."""
    return {"method": SPLIT_METHOD, "seed": seed, "eval_fraction": eval_fraction, "num_val_cases": num_val_cases}


def progress(
    items: Iterable[T], total: int, what: str, every_s: float = 10.0, stream: TextIO | None = None
) -> Iterator[T]:
    """Yield ``items`` while telling stderr how far a long check has got.

    Prints ``what`` first, then ``"  1200/112120 (1%), 0:10 so far"`` at most every ``every_s``
    seconds, and the total time at the end if any such line was printed (a quick check stays at one
    line). Lines, not a progress bar, so that logs of the run read the same.
    """
    stream = stream or sys.stderr
    print(f"{what} ...", file=stream, flush=True)
    start = last = time.monotonic()
    done, reported = 0, False
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s and done < total:
            percent = 100 * done // max(total, 1)
            print(f"  {done}/{total} ({percent}%), {_clock(now - start)} so far", file=stream, flush=True)
            last, reported = now, True
    if reported:
        print(f"  {done}/{total} done in {_clock(time.monotonic() - start)}", file=stream, flush=True)


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}" if minutes >= 60 else f"{minutes}:{sec:02d}"


def load_datalist(datalist_file: str | os.PathLike, keys: str | list[str], base_dir: str | os.PathLike) -> list[dict]:
    """Items of one or more lists of a datalist JSON, paths resolved against ``base_dir`` (the dataset folder).

    Raises:
        FileNotFoundError: the datalist (or the dataset folder) does not exist, with the command that makes it.
        DatasetError: a requested list is missing from the datalist.
    """
    from monai.data import load_decathlon_datalist

    datalist_file, base_dir = Path(datalist_file), Path(base_dir)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"Dataset folder not found: {base_dir} (set --dataset_dir to the downloaded dataset).")
    if not datalist_file.is_file():
        raise FileNotFoundError(
            f"Datalist not found: {datalist_file}. Create it from the downloaded dataset with the bundle's "
            f"preparation tool (tools/prepare.py DATASET FOLDER), or set --datalist_file."
        )
    try:
        with open(datalist_file) as f:
            available = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{datalist_file} is not a datalist JSON file ({e}); write it with tools/prepare.py.") from e
    if not isinstance(available, dict):
        raise DatasetError(f"{datalist_file} is not a datalist: expected a JSON object with 'training' ... lists.")
    items: list[dict] = []
    for key in [keys] if isinstance(keys, str) else keys:
        if key not in available:
            raise DatasetError(f"{datalist_file} has no '{key}' list (found: {sorted(available)}).")
        if available[key]:
            items += load_decathlon_datalist(str(datalist_file), data_list_key=key, base_dir=str(base_dir))
    return items
