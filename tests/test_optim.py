"""Layer-wise LR decay groups and weight-decay exclusions (MAE's fine-tuning recipe)."""

import pytest

from selfmedmae_components.networks import UNETR, MaskedAutoencoder, ViTClassifier
from selfmedmae_components.optim import (
    default_pretrain_steps,
    effective_lr,
    epochs_for_steps,
    global_batch_size,
    layer_id,
    param_groups_layer_decay,
    param_groups_weight_decay,
)


def scales_by_name(groups):
    return {name: (g["lr_scale"], g["weight_decay"]) for g in groups for name in g["param_names"]}


@pytest.mark.parametrize(
    "make",
    [
        lambda: UNETR(1, 14, 32, hidden_size=48, num_layers=12, num_heads=4),
        lambda: ViTClassifier(3, 14, 32, hidden_size=48, num_layers=12, num_heads=4),
    ],
)
def test_layer_decay_scales_of_vit_b_depth(make):
    model = make()
    groups = param_groups_layer_decay(model, lr=1.0, weight_decay=0.05, layer_decay=0.75)
    scales = scales_by_name(groups)
    assert set(scales) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("encoder.patch_embed.weight", "encoder.cls_token", "encoder.pos_embed"):
        assert scales[name][0] == pytest.approx(0.75**13)
    for b in range(12):
        assert scales[f"encoder.blocks.{b}.attn.qkv.weight"][0] == pytest.approx(0.75 ** (12 - b))
    assert scales["encoder.norm.weight"][0] == 1.0
    others = [n for n in scales if not n.startswith("encoder.")]
    assert others and all(scales[n][0] == 1.0 for n in others)  # head / whole UNETR decoder
    for g in groups:
        assert g["lr"] == pytest.approx(g["lr_scale"])


def test_no_weight_decay_on_biases_norms_tokens_and_position_embedding():
    model = ViTClassifier(3, 14, 32, hidden_size=48, num_layers=2, num_heads=4)
    scales = scales_by_name(param_groups_layer_decay(model, lr=1.0))
    for name in (
        "encoder.pos_embed",
        "encoder.cls_token",
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.attn.qkv.bias",
        "head.bias",
    ):
        assert scales[name][1] == 0.0, name
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.weight", "head.weight"):
        assert scales[name][1] == 0.05, name


def test_pretraining_groups_skip_fixed_tables():
    mae = MaskedAutoencoder(
        1,
        32,
        16,
        3,
        hidden_size=48,
        num_layers=1,
        num_heads=4,
        decoder_hidden_size=48,
        decoder_num_layers=1,
        decoder_num_heads=4,
    )
    decay, no_decay = param_groups_weight_decay(mae, lr=1.0)
    ids = {id(p) for p in decay["params"] + no_decay["params"]}
    assert id(mae.encoder.pos_embed) not in ids and id(mae.decoder_pos_embed) not in ids
    assert id(mae.mask_token) in {id(p) for p in no_decay["params"]}
    # the original code decayed the learned tokens (paper.yaml's weight_decay_tokens)
    decay, no_decay = param_groups_weight_decay(mae, lr=1.0, decay_tokens=True)
    decayed = {id(p) for p in decay["params"]}
    assert id(mae.mask_token) in decayed and id(mae.encoder.cls_token) in decayed
    assert not any(p.ndim <= 1 and id(p) in decayed for p in mae.parameters())


def test_layer_id_and_effective_lr():
    assert layer_id("module.encoder.blocks.3.mlp.linear1.weight", 12) == 4
    assert layer_id("decoder5.conv.weight", 12) == 13
    assert effective_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    assert effective_lr(1.6e-3, 24) == pytest.approx(1.5e-4)


@pytest.mark.parametrize(
    "batch, items, ranks, samples, expected",
    [
        (6, 16, 1, 4, 24),  # the paper's step: 6 volumes x 4 crops
        (6, 16, 8, 4, 64),  # 16 BTCV volumes on 8 ranks: 2 volumes each, not 6
        (6, 16, 3, 4, 72),  # 6 per rank after DistributedSampler's padding
        (256, 1000, 2, 1, 512),
    ],
)
def test_global_batch_counts_what_each_rank_really_gets(batch, items, ranks, samples, expected):
    assert global_batch_size(batch, items, ranks, samples) == expected


@pytest.mark.parametrize(
    "bundle, stage", [(b, s) for b in ("btcv_seg", "brats_seg", "cxr14_cls") for s in ("pretrain", "finetune")]
)
def test_configs_scale_the_learning_rate_by_the_real_global_batch(bundle, stage):
    from bundle_runner import REPO
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / f"{stage}.yaml"))
    base, batch = parser.get_parsed_content("base_learning_rate"), parser["batch_size"]
    samples = parser["num_samples"] if "num_samples" in parser else 1
    for ranks, items in ((1, 1000), (8, 16)):
        parser["world_size"], parser["train#data"] = ranks, [{}] * items
        parser.parse()  # drop the values resolved with the previous settings
        expected = effective_lr(base, min(batch, -(-items // ranks)) * samples * ranks)
        assert parser.get_parsed_content("learning_rate") == pytest.approx(expected), (ranks, items)


def test_layer_decay_defaults_to_the_papers_and_skips_frozen_parameters():
    model = ViTClassifier(3, 14, 32, hidden_size=48, num_layers=2, num_heads=4)
    model.encoder.blocks[0].attn.qkv.weight.requires_grad_(False)  # frozen, early in the parameter order
    groups = param_groups_layer_decay(model, lr=1.0)
    names = {n for g in groups for n in g["param_names"]}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert scales_by_name(groups)["encoder.patch_embed.weight"][0] == pytest.approx(0.75**3)
    # torch.compile and DDP prefixes, in any nesting, name the same layer
    assert layer_id("_orig_mod.module.encoder.blocks.3.norm1.weight", 12) == 4


@pytest.mark.parametrize(
    "images, batch, steps",
    [(18, 6, 30_000), (387, 6, 30_000), (1_800, 6, 30_000), (2_400, 6, 40_000), (2_401, 6, 40_100), (600, 2, 30_000)],
)
def test_pretraining_steps_are_the_papers_budget_or_100_passes(images, batch, steps):
    """REFERENCE.md: BTCV 10,000 epochs x 3 steps; past ~1,800 volumes at 6 a step, 100 passes over every image."""
    assert default_pretrain_steps(images, batch) == steps


@pytest.mark.parametrize("steps, per_epoch, epochs", [(30_000, 3, 10_000), (10, 3, 4), (0, 5, 1), (7, 0, 7)])
def test_epochs_for_steps_rounds_up_and_never_runs_none(steps, per_epoch, epochs):
    assert epochs_for_steps(steps, per_epoch) == epochs


def test_defaults_of_the_pretraining_groups_and_batch_rule():
    """REFERENCE.md: weight decay 0.05 (none on biases, norms, tables, tokens); one rank, one crop by default."""
    mae = MaskedAutoencoder(
        1,
        32,
        16,
        3,
        hidden_size=48,
        num_layers=1,
        num_heads=4,
        decoder_hidden_size=48,
        decoder_num_layers=1,
        decoder_num_heads=4,
    )
    decay, no_decay = param_groups_weight_decay(mae, lr=0.5)
    assert {k: v for k, v in decay.items() if k != "params"} == {"weight_decay": 0.05, "lr": 0.5}
    assert {k: v for k, v in no_decay.items() if k != "params"} == {"weight_decay": 0.0, "lr": 0.5}
    assert global_batch_size(6, 16) == 6 and default_pretrain_steps(2_400) == 40_000
