"""ViT image classifier: linear head on the cls token after the final norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .vit import ViTEncoder, set_activation_checkpointing


class ViTClassifier(nn.Module):
    """ViT-B/16 (by default) with a linear head on the normed cls token, for multi-label logits.

    Args:
        in_channels: image channels (3: the grayscale X-ray replicated, as for ImageNet ViTs).
        num_classes: outputs (14 for ChestX-ray14).
        img_size: input size (224).
        patch_size: patch edge length (16).
        hidden_size, num_layers, num_heads, mlp_ratio: the ViT.
        drop_path_rate: stochastic depth, linear over depth up to this value (0.1 in the paper).
        spatial_dims: 2.
        activation_checkpointing: recompute the transformer blocks' activations in the backward pass
            (less memory, a second forward of the blocks; :func:`set_activation_checkpointing`).

    Example::

        net = ViTClassifier(num_classes=14)
        logits = net(torch.randn(2, 3, 224, 224))  # (2, 14)
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 14,
        img_size: Sequence[int] | int = 224,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        spatial_dims: int = 2,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = ViTEncoder(
            in_channels,
            img_size,
            patch_size,
            spatial_dims,
            hidden_size,
            num_layers,
            num_heads,
            mlp_ratio,
            drop_path_rate=drop_path_rate,
            learnable_pos_embed=True,
        )
        self.head = nn.Linear(hidden_size, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning recipe: a near-zero head
        nn.init.zeros_(self.head.bias)
        set_activation_checkpointing(self, activation_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(x)
        return self.head(tokens[:, 0])
