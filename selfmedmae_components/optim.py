"""Optimiser parameter groups: weight-decay exclusions and layer-wise learning-rate decay.

Which parameters are tables and tokens, and which encoder block a parameter belongs to, the networks say
themselves (``no_weight_decay`` and ``ViTEncoder.layer_id``, as in timm and MAE); nothing here spells
their names except ``ENCODER_PREFIX``, the attribute under which every network of this project holds its ViT.
"""

from __future__ import annotations

import math

import torch.nn as nn

from .networks.vit import ENCODER_PREFIX, ViTEncoder
from .wrappers import unwrap


def no_weight_decay_names(model: nn.Module, decay_tokens: bool = False) -> set[str]:
    """Full names of the parameters that ``model``'s modules exempt from weight decay through their
    ``no_weight_decay()`` hook (position tables and learned tokens; with ``decay_tokens`` the tables only)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            own = hook(tokens=False) if decay_tokens else hook()
            names |= {f"{prefix}.{n}" if prefix else n for n in own}
    return names


def _no_weight_decay(name: str, param, exempt: set[str]) -> bool:
    # biases, LayerNorm/InstanceNorm weights and the parameters the networks name are not decayed
    return param.ndim <= 1 or name.endswith(".bias") or name in exempt


def effective_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of MAE: lr = base_lr * global batch / 256."""
    return base_lr * batch_size / 256


# MAE pre-training length (issue: on thousands of series the paper's epoch count is a hundred times the compute)
PAPER_STEPS = 30_000  # the paper's budget: BTCV 10,000 epochs x 3 steps (18 volumes, 6 a step); BraTS 500 x 65 = 32,500
MIN_PASSES = 100  # on a large dataset, at least this many passes over every image (4 crops each)


def default_pretrain_steps(num_images: int, batch_size: int = 6) -> int:
    """The optimiser steps MAE pre-training runs by default on ``num_images`` volumes: the paper's budget on small
    datasets (~30,000 steps: BTCV at 18 volumes, BraTS at 387), and ``MIN_PASSES`` passes over every image where that
    is more (above ~1,800 volumes at 6 a step). A rule of thumb from the paper's two 3-D datasets, not a measured
    optimum; tools/prepare.py writes it into the datalist and every bundle command can override it."""
    return max(PAPER_STEPS, MIN_PASSES * math.ceil(int(num_images) / int(batch_size)))


def epochs_for_steps(steps: int, steps_per_epoch: int) -> int:
    """The epochs that make at least ``steps`` optimiser steps (at least one)."""
    return max(1, math.ceil(int(steps) / max(1, int(steps_per_epoch))))


def global_batch_size(batch_size: int, num_items: int, world_size: int = 1, num_samples: int = 1) -> int:
    """The samples one optimiser step really sees over all ranks: ``batch_size`` items per rank, unless a rank
    has fewer (``num_items`` split evenly over ``world_size`` ranks, as DistributedSampler pads them), times
    ``num_samples`` crops per item. 16 BTCV volumes on 8 ranks give 2 volumes per rank, not the 6 of
    ``batch_size``: the learning rate must follow 2 x 4 x 8 = 64 crops, not 192.
    """
    per_rank = -(-int(num_items) // int(world_size))  # ceil
    return min(int(batch_size), per_rank) * int(num_samples) * int(world_size)


def param_groups_weight_decay(
    model: nn.Module, lr: float, weight_decay: float = 0.05, decay_tokens: bool = False
) -> list[dict]:
    """Two groups, with and without weight decay (MAE pre-training).

    ``decay_tokens`` also decays the cls and mask tokens, as the original SelfMedMAE code did; MAE's
    own code and our default exempt them.
    """
    decay, no_decay = [], []
    exempt = no_weight_decay_names(model, decay_tokens)
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_weight_decay(name, p, exempt) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]


def layer_id(name: str, num_layers: int, encoder: ViTEncoder | type[ViTEncoder] = ViTEncoder) -> int:
    """The layer of a network's parameter ``name``: the encoder's :meth:`ViTEncoder.layer_id` (0 for the
    embedding, b + 1 for block b, num_layers + 1 for the final norm) under ``encoder.``, and num_layers + 1
    for everything outside the encoder (head, UNETR decoder). Wrapper prefixes (DDP's ``module.``,
    torch.compile's ``_orig_mod.``) are ignored."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    if name.startswith(ENCODER_PREFIX):
        return encoder.layer_id(name.removeprefix(ENCODER_PREFIX), num_layers)
    return num_layers + 1


def param_groups_layer_decay(
    model: nn.Module, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75
) -> list[dict]:
    """Parameter groups for fine-tuning a ViT-based network whose encoder is ``model.encoder``.

    Layer i gets ``lr * layer_decay ** (num_layers + 1 - i)``: the embedding ``0.75^13``, block b
    (0-based) ``0.75^(12 - b)``, the final norm, head and decoder ``1.0`` (ViT-B, decay 0.75).
    Each group carries its ``lr_scale``; schedulers multiply the group's initial lr.
    """
    encoder = unwrap(model).encoder
    num_layers = len(encoder.blocks)
    exempt = no_weight_decay_names(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, no_wd = layer_id(name, num_layers, encoder), _no_weight_decay(name, p, exempt)
        if (lid, no_wd) not in groups:
            scale = layer_decay ** (num_layers + 1 - lid)
            groups[(lid, no_wd)] = {
                "params": [],
                "param_names": [],
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_wd else weight_decay,
            }
        groups[(lid, no_wd)]["params"].append(p)
        groups[(lid, no_wd)]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
