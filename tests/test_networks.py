"""The MAE and ViT follow the MAE paper and the original SelfMedMAE code exactly: patch order, sine-cosine
tables, masking, loss."""

import math

import pytest
import torch

from selfmedmae_components.networks import UNETR, MaskedAutoencoder, ViTClassifier, ViTEncoder, sincos_pos_embed

TINY = dict(
    hidden_size=48, num_layers=2, num_heads=4, decoder_hidden_size=48, decoder_num_layers=1, decoder_num_heads=4
)


def tiny_mae(spatial_dims=3, in_channels=1, img_size=32, mask_ratio=0.75):
    return MaskedAutoencoder(in_channels, img_size, 16, spatial_dims, mask_ratio=mask_ratio, **TINY)


@pytest.mark.parametrize("spatial_dims,in_channels", [(3, 1), (3, 4), (2, 3)])
def test_patchify_unpatchify_round_trip(spatial_dims, in_channels):
    mae = tiny_mae(spatial_dims, in_channels)
    imgs = torch.randn(2, in_channels, *([32] * spatial_dims))
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 2**spatial_dims, in_channels * 16**spatial_dims)
    assert torch.equal(mae.unpatchify(patches), imgs)


def test_patchify_order_tokens_row_major_channel_fastest():
    mae = tiny_mae(3, in_channels=2)
    imgs = torch.randn(1, 2, 32, 32, 32)
    patches = mae.patchify(imgs)
    # token t = (i, j, k) row-major over the 2x2x2 grid; value index ((p1 * 16 + p2) * 16 + p3) * C + c
    i, j, k, p1, p2, p3, c = 1, 0, 1, 3, 7, 11, 1
    t = (i * 2 + j) * 2 + k
    v = ((p1 * 16 + p2) * 16 + p3) * 2 + c
    assert patches[0, t, v] == imgs[0, c, i * 16 + p1, j * 16 + p2, k * 16 + p3]


@pytest.mark.parametrize("grid,dim", [((6, 6, 6), 768), ((14, 14), 96), ((2, 3, 4), 48)])
def test_sincos_table_matches_formula(grid, dim):
    table = sincos_pos_embed(grid, dim, cls_token=True)[0]
    assert table.shape == (1 + math.prod(grid), dim)
    assert torch.all(table[0] == 0)  # cls slot
    d = dim // (2 * len(grid))
    positions = torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(-1, len(grid))  # row-major ('ij')
    for token in (0, 5, math.prod(grid) - 1):
        expected = []
        for axis in range(len(grid)):
            pos = positions[token, axis].item()
            expected += [math.sin(pos / 10000 ** (kk / d)) for kk in range(d)]
            expected += [math.cos(pos / 10000 ** (kk / d)) for kk in range(d)]
        assert torch.allclose(table[1 + token], torch.tensor(expected), atol=1e-6)


def test_sincos_rejects_width_not_divisible():
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_pos_embed((6, 6, 6), 100)


@pytest.mark.parametrize("mask_ratio,visible", [(0.75, 54), (0.125, 189)])
def test_masking_keeps_paper_token_counts_per_sample(mask_ratio, visible):
    mae = MaskedAutoencoder(1, 96, 16, 3, mask_ratio=mask_ratio, **TINY)
    x = torch.randn(3, 216, 8)
    x_visible, mask, ids_restore = mae.random_masking(x, mask_ratio)
    assert x_visible.shape == (3, visible, 8)
    assert torch.all(mask.sum(1) == 216 - visible)
    assert not torch.equal(mask[0], mask[1])  # an independent permutation per sample
    # the visible tokens are exactly the unmasked ones, in shuffled order
    for n in range(3):
        kept = x[n][mask[n] == 0]
        assert torch.equal(torch.sort(x_visible[n].sum(1)).values, torch.sort(kept.sum(1)).values)


def test_encoder_processes_only_visible_tokens():
    mae = MaskedAutoencoder(1, 64, 16, 3, mask_ratio=0.75, **TINY)
    latent, mask, _ = mae.forward_encoder(torch.randn(2, 1, 64, 64, 64), 0.75)
    assert latent.shape == (2, 1 + 16, 48)  # cls + 64 * 0.25 visible tokens


