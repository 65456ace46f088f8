"""Checkpoints that survive a crash at any instant, and resuming from the newest one.

Ignite's ``Checkpoint`` rotates files by removing the old one *before* it writes the new one, so a
kill during the write of a large (ViT-B + optimiser: ~1 GB) checkpoint left nothing to resume from.
Here every file is written to a temporary file, synced, renamed into place, and only then is the
file it replaces removed: at every instant at least one complete checkpoint exists.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

logger = logging.getLogger(__name__)


def score_of(path: Path) -> int | None:
    """N of ``..._epoch=N.pt`` (None when the part after '=' is not an integer)."""
    text = path.stem.rsplit("=", 1)[-1]
    return int(text) if text.isdigit() else None


class ReplaceThenRemoveDiskSaver(DiskSaver):
    """Ignite's DiskSaver (with MONAI's fixed ``filename`` option) that defers ``remove`` until the next
    file is complete on disk and renamed into place.

    ``Checkpoint`` always calls ``remove`` right before it saves, so the removal happens at the end of that
    save; a failed save keeps the old file.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        super().__init__(dirname, atomic=True, require_empty=False)
        self.filename = filename  # MONAI's final_filename / key_metric_filename
        self._to_remove: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint, filename, metadata)
        if idist.get_rank() == self.save_on_rank:
            for old in self._to_remove:
                if old != filename:  # a fixed name was replaced in place by the rename
                    (self.dirname / old).unlink(missing_ok=True)
        self._to_remove.clear()

    def remove(self, filename: str) -> None:
        self._to_remove.append(self.filename or filename)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        # hidden, beside the target (as io.write_text_atomic): .<name>.<random>.tmp
        fd, tmp = tempfile.mkstemp(dir=self.dirname, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                func(checkpoint, f, **self.kwargs)
                f.flush()
                os.fsync(f.fileno())  # on disk before the old file goes, so a power cut cannot leave an empty one
            os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)  # as Ignite: readable by the group
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _name_glob(ckpt: Checkpoint) -> str:
    """The names a Checkpoint writes, with its score as '*' (e.g. ``mae_checkpoint_epoch=*.pt``)."""
    if ckpt.save_handler.filename:
        return ckpt.save_handler.filename
    name = "checkpoint" if len(ckpt.to_save) > 1 else next(iter(ckpt.to_save))
    return ckpt._get_filename_pattern(None).format(
        filename_prefix=ckpt.filename_prefix, name=name, score_name=ckpt.score_name, score="*", ext=ckpt.ext
    )


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver (same arguments) whose interval, final and best-metric files are each written
    to a temporary file and renamed into place before the file they replace is removed.

    At ``attach`` it removes temporary files a killed run left of the names it writes. A run resumed from
    epoch N removes, once its first new interval checkpoint is complete, the interval checkpoints <= N the
    interrupted run left, so ``n_saved`` holds across the restart.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in self._checkpoints():
            ckpt.save_handler = ReplaceThenRemoveDiskSaver(self.save_dir, getattr(ckpt.save_handler, "filename", None))
        self._start_score: int | None = None  # epoch (or iteration) the run started from, 0 unless resumed

    def _checkpoints(self) -> list[Checkpoint]:
        return [c for c in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint) if c]

    def attach(self, engine: Engine) -> None:
        for ckpt in self._checkpoints():
            for tmp in Path(self.save_dir).glob(f".{_name_glob(ckpt)}.*.tmp"):
                self.logger.warning(f"Removing {tmp}, left by a run that stopped while writing it.")
                tmp.unlink(missing_ok=True)
        super().attach(engine)
        # EPOCH_STARTED: by then a CheckpointLoader attached after this saver has restored the state
        engine.add_event_handler(Events.EPOCH_STARTED, self._note_start)

    def _note_start(self, engine: Engine) -> None:
        if self._start_score is None:
            self._start_score = engine.state.epoch - 1 if self.epoch_level else engine.state.iteration

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        n_saved = self._interval_checkpoint.n_saved
        if n_saved is None or not self._start_score:  # keep all, or a fresh run: nothing left by another
            return
        # the new file is complete: of the interrupted run's checkpoints (<= start), keep only what n_saved
        # leaves room for beside this run's; newer files, if any, came from another run and are left alone
        now = engine.state.epoch if self.epoch_level else engine.state.iteration
        scored = [(score_of(p), p) for p in Path(self.save_dir).glob(_name_glob(self._interval_checkpoint))]
        files = sorted((s, p) for s, p in scored if s is not None)
        older = [p for s, p in files if s <= self._start_score]
        keep = max(0, n_saved - sum(1 for s, _ in files if self._start_score < s <= now))
        for path in older[: len(older) - keep]:
            self.logger.info(f"Removing {path}: superseded by this resumed run's checkpoint (n_saved={n_saved}).")
            path.unlink(missing_ok=True)


def _across_ranks(value: Any) -> list:
    """``value`` of every process of a distributed run (this process's alone otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def attach_resume(
    engine: Engine, resume: bool, ckpt_dir: str, prefix: str, load_dict: dict, map_location: Any = None
) -> str | None:
    """If ``resume``, load the newest ``<prefix>_checkpoint_epoch=N.pt`` of ``ckpt_dir`` into
    ``load_dict`` (model, optimiser, scheduler, trainer state, ...) when the engine starts; returns its path."""
    from monai.handlers import CheckpointLoader

    from .config_helpers import as_bool

    if not as_bool(resume):
        return None

    found = [(score_of(p), p) for p in Path(ckpt_dir).glob(f"{prefix}_checkpoint_epoch=*.pt")]
    bad = [str(p) for s, p in found if s is None]
    problem = None
    if bad:
        problem = ValueError(f"resume=true: cannot read the epoch of {bad}; expected '{prefix}_checkpoint_epoch=N.pt'.")
    elif not found:
        problem = FileNotFoundError(
            f"resume=true but no '{prefix}_checkpoint_epoch=N.pt' in {ckpt_dir} to resume from."
        )
    newest = None if problem else max(found)[1]
    # every rank must resume from the same file (a node with its own stale ckpt_dir, or a shared filesystem whose
    # listing lags, would not): the ranks compare their choices before any of them raises or loads
    choices = _across_ranks((None if problem is None else str(problem), None if newest is None else str(newest)))
    if problem is not None:
        raise problem
    failed = [f"rank {r}: {why}" for r, (why, _) in enumerate(choices) if why]
    if failed or len({path for _, path in choices}) > 1:
        per_rank = failed or [f"rank {r}: {path}" for r, (_, path) in enumerate(choices)]
        raise FileNotFoundError(
            "resume=true: the processes would not resume from one checkpoint (" + "; ".join(per_rank) + "). ckpt_dir "
            "(bundle_root) must be one folder on a filesystem every node shares."
        )
    logger.info(f"Resuming from {newest}")
    print(f"Resuming from {newest}", flush=True)
    CheckpointLoader(load_path=str(newest), load_dict=load_dict, map_location=map_location).attach(engine)
    return str(newest)
