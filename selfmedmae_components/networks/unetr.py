"""UNETR (Hatamizadeh et al. 2022) on our ViT encoder, so MAE weights load by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from .vit import ViTEncoder, set_activation_checkpointing


class UNETR(nn.Module):
    """UNETR with MONAI's decoder topology and a ViT encoder with cls token and drop path.

    Skips come from ``hidden_states_out[i]`` for i in ``skip_hidden_states``, where ``hidden_states_out``
    lists every block's output in order (before the final norm, cls removed), exactly as MONAI's UNETR and
    the original SelfMedMAE code index it: the default (3, 6, 9) is the output of blocks 4, 7 and 10
    counted from 1. The fourth input is the final normed output; ``encoder1`` is a basic block on the
    raw image.

    Args:
        in_channels: image channels.
        out_channels: output channels (14 for BTCV with softmax, 3 for BraTS regions with sigmoid).
        img_size: ROI size per spatial axis, divisible by 16.
        feature_size: width of the convolutional decoder (16 in the paper).
        hidden_size, num_layers, num_heads, mlp_ratio: the ViT (ViT-B: 768, 12, 12, 4).
        drop_path_rate: stochastic depth of the encoder, linear over depth up to this value.
        norm_name: feature normalisation of the convolutional blocks.
        res_block: residual convolutional blocks.
        skip_hidden_states: three 0-based indices into the list of block outputs whose entries feed the
            skip connections (default (3, 6, 9), i.e. blocks 4, 7, 10 of 12 as in MONAI and the paper).
        spatial_dims: 3 (2 also works).
        activation_checkpointing: recompute the transformer blocks' activations in the backward pass
            (less memory, a second forward of the blocks; :func:`set_activation_checkpointing`).

    Example::

        net = UNETR(in_channels=1, out_channels=14, img_size=96)
        logits = net(torch.randn(1, 1, 96, 96, 96))  # (1, 14, 96, 96, 96)
    """

    patch_size = 16  # the decoder upsamples 4 times by 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int] | int,
        feature_size: int = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        norm_name: tuple | str = "instance",
        res_block: bool = True,
        skip_hidden_states: Sequence[int] = (3, 6, 9),
        spatial_dims: int = 3,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(skip_hidden_states) != 3 or not all(0 <= i < num_layers for i in skip_hidden_states):
            raise ValueError(
                f"skip_hidden_states must be three 0-based block-output indices in 0..{num_layers - 1}, got {skip_hidden_states}."
            )
        self.skip_hidden_states = tuple(skip_hidden_states)
        self.encoder = ViTEncoder(
            in_channels,
            img_size,
            self.patch_size,
            spatial_dims,
            hidden_size,
            num_layers,
            num_heads,
            mlp_ratio,
            drop_path_rate=drop_path_rate,
            learnable_pos_embed=True,
        )
        self.grid_size = self.encoder.grid_size
        f, h, sd = feature_size, hidden_size, spatial_dims
        common = dict(spatial_dims=sd, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=f, stride=1, **common)
        up = dict(stride=1, upsample_kernel_size=2, conv_block=True, **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=h, out_channels=f * 2, num_layer=2, **up)
        self.encoder3 = UnetrPrUpBlock(in_channels=h, out_channels=f * 4, num_layer=1, **up)
        self.encoder4 = UnetrPrUpBlock(in_channels=h, out_channels=f * 8, num_layer=0, **up)
        self.decoder5 = UnetrUpBlock(in_channels=h, out_channels=f * 8, upsample_kernel_size=2, **common)
        self.decoder4 = UnetrUpBlock(in_channels=f * 8, out_channels=f * 4, upsample_kernel_size=2, **common)
        self.decoder3 = UnetrUpBlock(in_channels=f * 4, out_channels=f * 2, upsample_kernel_size=2, **common)
        self.decoder2 = UnetrUpBlock(in_channels=f * 2, out_channels=f, upsample_kernel_size=2, **common)
        self.out = UnetOutBlock(spatial_dims=sd, in_channels=f, out_channels=out_channels)
        set_activation_checkpointing(self, activation_checkpointing)

    def tokens_to_volume(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) -> (N, D, *grid_size)."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid_size)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x, hidden_states = self.encoder(x_in)
        s1, s2, s3 = (self.tokens_to_volume(hidden_states[i]) for i in self.skip_hidden_states)
        enc1 = self.encoder1(x_in)
        enc2 = self.encoder2(s1)
        enc3 = self.encoder3(s2)
        enc4 = self.encoder4(s3)
        dec4 = self.tokens_to_volume(x[:, 1:])
        dec3 = self.decoder5(dec4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))
