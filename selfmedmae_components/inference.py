"""Inference over a folder that goes on past a bad input.

MONAI's ``Dataset`` raises on the first file it cannot read, which stops the evaluator: a
segmentation run writes only the files before it, a classification run no CSV at all. Here each input
that cannot be read, or does not fit (a check in ``preprocessing`` raises), is named with what is
wrong and skipped; the others are written; the run ends with a summary and an error (so a non-zero
exit status) when any input failed. Three pieces, wired in each ``inference.yaml``:

- :class:`FailSoftDataset` (``dataset``): an item whose preprocessing raises becomes a
  :class:`FailedInput` instead of an exception (this runs in the DataLoader workers);
- :func:`collate_loaded` (the DataLoader's ``collate_fn``): collates the items that loaded and passes
  the failures beside them, a :class:`LoadedBatch`;
- :class:`InferenceReport`: an Ignite handler in ``handlers``, whose :meth:`~InferenceReport.iteration`
  is the evaluator's ``iteration_update``: it records the failures, runs MONAI's own iteration on the
  rest, and at the end prints the summary and raises if anything failed.

:class:`SaveLabelMapd` is MONAI's ``SaveImaged`` for a label map made from an input with channels
(a MONAI 1.6.1 writer bug, see the class).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ignite.engine import Engine, Events
from monai.data import Dataset, MetaTensor, list_data_collate
from monai.transforms import SaveImaged
from monai.utils import MetaKeys

__all__ = ["FailSoftDataset", "FailedInput", "InferenceReport", "LoadedBatch", "SaveLabelMapd", "collate_loaded"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailedInput:
    """An input that could not be used: its file and what was wrong."""

    source: str
    reason: str


def _reason(exc: BaseException, source: str) -> str:
    """What went wrong with ``source``: the first line of the error under MONAI's "applying transform"
    wrappers, without the file name the error may start with (the report names the file)."""
    while type(exc) is RuntimeError and str(exc).startswith("applying transform") and exc.__cause__ is not None:
        exc = exc.__cause__
    lines = str(exc).strip().splitlines()
    message = lines[0].removeprefix(f"{source}: ") if lines else "(no message)"
    return f"{type(exc).__name__}: {message}"


class FailSoftDataset(Dataset):
    """MONAI's ``Dataset`` whose items that fail to load or preprocess come back as a :class:`FailedInput`
    (the item's ``source_key`` entry and the error) instead of raising, so that one bad file does not stop
    a run over many. Use it with :func:`collate_loaded` and :class:`InferenceReport`.

    Args:
        data: the items, e.g. ``[{"image": "/data/a.nii.gz"}, ...]``.
        transform: the preprocessing.
        source_key: the item entry that names its file.
    """

    def __init__(self, data: Sequence, transform: Any = None, source_key: str = "image") -> None:
        super().__init__(data, transform)
        self.source_key = source_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:  # any failure of one input: reported by InferenceReport, the others go on
            item = self.data[index]
            source = item.get(self.source_key, item) if isinstance(item, Mapping) else item
            logger.debug(f"input {source} failed", exc_info=True)
            return FailedInput(str(source), _reason(e, str(source)))


class LoadedBatch(NamedTuple):
    """What :func:`collate_loaded` gives the evaluator: the collated batch of the inputs that loaded
    (``None`` if none did) and the ones that failed."""

    batch: Any
    failed: list[FailedInput]


def collate_loaded(items: Sequence) -> LoadedBatch:
    """``collate_fn`` for a :class:`FailSoftDataset`: MONAI's ``list_data_collate`` of the items that
    loaded, and the :class:`FailedInput` ones beside it."""
    failed = [i for i in items if isinstance(i, FailedInput)]
    loaded = [i for i in items if not isinstance(i, FailedInput)]
    return LoadedBatch(list_data_collate(loaded) if loaded else None, failed)


def _sources(batch: Any, key: str) -> list[str]:
    """The file names of a collated batch (for a batch whose inference failed)."""
    image = batch.get(key) if isinstance(batch, Mapping) else None
    names = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
    if names is None:
        return ["(a batch of unknown files)"]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]


class InferenceReport:
    """Counts the inputs written and failed in an inference run, names each failure as it happens, and
    at the end prints ``N written, M failed`` with the failed files and raises ``ValueError`` if any
    failed (after the other handlers' end-of-run steps, so list it last in ``handlers``).

    Its :meth:`iteration` is the evaluator's ``iteration_update``: it takes the :class:`LoadedBatch` of
    :func:`collate_loaded`, runs the evaluator's own iteration on the batch, and skips a batch in which
    no input loaded. An error in the inference or postprocessing (writing included) of a batch makes
    its inputs failures too (the segmentation bundles run one input per batch); the next batch still runs.

    Args:
        output: where the results go, for the summary (a folder or the CSV file).
        source_key: the batch entry whose meta names the input files.
    """

    def __init__(self, output: str = "", source_key: str = "image") -> None:
        self.output, self.source_key = str(output), source_key
        self.written = 0
        self.failed: list[FailedInput] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.written, self.failed = 0, []

    def _fail(self, failure: FailedInput) -> None:
        self.failed.append(failure)
        print(f"Skipped {failure.source}: {failure.reason}", file=sys.stderr, flush=True)

    def iteration(self, engine: Engine, loaded: Any) -> Any:
        batch, failures = loaded if isinstance(loaded, LoadedBatch) else (loaded, [])
        for failure in failures:
            self._fail(failure)
        engine.state.batch = batch  # MONAI's decollate and postprocessing read the batch from here
        if batch is None:
            return []
        try:
            return engine._iteration(engine, batch)  # the evaluator's own step (its default iteration_update)
        except Exception as e:
            logger.debug("inference failed", exc_info=True)
            for source in _sources(batch, self.source_key):
                self._fail(FailedInput(source, _reason(e, source)))
            return []

    def _count(self, engine: Engine) -> None:
        output = engine.state.output
        self.written += len(output) if isinstance(output, list) else int(output is not None)

    def __call__(self, engine: Engine) -> None:
        where = f" to {self.output}" if self.output else ""
        print(f"Inference: {self.written} input(s) written{where}, {len(self.failed)} failed.", flush=True)
        if self.failed:
            listing = "\n".join(f"  {f.source}: {f.reason}" for f in self.failed)
            raise ValueError(
                f"{len(self.failed)} of {self.written + len(self.failed)} input(s) could not be "
                f"processed (the other {self.written} were written{where}):\n{listing}"
            )


class SaveLabelMapd(SaveImaged):
    """MONAI's ``SaveImaged`` for channel-first label maps ``(1, X, Y, Z)``, written as 3-D volumes in any
    storage orientation.

    A prediction carries the meta of the input it was made from. When that input had a channel axis in
    its file (``original_channel_dim`` -1: BraTS' 4-D NIfTI), MONAI 1.6.1's writer clamps the squeezed
    ``(X, Y, Z)`` map to two spatial dimensions and "resamples" it with the affine's top-left 2 x 2
    block, which is singular for a sagittal or coronal acquisition ("cannot find a suitable writer ...
    Affine ... is not invertible"). The map is stored without a channel axis, so it is marked so; for
    inputs stored that way already (BTCV's 3-D CT) nothing changes. MONAI Label drops ``SaveImaged``
    transforms, this one included, and writes its own result.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):  # a new meta dict: the input image's own is left as it was
                d[key].meta = {**d[key].meta, MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel"}
        return super().__call__(d)
