"""ImageNet initialisation of our ViT encoder (the paper's "UNETR+ImageNet" and "ViT+ImageNet" rows).

The user supplies a ViT-B/16 ImageNet checkpoint (nothing is downloaded). Accepted:

- timm names (``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``, ``blocks.i.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``; the head is ignored), as saved by
  ``torch.save(timm.create_model("vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained=True).state_dict(), ...)``;
  timm also converts Google's official JAX ``.npz`` files this way.
- Hugging Face ``transformers`` ViT names (``vit.embeddings.patch_embeddings.projection``,
  ``vit.encoder.layer.i.attention.attention.{query,key,value}``, ... , ``vit.layernorm``).

as ``.pth`` / ``.pt`` / ``.bin`` (read with ``weights_only=True``) or ``.safetensors`` (needs the
``safetensors`` package). Every encoder tensor must be present with the width and depth of the
model; anything else (a ViT-L into a ViT-B, a /32 patch, layer-scale variants) is refused.

Conversion rules (documented in docs/REPRODUCE.md):

- **Patch embedding, channels.** RGB is kept for a 3-channel target (chest X-rays replicated to 3
  channels). For C != 3 input channels each channel gets the sum of the RGB kernels divided by C
  (i.e. mean over RGB x 3/C): an image whose C channels all hold the grey value g then gives the
  same response as the RGB image (g, g, g) (timm's rule for C = 1, made channel-count independent).
- **Patch embedding, depth (3D).** I3D inflation: the 2D kernel is repeated along the third axis and
  divided by the patch depth, so a volume constant along depth gives the 2D response.
- **Orientation (3D).** Volumes are RAS (axis 2 superior-inferior). The 2D (row, column) axes map to
  the axial plane the way this project displays it (``handlers.reconstruction_panel``): column -> x
  (axis 0), row -> y (axis 1) flipped, so that an axial slice shown as an image looks to the kernels
  like a natural image. The same mapping is applied to the position grid. 2D targets use the
  ImageNet (row, column) layout unchanged.
- **Position embedding.** The 14 x 14 patch grid is resampled bicubically (``align_corners=False``,
  as timm) to the target's in-plane grid; for 3D it is then repeated along depth (ImageNet holds no
  depth information; the table is learnable during fine-tuning). The cls row is copied as is (zero
  when the checkpoint has none).
- ``num_heads`` cannot be read off the tensors: the model must use the checkpoint's (12 for ViT-B).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..wrappers import unwrap
from .checkpoint import CheckpointError, load_state_dict
from .transfer import ENCODER_PREFIX, TransferReport

logger = logging.getLogger(__name__)

# Checkpoints are read in timm's names; the encoder maps its own names to them (ViTEncoder.timm_name).
# Hugging Face block tensor -> timm block tensor (query/key/value are concatenated into qkv)
_HF_BLOCK_KEYS = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


@dataclass
class ImageNetReport(TransferReport):
    """A ``TransferReport`` that also states how 2D tensors were converted."""

    conversions: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *(f"  converted   {c}" for c in self.conversions)])


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` (with the ``safetensors`` package) or a PyTorch file (weights only)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Give the ImageNet ViT-B/16 weights you downloaded.")
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a .safetensors file: `pip install safetensors` to read it, or save it as .pth with "
            f"torch.save(state_dict)."
        ) from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"Cannot read {path} as safetensors: {e}") from e


def to_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ViT state dict to timm names (a timm state dict is returned unchanged)."""
    if "patch_embed.proj.weight" in state:
        return state
    hf = {k.removeprefix("vit."): v for k, v in state.items()}
    if "embeddings.patch_embeddings.projection.weight" not in hf:
        return state  # not recognised: the caller reports what is missing
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        if key == "embeddings.patch_embeddings.projection.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "embeddings.patch_embeddings.projection.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key.startswith("layernorm."):
            out["norm." + key.split(".", 1)[1]] = value
        elif (m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)) is not None:
            i, name, kind = m.groups()
            if name in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                if name.endswith("query"):  # q, k, v stacked in timm's qkv order
                    parts = [hf[f"encoder.layer.{i}.attention.attention.{p}.{kind}"] for p in ("query", "key", "value")]
                    out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
            else:
                out[f"blocks.{i}.{_HF_BLOCK_KEYS.get(name, name)}.{kind}"] = value
        else:
            out[key] = value  # classifier.*: dropped later
    return out


def inflate_patch_embed(weight: torch.Tensor, in_channels: int, patch_size: tuple[int, ...]) -> torch.Tensor:
    """(D, 3, ph, pw) ImageNet kernel -> (D, in_channels, *patch_size) (2D or 3D; rules in the module docstring)."""
    if weight.shape[1] != in_channels:
        weight = weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels
    if len(patch_size) == 3:
        weight = weight.flip(-2).transpose(-2, -1)  # (row, col) -> (x, y) of an RAS axial slice
        weight = weight.unsqueeze(-1).repeat(1, 1, 1, 1, patch_size[2]) / patch_size[2]
    return weight.contiguous()


