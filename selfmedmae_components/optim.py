"""Optimiser parameter groups: weight-decay exclusions and layer-wise learning-rate decay."""

from __future__ import annotations

import torch.nn as nn

from .wrappers import unwrap

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def _no_weight_decay(name: str, param, decay_tokens: bool = False) -> bool:
    # biases, LayerNorm/InstanceNorm weights and (unless decay_tokens) the learned tokens are not decayed
    exempt = NO_DECAY_NAMES if not decay_tokens else ("pos_embed",)
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in exempt


def effective_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of MAE: lr = base_lr * global batch / 256."""
    return base_lr * batch_size / 256


def global_batch_size(batch_size: int, num_items: int, world_size: int = 1, num_samples: int = 1) -> int:
    """The samples one optimiser step really sees over all ranks: ``batch_size`` items per rank, unless a rank
    has fewer (``num_items`` split evenly over ``world_size`` ranks, as DistributedSampler pads them), times
    ``num_samples`` crops per item. 16 BTCV volumes on 8 ranks give 2 volumes per rank, not the 6 of
    ``batch_size``: the learning rate must follow 2 x 4 x 8 = 64 crops, not 192.
    """
    per_rank = -(-int(num_items) // int(world_size))  # ceil
    return min(int(batch_size), per_rank) * int(num_samples) * int(world_size)


def param_groups_weight_decay(model: nn.Module, lr: float, weight_decay: float = 0.05, decay_tokens: bool = False) -> list[dict]:
    """Two groups, with and without weight decay (MAE pre-training).

    ``decay_tokens`` also decays the cls and mask tokens, as the original SelfMedMAE code did; MAE's
    own code and our default exempt them.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_weight_decay(name, p, decay_tokens) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embedding (patch embedding, cls, position), b + 1 for encoder block b, and
    num_layers + 1 for everything after the blocks (final norm, head, UNETR decoder)."""
    name = name.removeprefix("module.")
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def param_groups_layer_decay(
    model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75
) -> list[dict]:
    """Parameter groups for fine-tuning a ViT-based network whose encoder is ``model.encoder``.

    Layer i gets ``lr * layer_decay ** (num_layers + 1 - i)``: the embedding ``0.75^13``, block b
    (0-based) ``0.75^(12 - b)``, the final norm, head and decoder ``1.0`` (ViT-B, decay 0.75).
    Each group carries its ``lr_scale``; schedulers multiply the group's initial lr.
    """
    module = unwrap(model)
    num_layers = len(module.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, no_wd = layer_id(name, num_layers), _no_weight_decay(name, p)
        if (lid, no_wd) not in groups:
            scale = layer_decay ** (num_layers + 1 - lid)
            groups[(lid, no_wd)] = {
                "params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale,
                "weight_decay": 0.0 if no_wd else weight_decay,
            }  # fmt: skip
        groups[(lid, no_wd)]["params"].append(p)
        groups[(lid, no_wd)]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
