"""Masked autoencoder (He et al. 2022) for 2D and 3D medical images.

The methods are the paper's steps; shapes use N batch, C channels, L tokens, D width,
P = C * prod(patch_size) values per patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .pos_embed import sincos_pos_embed
from .vit import LAYER_NORM_EPS, TransformerBlock, ViTEncoder, init_vit_weights, set_activation_checkpointing


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder that sees only the visible tokens and a light transformer decoder.

    Args:
        in_channels: image channels (1 for CT, 4 for BraTS, 3 for chest X-ray).
        img_size: input size (ROI) per spatial axis.
        patch_size: patch edge length.
        spatial_dims: 2 or 3.
        hidden_size, num_layers, num_heads, mlp_ratio: encoder (ViT-B: 768, 12, 12, 4).
        decoder_hidden_size, decoder_num_layers, decoder_num_heads: decoder (3D: 384, 8, 12; 2D: 256, 8, 8).
        mask_ratio: fraction of tokens masked when ``forward`` is called without one: a default for direct
            calls only. Training passes its own at every step (``engines.MAETrainingStep`` owns the ratio;
            the bundles set it there), so this value does not act in a bundle run.
        norm_pix_loss: regress each patch normalised by its own mean and variance (the paper's target).
        activation_checkpointing: recompute the encoder's and decoder's transformer blocks' activations in the backward pass
            (less memory, a second forward of the blocks; :func:`set_activation_checkpointing`).

    Example::

        mae = MaskedAutoencoder(in_channels=1, img_size=96, spatial_dims=3, mask_ratio=0.125)
        loss, pred, mask = mae(torch.randn(2, 1, 96, 96, 96))  # pred (2, 216, 4096), mask (2, 216)
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int = 16,
        spatial_dims: int = 3,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        decoder_hidden_size: int = 384,
        decoder_num_layers: int = 8,
        decoder_num_heads: int = 12,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        self.encoder = ViTEncoder(
            in_channels,
            img_size,
            patch_size,
            spatial_dims,
            hidden_size,
            num_layers,
            num_heads,
            mlp_ratio,
            learnable_pos_embed=False,
        )
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = self.encoder.patch_size
        self.grid_size = self.encoder.grid_size
        self.patch_dim = in_channels * int(torch.tensor(self.patch_size).prod())

        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(self.grid_size, decoder_hidden_size, cls_token=True), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(decoder_hidden_size, decoder_num_heads, mlp_ratio) for _ in range(decoder_num_layers)
        )
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(decoder_hidden_size, self.patch_dim)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        set_activation_checkpointing(self, activation_checkpointing)

    def no_weight_decay(self, tokens: bool = True) -> set[str]:
        """The decoder's parameters without weight decay besides biases and norm weights (the encoder names
        its own: :meth:`ViTEncoder.no_weight_decay`): its position table and, with ``tokens``, the mask token."""
        return {"decoder_pos_embed", "mask_token"} if tokens else {"decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, *img_size) -> (N, L, P); tokens row-major over the grid, values ordered [p1, (p2,) p3, C]."""
        nd = len(self.grid_size)
        # (N, C, g1, p1, g2, p2, ...) -> (N, g1, g2, ..., p1, p2, ..., C)
        x = self.encoder.split_patches(imgs).permute(0, *range(2, 2 + 2 * nd, 2), *range(3, 3 + 2 * nd, 2), 1)
        return x.reshape(imgs.shape[0], self.encoder.num_patches, self.patch_dim)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, P) -> (N, C, *img_size); the inverse of ``patchify``."""
        n, nd = x.shape[0], len(self.grid_size)
        c = self.patch_dim // int(torch.tensor(self.patch_size).prod())
        x = x.reshape(n, *self.grid_size, *self.patch_size, c)
        # (N, g1, g2, ..., p1, p2, ..., C) -> (N, C, g1, p1, g2, p2, ...)
        order = [0, 1 + 2 * nd]
        for i in range(nd):
            order += [1 + i, 1 + nd + i]
        x = x.permute(order)
        return x.reshape(n, c, *self.encoder.img_size)

    @staticmethod
    def masking_ids(n: int, length: int, mask_ratio: float, device: torch.device) -> tuple[torch.Tensor, ...]:
        """A random subset of tokens per sample (argsort of uniform noise, on ``device``).

        Returns ids_keep (N, L_keep), the mask (N, L; 1 = masked) and ids_restore (N, L).
        """
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(n, length, device=device)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore

    def random_masking(self, x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of the tokens x (N, L, D): visible tokens (N, L_keep, D), mask, ids_restore."""
        ids_keep, mask, ids_restore = self.masking_ids(x.shape[0], x.shape[1], mask_ratio, x.device)
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2])), mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, embed and encode the visible patches only: latent (N, 1 + L_keep, D), mask, ids_restore."""
        ids_keep, mask, ids_restore = self.masking_ids(imgs.shape[0], self.encoder.num_patches, mask_ratio, imgs.device)
        x = self.encoder.embed_patches(imgs, ids_keep)  # (N, L_keep, D), position embedding added
        latent, _ = self.encoder.forward_tokens(x)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Fill masked positions with the mask token, unshuffle, decode: (N, L, P)."""
        x = self.decoder_embed(latent)  # (N, 1 + L_keep, Dd)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd), still in shuffled order
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (in float32)."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:  # each patch by its own mean and biased variance, all channels jointly
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, unbiased=False)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L) per-patch loss
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the loss, the predicted patches (N, L, P) and the mask (N, L; 1 = masked)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