@pytest.mark.parametrize("spatial_dims,in_channels", [(3, 1), (3, 4), (2, 3)])
def test_embedding_only_the_visible_patches_equals_embedding_all_then_masking(spatial_dims, in_channels):
    """forward_encoder embeds the kept patches only (a linear map of each flattened patch): the same
    tokens as the patch-embedding convolution over the whole image followed by the gather."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(in_channels, 32, 8, spatial_dims, mask_ratio=0.75, **TINY)
    imgs = torch.randn(2, in_channels, *([32] * spatial_dims))
    ids_keep, mask, _ = mae.masking_ids(2, mae.encoder.num_patches, 0.75, imgs.device)
    all_tokens = mae.encoder.embed_patches(imgs)  # the convolution
    expected = torch.gather(all_tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, all_tokens.shape[-1]))
    torch.testing.assert_close(mae.encoder.embed_patches(imgs, ids_keep), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal((mask == 0).nonzero()[:, 1].reshape(2, -1), torch.sort(ids_keep, dim=1).values)


def test_attention_under_cpu_autocast_matches_monai_sablock():
    """Our attention block (float32 attention inside CPU bf16 autocast) has MONAI's SABlock parameters
    and, without autocast, its exact output; under autocast it stays close to float32."""
    from monai.networks.blocks import SABlock

    from selfmedmae_components.networks.vit import SelfAttention

    torch.manual_seed(0)
    ours, monai_block = SelfAttention(48, 4), SABlock(48, 4, qkv_bias=True, use_flash_attention=True)
    assert ours.state_dict().keys() == monai_block.state_dict().keys()
    monai_block.load_state_dict(ours.state_dict())
    x = torch.randn(2, 27, 48)
    torch.testing.assert_close(ours(x), monai_block(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = ours(x)
    torch.testing.assert_close(fast.float(), monai_block(x), rtol=0.05, atol=0.05)


def test_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    mae = tiny_mae(3)
    imgs = torch.randn(2, 1, 32, 32, 32)
    pred = torch.randn(2, 8, 16**3)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.float)
    loss = mae.forward_loss(imgs, pred, mask)
    changed_visible = pred.clone()
    changed_visible[mask == 0] += 100.0
    assert torch.allclose(mae.forward_loss(imgs, changed_visible, mask), loss)
    changed_masked = pred.clone()
    changed_masked[mask == 1] += 1.0
    assert not torch.allclose(mae.forward_loss(imgs, changed_masked, mask), loss)
    # normalised-pixel target: the loss is zero when the prediction is the per-patch normalised input
    target = mae.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=False) + 1e-6) ** 0.5
    assert mae.forward_loss(imgs, target, mask).item() < 1e-8


def test_mae_trains_on_a_fixed_batch():
    torch.manual_seed(0)
    mae = tiny_mae(3, mask_ratio=0.5)
    g = torch.linspace(0, 6.28, 32)
    x = torch.sin(g[:, None, None] + 2 * g[None, :, None]) * torch.cos(g[None, None, :])  # smooth, predictable
    x = torch.stack([x, x.flip(0)])[:, None]
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same mask every step: the network must fit the masked patches
        loss, _, _ = mae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_mae_init_and_fixed_tables():
    mae = tiny_mae(3)
    assert not mae.encoder.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert torch.all(mae.encoder.patch_embed.bias == 0) and torch.all(mae.decoder_pred.bias == 0)
    assert 0.01 < mae.encoder.cls_token.std().item() < 0.03
    assert mae.encoder.norm.eps == 1e-6


def test_vit_encoder_input_checks():
    enc = ViTEncoder(1, 32, 16, 3, hidden_size=48, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match=r"expects input \(N, 1, 32, 32, 32\)"):
        enc(torch.randn(1, 1, 48, 48, 48))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTEncoder(1, 40, 16, 3)


def test_unetr_and_classifier_shapes_and_learnable_pos_embed():
    unetr = UNETR(1, 14, 32, hidden_size=48, num_layers=3, num_heads=4, skip_hidden_states=(0, 1, 2))
    assert unetr(torch.randn(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
    assert unetr.encoder.pos_embed.requires_grad
    # initialised from the sine-cosine table, zero cls row
    assert torch.allclose(unetr.encoder.pos_embed.data, sincos_pos_embed((2, 2, 2), 48))
    clf = ViTClassifier(3, 14, 32, hidden_size=48, num_layers=2, num_heads=4)
    assert clf(torch.randn(2, 3, 32, 32)).shape == (2, 14)
    with pytest.raises(ValueError, match="skip_hidden_states"):
        UNETR(1, 14, 32, hidden_size=48, num_layers=3, num_heads=4)  # default (3, 6, 9) needs 10 blocks


def test_unetr_skips_are_the_outputs_of_blocks_4_7_10():
    """The decoder's three skip inputs are the outputs of blocks 4, 7 and 10 counted from 1 (hidden_states_out[3],
    [6], [9] in MONAI's UNETR and the original code), cls removed, before the final norm."""
    unetr = UNETR(1, 2, 32, feature_size=8, hidden_size=48, num_layers=12, num_heads=4).eval()
    block_out, skip_in = {}, {}
    for number, block in enumerate(unetr.encoder.blocks, start=1):
        block.register_forward_hook(lambda m, i, out, n=number: block_out.__setitem__(n, out[:, 1:]))
    for name in ("encoder2", "encoder3", "encoder4"):
        getattr(unetr, name).register_forward_pre_hook(lambda m, args, n=name: skip_in.__setitem__(n, args[0]))
    with torch.no_grad():
        unetr(torch.randn(1, 1, 32, 32, 32))
    for name, block_number in (("encoder2", 4), ("encoder3", 7), ("encoder4", 10)):
        assert torch.equal(skip_in[name], unetr.tokens_to_volume(block_out[block_number])), name


