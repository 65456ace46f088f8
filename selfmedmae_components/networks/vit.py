"""ViT encoder with a cls token, drop path and a (fixed or learnable) sine-cosine position embedding.

The same module is the MAE encoder (fixed table, visible tokens only) and the backbone of the
fine-tuned UNETR and classifier (learnable table initialised from the sine-cosine values), so MAE
weights transfer by name with no key mapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, SABlock
from monai.networks.layers import Conv, DropPath
from monai.utils import ensure_tuple_rep
from torch.utils.checkpoint import checkpoint

from ..config_helpers import as_bool
from .pos_embed import sincos_pos_embed

LAYER_NORM_EPS = 1e-6
# UNETR, ViTClassifier and MaskedAutoencoder hold their ViTEncoder as `encoder`: the prefix of its tensors in
# their state dicts, which the MAE -> fine-tuning transfer and the optimiser groups rely on
ENCODER_PREFIX = "encoder."


class SelfAttention(SABlock):
    """MONAI's SABlock (same parameters and names) with ``scaled_dot_product_attention``, which under
    CPU bf16 autocast attends in float32 when training: for ViT token counts (55-513) the backward of
    PyTorch's CPU flash attention is about 2x slower in bf16 than in float32 (tools/benchmark.py), and
    float32 is exact. The projections around it stay in bf16. Elsewhere (GPU, float32, inference) it
    is SABlock unchanged.
    """

    def __init__(self, hidden_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__(hidden_size, num_heads, qkv_bias=qkv_bias, use_flash_attention=True)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        training = torch.is_grad_enabled() and x.requires_grad  # the backward is the slow part in bf16
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or attn_mask is not None or not training:
            return super().forward(x, attn_mask)
        q, k, v = self.input_rearrange(self.qkv(x))
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), scale=self.scale, dropout_p=self.dropout_rate if self.training else 0.0
            )
        return self.drop_output(self.out_proj(self.out_rearrange(out)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(MSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``.

    Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (:class:`SelfAttention`).
    With ``activation_checkpointing`` (see :func:`set_activation_checkpointing`), a forward pass that
    builds a graph keeps only the block's input and runs the block again in the backward pass.
    """

    activation_checkpointing = False

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = MLPBlock(hidden_size, int(hidden_size * mlp_ratio), act="GELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            # the recomputation restores the RNG (same drop-path masks) and the autocast state: same gradients
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def set_activation_checkpointing(module: nn.Module, enabled: bool | str = True) -> nn.Module:
    """Activation checkpointing on (or off) for every transformer block in ``module``: in training, each
    block keeps only its input and runs its forward again in the backward pass. The blocks' activations
    (about a third of UNETR's at 96^3, nearly all of a ViT classifier's) give way to a second forward of
    the blocks; the gradients are the same."""
    for m in module.modules():
        if isinstance(m, TransformerBlock):
            m.activation_checkpointing = as_bool(enabled)
    return module


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linear layers, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """Vision Transformer encoder (ViT-B by default) for 2D or 3D images.

    Args:
        in_channels: image channels.
        img_size: input size (ROI) per spatial axis; must be divisible by ``patch_size``.
        patch_size: patch edge length (16 in the paper).
        spatial_dims: 2 or 3.
        hidden_size: token width (768 for ViT-B).
        num_layers: transformer blocks (12).
        num_heads: attention heads (12).
        mlp_ratio: MLP width / token width (4).
        qkv_bias: bias in the qkv projection.
        drop_path_rate: stochastic depth, increasing linearly over the blocks up to this value.
        learnable_pos_embed: False for MAE pre-training (fixed table), True for fine-tuning.

    Example::

        enc = ViTEncoder(in_channels=1, img_size=96, spatial_dims=3)
        tokens, hidden = enc(torch.randn(2, 1, 96, 96, 96))  # (2, 217, 768), 12 x (2, 216, 768)

    Naming contract: code outside this class reads the encoder's parameter names only through the hooks
    below, as timm's and MAE's ViTs offer them: :meth:`no_weight_decay` (the optimiser's weight-decay
    exclusions), :meth:`layer_id` (layer-wise learning-rate decay) and :meth:`timm_name` (ImageNet ViT
    checkpoints, ``weights/imagenet.py``). Inside a block the names are MONAI's (``attn.qkv``,
    ``attn.out_proj``, ``mlp.linear1``, ...).
    """

    # the embedding: layer 0 of layer-wise learning-rate decay
    EMBEDDING = ("patch_embed", "cls_token", "pos_embed")
    # our names -> timm's VisionTransformer names, outside the blocks and inside a block (before .weight/.bias)
    TIMM_NAMES = {"patch_embed": "patch_embed.proj", "cls_token": "cls_token", "pos_embed": "pos_embed", "norm": "norm"}
    TIMM_BLOCK_NAMES = {
        "norm1": "norm1",
        "attn.qkv": "attn.qkv",
        "attn.out_proj": "attn.proj",
        "norm2": "norm2",
        "mlp.linear1": "mlp.fc1",
        "mlp.linear2": "mlp.fc2",
    }

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
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        learnable_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        for i, p in zip(self.img_size, self.patch_size):
            if i % p != 0:
                raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = int(torch.tensor(self.grid_size).prod())

        self.patch_embed = Conv[Conv.CONV, spatial_dims](
            in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        # cls row is zero; patch rows are the sine-cosine table (learnable only when fine-tuning)
        self.pos_embed = nn.Parameter(
            sincos_pos_embed(self.grid_size, hidden_size, cls_token=True), requires_grad=learnable_pos_embed
        )
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self._init_weights()

    def no_weight_decay(self, tokens: bool = True) -> set[str]:
        """Parameters (names relative to the encoder) the optimiser does not decay besides biases and norm
        weights, as timm's ``no_weight_decay()``: the position table and, with ``tokens``, the cls token."""
        return {"pos_embed", "cls_token"} if tokens else {"pos_embed"}

    @classmethod
    def layer_id(cls, name: str, num_layers: int) -> int:
        """The layer of parameter ``name`` (relative to the encoder) for layer-wise learning-rate decay, as
        MAE's ``get_layer_id_for_vit``: 0 for the embedding (patch embedding, cls token, position table),
        b + 1 for block b (0-based), ``num_layers + 1`` after the blocks (the final norm)."""
        if name.split(".")[0] in cls.EMBEDDING:
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return num_layers + 1

    @classmethod
    def timm_name(cls, name: str) -> str:
        """timm's name of the encoder tensor ``name``: ``patch_embed.weight`` -> ``patch_embed.proj.weight``,
        ``blocks.3.attn.out_proj.bias`` -> ``blocks.3.attn.proj.bias``. KeyError for a tensor timm has no
        counterpart of."""
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            inner, _, kind = rest.rpartition(".")
            return f"blocks.{i}.{cls.TIMM_BLOCK_NAMES[inner]}.{kind}"
        inner, _, kind = name.rpartition(".")
        return cls.TIMM_NAMES[name] if not inner else f"{cls.TIMM_NAMES[inner]}.{kind}"

    def _init_weights(self) -> None:
        self.apply(init_vit_weights)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def split_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *img_size) -> (N, C, g1, p1, g2, p2, ...): the patch grid as axes, for patchify orders."""
        split = list(x.shape[:2])
        for g, p in zip(self.grid_size, self.patch_size):
            split += [g, p]
        return x.reshape(split)

    def embed_patches(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, *img_size) -> (N, L, D) patch tokens with their position embedding added; with
        ``ids_keep`` (N, L_keep), only those patches: (N, L_keep, D), as embedding all then gathering."""
        # not while tracing (TorchScript export): the traced graph holds the one input shape anyway
        if not torch.jit.is_tracing() and (tuple(x.shape[2:]) != self.img_size or x.shape[1] != self.in_channels):
            raise ValueError(
                f"ViTEncoder expects input (N, {self.in_channels}, {', '.join(map(str, self.img_size))}), "
                f"got {tuple(x.shape)}."
            )
        if ids_keep is None:
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            return x + self.pos_embed[:, 1:]
        # MAE: the stride-p convolution is a linear map of each flattened patch, so the masked patches
        # (75 % at the MAE default) need not be embedded at all, forward or backward
        nd = self.spatial_dims
        # (N, C, g1, p1, g2, p2, ...) -> (N, g1, g2, ..., C, p1, p2, ...): the conv weight's (C, p1, ...) order
        patches = self.split_patches(x).permute(0, *range(2, 2 + 2 * nd, 2), 1, *range(3, 3 + 2 * nd, 2))
        patches = patches.reshape(x.shape[0], self.num_patches, -1)
        patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        tokens = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        return tokens + self.pos_embed[0, 1:][ids_keep]

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prepend the cls token to (N, L', D) tokens and run the blocks.

        Returns the normed tokens (N, 1 + L', D) and every block's output before the norm, cls removed.
        """
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        hidden_states = []
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x[:, 1:])
        return self.norm(x), hidden_states

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.forward_tokens(self.embed_patches(x))
