"""The fine-tuning stages' ``init_mode``: MAE encoder, ImageNet ViT, or random initialisation."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .checkpoint import CheckpointError
from .imagenet import load_imagenet_vit
from .transfer import transfer_encoder

INIT_MODES = ("mae", "scratch", "imagenet")


def init_encoder(network: nn.Module, mode: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Initialise a fine-tuning network: ``"mae"`` loads the pre-trained encoder, ``"scratch"`` keeps
    the random initialisation (the paper's baseline row) and says so, ``"imagenet"`` loads a ViT-B/16
    ImageNet checkpoint given as ``checkpoint`` (see ``weights/imagenet.py``). Returns the network."""
    if mode == "mae":
        if checkpoint is None:
            raise CheckpointError("init_mode 'mae' needs a pretrained_checkpoint.")
        transfer_encoder(network, checkpoint)
    elif mode == "imagenet":
        if checkpoint is None:
            raise CheckpointError("init_mode 'imagenet' needs a pretrained_checkpoint (an ImageNet ViT-B/16 file).")
        load_imagenet_vit(network, checkpoint)
    elif mode == "scratch":
        msg = "Training from random initialisation (init_mode='scratch'): no pre-trained weights are loaded."
        print(msg, flush=True)
    else:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {mode!r}.")
    return network
