"""Stage-to-stage weight transfer (MAE encoder -> UNETR / classifier), with a report of what loaded.

The original code loaded MAE weights with ``strict=False`` and silently trained from scratch on a
wrong path; here a missing file, an empty match or a shape mismatch is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..networks.vit import ENCODER_PREFIX
from ..wrappers import unwrap
from .checkpoint import CheckpointError, load_state_dict


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
    module = unwrap(network)
    target = module.state_dict()
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
    module.load_state_dict({k: state[k] for k in wanted}, strict=False)
    report = TransferReport(
        source=str(checkpoint),
        loaded=wanted,
        dropped=[k for k in state if k not in target],
        initialised=[k for k in target if k not in wanted],
    )
    print(report, flush=True)
    return report