def test_encoder_naming_contract_covers_every_tensor():
    """optim.py and the ImageNet loader read the encoder's names through its hooks only: every tensor has a
    timm name and a layer, and the tables and tokens without weight decay are real parameters."""
    enc = ViTEncoder(1, 32, 16, 3, hidden_size=48, num_layers=3, num_heads=4)
    names = list(enc.state_dict())
    assert enc.timm_name("blocks.2.attn.out_proj.weight") == "blocks.2.attn.proj.weight"
    assert enc.timm_name("patch_embed.bias") == "patch_embed.proj.bias"
    assert enc.timm_name("norm.weight") == "norm.weight" and enc.timm_name("cls_token") == "cls_token"
    assert len({enc.timm_name(n) for n in names}) == len(names)
    layers = {n: enc.layer_id(n, 3) for n in names}
    assert layers["patch_embed.weight"] == layers["cls_token"] == layers["pos_embed"] == 0
    assert layers["blocks.0.mlp.linear1.weight"] == 1 and layers["blocks.2.norm2.bias"] == 3
    assert layers["norm.weight"] == 4
    assert enc.no_weight_decay() <= set(names) and enc.no_weight_decay(tokens=False) == {"pos_embed"}
    mae = tiny_mae()
    assert mae.no_weight_decay() <= set(mae.state_dict()) and "mask_token" in mae.no_weight_decay()


def test_defaults_are_the_papers_vit_b16_classifier_unetr_and_mae():
    """REFERENCE.md: ViT-B/16 (768 wide, 12 blocks, 12 heads, MLP 4x), drop path 0.1 when fine-tuning; the classifier
    at 224 with 3 channels and 14 classes; UNETR with feature size 16 and skips (3, 6, 9); the 3D MAE decoder 384 wide
    with 8 blocks of 12 heads. Built with their defaults (a few seconds: ~90M parameters each)."""

    def vit_b(enc, channels, grid):
        assert enc.patch_embed.weight.shape == (768, channels, *[16] * len(grid)) and enc.grid_size == grid
        assert len(enc.blocks) == 12 and enc.blocks[0].attn.num_heads == 12
        assert enc.blocks[0].mlp.linear1.out_features == 3072

    clf = ViTClassifier()
    vit_b(clf.encoder, 3, (14, 14))
    assert clf.head.out_features == 14 and clf.encoder.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert not any(b.activation_checkpointing for b in clf.encoder.blocks)
    del clf
    unetr = UNETR(1, 2, 32)
    vit_b(unetr.encoder, 1, (2, 2, 2))
    assert unetr.skip_hidden_states == (3, 6, 9) and unetr.encoder1.layer.conv1.conv.out_channels == 16
    assert unetr.encoder.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert not any(b.activation_checkpointing for b in unetr.encoder.blocks)
    del unetr
    mae = MaskedAutoencoder(1, 32)
    vit_b(mae.encoder, 1, (2, 2, 2))
    assert mae.decoder_embed.out_features == 384 and len(mae.decoder_blocks) == 8
    assert mae.decoder_blocks[0].attn.num_heads == 12 and mae.mask_ratio == 0.75 and mae.norm_pix_loss


