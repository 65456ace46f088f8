"""Frozen-encoder fine-tuning, the cheap representation check of tools/label_efficiency.py ``--probe``.

Layered on any finetune config without editing it: ``--network "$selfmedmae_components.probe.freeze_encoder(@model)"``
(the configs build the optimiser's groups from ``@network``, and those groups skip frozen parameters). On the
classifier this is a linear probe on the normed cls token (the head is the only trainable layer; MAE's own probe
adds a BatchNorm without affine parameters, we do not); on UNETR only the convolutional decoder trains.
"""

from __future__ import annotations

import torch.nn as nn

from .wrappers import unwrap

__all__ = ["freeze_encoder"]


def freeze_encoder(model: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``model.encoder`` (the ViT); returns ``model``.

    Raises:
        ValueError: the network has no ``encoder`` attribute, or nothing outside it would train.
    """
    encoder = getattr(unwrap(model), "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"freeze_encoder expects a network with a ViT under .encoder, got {type(unwrap(model)).__name__}"
        )
    for p in encoder.parameters():
        p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("freeze_encoder: nothing left to train outside the encoder")
    return model
