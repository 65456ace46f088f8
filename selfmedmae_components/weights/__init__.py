"""Checkpoint loading and stage-to-stage weight transfer, with a report of what loaded.

- ``checkpoint``: read a model state dict (tensors only, ``weights_only=True``), :class:`CheckpointError`;
  load one strictly into a network, misfits named in one line (:func:`load_weights`).
- ``transfer``: the MAE encoder into a UNETR / classifier (:func:`transfer_encoder`, :class:`TransferReport`).
- ``imagenet``: an ImageNet ViT (timm or Hugging Face names) into the same encoder (:func:`load_imagenet_vit`).
- ``init``: the fine-tuning configs' ``init_mode`` switch over the three (:func:`init_encoder`).

Each module imports only the ones listed before it; the configs and tools use the names below.
"""

from .checkpoint import TORCH_SAVE_MAGIC, CheckpointError, load_state_dict, load_weights
from .imagenet import ImageNetReport, load_imagenet_vit
from .init import INIT_MODES, init_encoder
from .transfer import ENCODER_PREFIX, TransferReport, transfer_encoder

__all__ = [
    "CheckpointError",
    "ENCODER_PREFIX",
    "INIT_MODES",
    "ImageNetReport",
    "TORCH_SAVE_MAGIC",
    "TransferReport",
    "init_encoder",
    "load_imagenet_vit",
    "load_state_dict",
    "load_weights",
    "transfer_encoder",
]
