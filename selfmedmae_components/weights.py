"""Checkpoint loading and stage-to-stage weight transfer, with a report of what loaded.

Checkpoints are read with ``weights_only=True``: bundles are shared, and a pickle can run code.
The original code loaded MAE weights with ``strict=False`` and silently trained from scratch on a
wrong path; here a missing file, an empty match or a shape mismatch is an error.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError


ENCODER_PREFIX = "encoder."
INIT_MODES = ("mae", "scratch", "imagenet")
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save writes a zip archive, or a pickle (legacy format)


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used: the message names the file and what was expected."""


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a model state dict from a checkpoint file (raw, or under "model"/"network"/"state_dict").

    A DistributedDataParallel ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Check the path, or run the stage that writes it first.")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(TORCH_SAVE_MAGIC):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: expected a file written by torch.save, found {_describe(head)}."
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to load {path}: it needs pickled Python objects, which can run code. Only tensor "
            f"checkpoints (weights_only=True) are accepted. Details: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError ... for a damaged file
        raise CheckpointError(f"Cannot read checkpoint {path} (truncated or damaged PyTorch file): "
                              f"{type(e).__name__}: {e}") from e
    if isinstance(ckpt, dict):
        for key in ("model", "network", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} holds no model state dict (expected a dict of tensors, or one under 'model').")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def _describe(head: bytes) -> str:
    """What the first bytes of a file look like, for an error message."""
    if not head:
        return "an empty file"
    text = head.decode("utf-8", "ignore")
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"text starting {text.lstrip().split(chr(10), 1)[0][:40]!r}"
    return f"binary data starting {head[:8]!r}"


@dataclass
class TransferReport:
    """What a weight transfer did; ``str()`` is the printed report."""

    source: str
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not used (MAE decoder, mask token)
    initialised: list[str] = field(default_factory=list)  # in the model, left at their initialisation

    def __str__(self) -> str:
        def group(keys: list[str]) -> str:
            tops = sorted({k.split(".")[0] for k in keys})
            return ", ".join(tops) if tops else "-"

        return (
            f"Weight transfer from {self.source}:\n"
            f"  loaded      {len(self.loaded):4d} tensors (encoder: patch embedding, cls token, position embedding, "
            f"{sum('.blocks.' in k and k.endswith('qkv.weight') for k in self.loaded)} blocks, norm)\n"
            f"  dropped     {len(self.dropped):4d} tensors of the checkpoint ({group(self.dropped)})\n"
            f"  initialised {len(self.initialised):4d} tensors of the model at random ({group(self.initialised)})"
        )


def transfer_encoder(network: nn.Module, checkpoint: str | Path, prefix: str = ENCODER_PREFIX) -> TransferReport:
    """Load the ViT encoder of an MAE checkpoint into a UNETR / classifier (both name it ``encoder``).

    Every encoder tensor of the network must be in the checkpoint with the same shape: a differing
    ROI, patch size or width (for example fine-tuning at 128^3 on a 96^3 pre-training) is an error.
    """
    state = load_state_dict(checkpoint)
    target = network.module.state_dict() if hasattr(network, "module") else network.state_dict()
    wanted = [k for k in target if k.startswith(prefix)]
    if not wanted:
        raise CheckpointError(f"The network has no '{prefix}*' parameters to load {checkpoint} into.")
    missing = [k for k in wanted if k not in state]
    if len(missing) == len(wanted):
        raise CheckpointError(
            f"{checkpoint} contains no '{prefix}*' tensors: is it an MAE pre-training checkpoint of this project?"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or mismatched:
        raise CheckpointError(
            f"{checkpoint} does not fit the network's encoder (pre-training and fine-tuning must share ROI, "
            f"patch size, channels and ViT size).\n  missing: {missing}\n  shape mismatch: {mismatched}"
        )
    module = network.module if hasattr(network, "module") else network
    module.load_state_dict({k: state[k] for k in wanted}, strict=False)
    report = TransferReport(
        source=str(checkpoint),
        loaded=wanted,
        dropped=[k for k in state if k not in target],
        initialised=[k for k in target if k not in wanted],
    )
    print(report, flush=True)
    return report


def init_encoder(network: nn.Module, mode: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Initialise a fine-tuning network: ``"mae"`` loads the pre-trained encoder, ``"scratch"`` keeps
    the random initialisation (the paper's baseline row) and says so, ``"imagenet"`` loads a ViT-B/16
    ImageNet checkpoint given as ``checkpoint`` (see ``imagenet.py``). Returns the network."""
    if mode == "mae":
        if checkpoint is None:
            raise CheckpointError("init_mode 'mae' needs a pretrained_checkpoint.")
        transfer_encoder(network, checkpoint)
    elif mode == "imagenet":
        if checkpoint is None:
            raise CheckpointError("init_mode 'imagenet' needs a pretrained_checkpoint (an ImageNet ViT-B/16 file).")
        from .imagenet import load_imagenet_vit

        load_imagenet_vit(network, checkpoint)
    elif mode == "scratch":
        msg = "Training from random initialisation (init_mode='scratch'): no pre-trained weights are loaded."
        print(msg, flush=True)
    else:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {mode!r}.")
    return network