def test_classifier_is_a_linear_head_on_the_normed_cls_token():
    torch.manual_seed(0)
    clf = ViTClassifier(3, 5, 32, hidden_size=48, num_layers=3, num_heads=4, mlp_ratio=2.0, drop_path_rate=0.2).eval()
    enc = clf.encoder
    assert enc.pos_embed.requires_grad and enc.blocks[0].mlp.linear1.out_features == 96
    assert [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert 0 < clf.head.weight.std() < 1e-4 and torch.all(clf.head.bias == 0)  # MAE's near-zero head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clf(x), clf.head(enc(x)[0][:, 0]))
    assert not any(b.activation_checkpointing for b in enc.blocks)
    for net in (
        ViTClassifier(3, 5, 32, hidden_size=48, num_layers=2, num_heads=4, activation_checkpointing=True),
        UNETR(
            1,
            2,
            32,
            hidden_size=48,
            num_layers=3,
            num_heads=4,
            skip_hidden_states=(0, 1, 2),
            activation_checkpointing=True,
        ),
    ):
        assert all(b.activation_checkpointing for b in net.encoder.blocks)


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_unetr_decoder_is_monais(spatial_dims):
    """Every tensor of the convolutional decoder has MONAI's UNETR name and shape (topology, widths, kernels, norms,
    residual blocks); only the encoder differs (ours has the cls token and drop path)."""
    from monai.networks.nets import UNETR as MonaiUNETR

    size = (32,) * spatial_dims
    ours = UNETR(
        2,
        3,
        size,
        feature_size=8,
        hidden_size=48,
        num_layers=3,
        num_heads=4,
        skip_hidden_states=(0, 1, 2),
        spatial_dims=spatial_dims,
    )
    theirs = MonaiUNETR(
        2,
        3,
        size,
        feature_size=8,
        hidden_size=48,
        mlp_dim=192,
        num_heads=4,
        norm_name="instance",
        res_block=True,
        spatial_dims=spatial_dims,
    )
    shapes = lambda net: {k: v.shape for k, v in net.state_dict().items() if not k.startswith(("encoder.", "vit."))}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert ours(torch.randn(1, 2, *size)).shape == (1, 3, *size)


def test_tokens_to_volume_puts_each_token_at_its_grid_position():
    """(N, L, D) row-major tokens -> (N, D, *grid): token (i, j, k) of a 2 x 3 x 4 grid lands at [:, :, i, j, k]."""
    unetr = UNETR(
        1, 2, (32, 48, 64), feature_size=8, hidden_size=48, num_layers=3, num_heads=4, skip_hidden_states=(0, 1, 2)
    )
    x = torch.randn(2, 24, 48)
    vol = unetr.tokens_to_volume(x)
    for i, j, k in ((0, 0, 0), (1, 2, 3), (0, 1, 2)):
        assert torch.equal(vol[:, :, i, j, k], x[:, (i * 3 + j) * 4 + k])


@pytest.mark.parametrize("skips", [(0, 1, 2), (-1, 0, 1), (0, 1)])
def test_unetr_refuses_skips_that_are_not_three_block_outputs(skips):
    with pytest.raises(ValueError) as error:
        UNETR(1, 2, 32, hidden_size=24, num_layers=2, num_heads=4, skip_hidden_states=skips)
    assert str(error.value) == f"skip_hidden_states must be three 0-based block-output indices in 0..1, got {skips}."


def test_unetr_passes_its_mlp_ratio_to_the_encoder():
    net = UNETR(1, 2, 32, hidden_size=24, num_layers=2, num_heads=4, mlp_ratio=2.0, skip_hidden_states=(0, 1, 1))
    assert all(b.mlp.linear1.out_features == 48 for b in net.encoder.blocks)


def test_mae_decoder_takes_the_mask_token_in_the_autocast_dtype():
    """Under bf16 autocast the mask token joins the embedded visible tokens in bf16 (the concatenation stays bf16,
    half the memory), so the decoder sees it rounded to bf16: 1 + 2^-12 arrives as 1.0."""
    from selfmedmae_components.networks import MaskedAutoencoder

    mae = MaskedAutoencoder(
        1,
        32,
        16,
        3,
        hidden_size=24,
        num_layers=1,
        num_heads=4,
        decoder_hidden_size=24,
        decoder_num_layers=1,
        decoder_num_heads=4,
        mask_ratio=0.75,
    )
    with torch.no_grad():
        mae.mask_token.fill_(1 + 2**-12)
        mae.decoder_pos_embed.zero_()
    seen = []
    mae.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    latent, ids_restore = torch.randn(1, 1 + 2, 24), torch.arange(8)[None]  # 2 visible, 6 masked
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            mae.forward_decoder(latent, ids_restore)
    float32, bf16 = seen
    assert torch.equal(float32[0, 3:], torch.full((6, 24), 1 + 2**-12))  # positions 2..7 (after the cls row)
    assert torch.equal(bf16[0, 3:].float(), torch.ones(6, 24))
