"""Fixed sine-cosine position embeddings for 2D and 3D token grids (MAE, He et al. 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sincos_pos_embed(grid_size: Sequence[int], embed_dim: int, cls_token: bool = True) -> torch.Tensor:
    """Sine-cosine table for a row-major token grid, shape (1, L (+1), embed_dim).

    Each spatial axis gets ``d = embed_dim / (2 * ndim)`` frequencies ``omega_k = 1 / 10000^(k/d)``;
    a token at integer grid position (h, w[, z]) gets ``[sin(h w), cos(h w), sin(w w), cos(w w), ...]``.
    Tokens are ordered like ``Conv(...).flatten(2)``: the first axis slowest, the last fastest.

    Args:
        grid_size: tokens along each spatial axis, e.g. (6, 6, 6) for a 96^3 volume with 16^3 patches.
        embed_dim: width of the embedding; must be divisible by ``2 * len(grid_size)``.
        cls_token: prepend a zero row for the cls token.
    """
    ndim = len(grid_size)
    if embed_dim % (2 * ndim) != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by {2 * ndim} for a {ndim}D sine-cosine table.")
    d = embed_dim // (2 * ndim)
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / d)  # (d,)
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid_size], indexing="ij")
    parts = []
    for pos in axes:
        angles = pos.reshape(-1, 1) * omega  # (L, d)
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)  # (L, embed_dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)