def resample_pos_embed(pos: torch.Tensor, grid_size: tuple[int, ...]) -> torch.Tensor:
    """(1, [1 +] H*W, D) ImageNet table -> (1, 1 + prod(grid_size), D) with a cls row (rules in the module docstring)."""
    n, dim = pos.shape[1], pos.shape[2]
    side = math.isqrt(n)
    has_cls = side * side != n
    if has_cls:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise CheckpointError(f"pos_embed of length {n} is not a square patch grid (with or without a cls row).")
    cls, grid = (pos[:, :1], pos[:, 1:]) if has_cls else (pos.new_zeros(1, 1, dim), pos)
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()  # (1, D, rows, cols)
    if len(grid_size) == 2:
        grid = F.interpolate(grid, size=grid_size, mode="bicubic", align_corners=False)
    else:
        gx, gy, gz = grid_size
        grid = F.interpolate(grid, size=(gy, gx), mode="bicubic", align_corners=False)
        grid = grid.flip(-2).transpose(-2, -1)  # (rows, cols) -> (x, y), as the patch kernel
        grid = grid.unsqueeze(-1).repeat(1, 1, 1, 1, gz)  # the same in-plane table at every depth
    grid = grid.flatten(2).transpose(1, 2).to(pos.dtype)  # row-major over the grid, as our tokens
    return torch.cat([cls, grid], dim=1)


def load_imagenet_vit(network: nn.Module, checkpoint: str | Path, prefix: str = ENCODER_PREFIX) -> ImageNetReport:
    """Load an ImageNet ViT checkpoint (timm or Hugging Face names) into the ``encoder`` of a UNETR /
    classifier, inflating 2D tensors to the encoder's dimensions. Returns (and prints) the report."""
    module = unwrap(network)
    encoder = getattr(module, prefix.rstrip("."), None)
    if encoder is None or not hasattr(encoder, "timm_name"):
        raise CheckpointError(f"The network has no ViT '{prefix.rstrip('.')}' to load {checkpoint} into.")
    source = to_timm_names(read_checkpoint(checkpoint))
    target = encoder.state_dict()
    dim, depth = encoder.hidden_size, len(encoder.blocks)

    # which checkpoint tensor feeds which encoder tensor
    plan = {key: encoder.timm_name(key) for key in target}
    if (
        "norm.weight" not in source and "fc_norm.weight" in source
    ):  # timm global-pool models keep the final norm as fc_norm
        plan = {key: "fc_" + src if src.startswith("norm.") else src for key, src in plan.items()}
    ours = {src: key for key, src in plan.items()}  # the encoder's names of the tensors converted below
    missing = [f"{src} (for {key})" for key, src in plan.items() if src not in source]
    if len(missing) == len(plan):
        raise CheckpointError(
            f"{checkpoint} is not a ViT checkpoint with timm or Hugging Face names (no 'patch_embed.proj.weight', "
            f"'blocks.0.attn.qkv.weight', ...). First keys: {list(source)[:8]}"
        )
    src_depth = len({k.split(".")[1] for k in source if k.startswith("blocks.")})
    src_dim = source["cls_token"].shape[-1] if "cls_token" in source else None
    if (src_dim is not None and src_dim != dim) or src_depth != depth:
        raise CheckpointError(
            f"{checkpoint} is a ViT of width {src_dim} with {src_depth} blocks, but the model's encoder has width "
            f"{dim} and {depth} blocks (ViT-B/16: 768 and 12; a ViT-S/L checkpoint does not fit a ViT-B)."
        )
    unused_block = [k for k in source if k.startswith("blocks.") and k not in plan.values()]
    if missing or unused_block:
        raise CheckpointError(
            f"{checkpoint} does not match the ViT encoder: missing {missing}; block tensors this encoder has no "
            f"place for (layer scale, other variants) {unused_block}"
        )

    new: dict[str, torch.Tensor] = {}
    conversions = []
    w2d = source["patch_embed.proj.weight"]
    patch_size = tuple(encoder.patch_size)
    if w2d.ndim != 4 or tuple(w2d.shape[2:]) != patch_size[:2] or len(set(patch_size)) != 1:
        raise CheckpointError(
            f"{checkpoint}: patch embedding {tuple(w2d.shape)} does not fit the encoder's patch size {patch_size} "
            f"(expected (D, 3, p, p) with p = the model's patch size)."
        )
    patch_key, pos_key, cls_key = ours["patch_embed.proj.weight"], ours["pos_embed"], ours["cls_token"]
    new[patch_key] = inflate_patch_embed(w2d.float(), encoder.in_channels, patch_size)
    rule = "kept RGB" if w2d.shape[1] == encoder.in_channels else f"RGB summed / {encoder.in_channels}"
    if len(patch_size) == 3:
        rule += f", repeated over depth / {patch_size[2]} (I3D)"
    conversions.append(f"patch embedding {tuple(w2d.shape)} -> {tuple(new[patch_key].shape)}: {rule}")
    new[pos_key] = resample_pos_embed(source["pos_embed"].float(), tuple(encoder.grid_size))
    old_grid = math.isqrt(source["pos_embed"].shape[1])
    how = "bicubic" if len(patch_size) == 2 else "bicubic in-plane, repeated over depth"
    conversions.append(
        f"position grid {old_grid}x{old_grid} -> {'x'.join(map(str, encoder.grid_size))} ({how}); cls row copied"
    )
    for key, src in plan.items():
        if key not in new:
            new[key] = source[src].reshape(target[key].shape) if key == cls_key else source[src]
    mismatched = [
        f"{key}: {tuple(new[key].shape)} vs model {tuple(target[key].shape)}"
        for key in plan
        if new[key].shape != target[key].shape
    ]
    if mismatched:
        raise CheckpointError(f"{checkpoint} does not fit the encoder after conversion: {mismatched}")
    encoder.load_state_dict({k: v.to(target[k].dtype) for k, v in new.items()}, strict=True)

    used = set(plan.values())
    report = ImageNetReport(
        source=f"{checkpoint} (ImageNet ViT)",
        loaded=[prefix + k for k in plan],
        dropped=[k for k in source if k not in used],
        initialised=[k for k in module.state_dict() if not k.startswith(prefix)],
        conversions=conversions,
    )
    logger.info(str(report))
    print(report, flush=True)
    return report
