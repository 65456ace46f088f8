"""Ignite handlers MONAI lacks: MAE reconstruction images, a per-epoch loss log, exact replay on resume
(atomic checkpoints: checkpointing.py)."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from PIL import Image

from .checkpointing import AtomicCheckpointSaver, attach_resume  # noqa: F401  (the configs name them here)
from .io import write_text_atomic
from .wrappers import unwrap

logger = logging.getLogger(__name__)


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, list) else output


def reconstruction_panel(
    mae: torch.nn.Module, image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
) -> np.ndarray:
    """One sample as [original | masked | reconstruction] (uint8, H x 3W): channel 0, middle axial slice for 3D.

    Predictions of a normalised-pixel MAE are mapped back with each patch's own mean and std; visible
    patches are shown as the input (as in the MAE paper's figures), masked ones as predicted.
    """
    image, pred, mask = image[:1].float(), pred[:1].float(), mask[:1].float()
    target = mae.patchify(image)
    if getattr(mae, "norm_pix_loss", False):
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True, unbiased=False) + 1e-6) ** 0.5
        pred = pred * std + mean
    m = mask.unsqueeze(-1)
    masked = mae.unpatchify(target * (1 - m))
    recon = mae.unpatchify(target * (1 - m) + pred * m)
    views = [image, masked, recon]
    if image.ndim == 5:  # (1, C, H, W, D): axial slice in the middle of the last (superior-inferior) axis
        views = [v[..., v.shape[-1] // 2] for v in views]
        views = [v[0, 0].T.flip(0) for v in views]  # RAS (x, y) -> rows anterior to posterior
    else:
        views = [v[0, 0] for v in views]
    lo, hi = views[0].min(), views[0].max()
    panel = torch.cat([(v - lo) / (hi - lo + 1e-8) for v in views], dim=1).clamp(0, 1)
    zoom = max(1, 192 // panel.shape[0])  # small demo crops are enlarged to stay visible
    panel = panel.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)
    return panel.mul(255).byte().cpu().numpy()


class ReconstructionImageHandler:
    """Every ``interval`` epochs, writes the last batch's first sample as original / masked /
    reconstruction to TensorBoard (tag ``mae/reconstruction``) and as a PNG.

    Args:
        log_dir: TensorBoard log directory (None: no TensorBoard image).
        output_dir: folder for ``reconstruction_epoch<E>.png`` and ``reconstruction_latest.png`` (None: no PNG).
        interval: epochs between images.
        summary_writer: an existing SummaryWriter to use instead of creating one in ``log_dir``.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        output_dir: str | None = None,
        interval: int = 1,
        summary_writer: Any = None,
    ) -> None:
        self.log_dir = log_dir
        self.output_dir = output_dir
        self.interval = max(1, int(interval))
        self._writer = summary_writer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    @property
    def writer(self) -> Any:
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def __call__(self, engine: Engine) -> None:
        out = _first(engine.state.output)
        if not isinstance(out, dict) or "mask" not in out:
            return
        with torch.no_grad():
            panel = reconstruction_panel(
                unwrap(engine.network), out[CommonKeys.IMAGE], out[CommonKeys.PRED], out["mask"]
            )
        epoch = engine.state.epoch
        if self.writer is not None:
            self.writer.add_image("mae/reconstruction", panel[None], epoch)
            self.writer.flush()
        if self.output_dir is not None:
            Path(self.output_dir).mkdir(parents=True, exist_ok=True)
            for name in (f"reconstruction_epoch{epoch:05d}.png", "reconstruction_latest.png"):
                Image.fromarray(panel).save(os.path.join(self.output_dir, name))


class EpochLossLogger:
    """Appends ``epoch, iteration, mean loss, lr`` to a CSV at every epoch end (the learning curve that
    tests and the demo read back; TensorBoard has the same through MONAI's handlers).

    A run's first row rewrites the file, keeping only the rows of earlier epochs: a fresh run starts a new
    log, and a run resumed from epoch N drops the rows the interrupted run wrote after its checkpoint, so
    each epoch appears once.
    """

    HEADER = ["epoch", "iteration", "loss", "lr"]

    def __init__(self, output_file: str, loss_key: str = CommonKeys.LOSS) -> None:
        self.output_file = output_file
        self.loss_key = loss_key
        self._losses: list[float] = []
        self._started = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._losses.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        self._losses.append(_first(engine.state.output)[self.loss_key])

    def _rows_before(self, epoch: int) -> list[list[str]]:
        path = Path(self.output_file)
        if not path.exists():
            return []
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0] != self.HEADER or not all(r and r[0].isdigit() for r in rows[1:]):
            raise ValueError(
                f"{path} is not a loss log of columns {','.join(self.HEADER)} with an integer epoch; "
                "move it away or choose another log_dir."
            )
        return [r for r in rows[1:] if int(r[0]) < epoch]

    def __call__(self, engine: Engine) -> None:
        mean_loss = torch.stack([torch.as_tensor(x).float() for x in self._losses]).mean().item()
        row = [engine.state.epoch, engine.state.iteration, f"{mean_loss:.6f}", engine.optimizer.param_groups[-1]["lr"]]
        if self._started:
            with open(self.output_file, "a", newline="") as f:
                csv.writer(f).writerow(row)
            return
        text = io.StringIO()
        csv.writer(text).writerows([self.HEADER] + self._rows_before(engine.state.epoch) + [row])
        write_text_atomic(text.getvalue(), self.output_file)
        self._started = True


def log_every(interval: int) -> Callable[[Engine, int], bool]:
    """An iteration filter for MONAI's StatsHandler and TensorBoardStatsHandler (their ``iteration_log``):
    every ``interval``-th iteration of an epoch, and its last one (the demo and the tests read that line).

    Each logged iteration reads the loss back from the device (``.item()``), which makes the host wait
    for the GPU to finish the step before it can queue the next one; logging every iteration costs that
    on every step.
    """
    interval = max(1, int(interval))

    def due(engine: Engine, iteration: int) -> bool:
        i = (iteration - 1) % engine.state.epoch_length + 1  # the iteration within the epoch, from 1
        return i % interval == 0 or i == engine.state.epoch_length

    return due


class EpochSeeder:
    """Seeds every random stream from (seed, epoch) before each epoch, so that a run resumed from a
    checkpoint replays exactly the epochs an uninterrupted run would have had (augmentation, MAE masks,
    shuffling), and two runs with the same seed give the same loss curve.

    Args:
        seed: the run's seed.
        transform: the training transform (a MONAI Compose) whose random transforms are re-seeded.
        deterministic: deterministic cuDNN (slower, see engines.set_determinism); seeding is the same either way.
    """

    def __init__(self, seed: int, transform: Any = None, deterministic: bool | str = False) -> None:
        self.seed = int(seed)
        self.transform = transform
        self.deterministic = deterministic

    def attach(self, engine: Engine) -> None:
        # STARTED covers the first epoch after a (re)start, EPOCH_COMPLETED the next one; both run before
        # the data loader draws the epoch's shuffle
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from .engines import set_determinism

        seed = self.seed + engine.state.epoch + 1  # the seed of the coming epoch
        set_determinism(seed, self.deterministic)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)
