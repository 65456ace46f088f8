"""The ViT encoder against what it must equal: timm's ViT layout and defaults, MAE's initialisation, the
patch embedding of a kept-patch subset, and the float32 attention of CPU bf16 training."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import SABlock

from selfmedmae_components.networks.vit import SelfAttention, TransformerBlock, ViTEncoder, set_activation_checkpointing


def test_defaults_are_vit_b16_3d_with_timms_tensor_layout():
    """ViT-B/16 (the paper's encoder): 12 blocks of width 768, 12 heads, MLP 3072, LayerNorm eps 1e-6 and qkv bias
    (timm's), learnable position table, no drop path; tensors shaped as timm's (cls token (1, 1, D))."""
    enc = ViTEncoder(in_channels=1, img_size=32)
    assert enc.spatial_dims == 3 and enc.patch_size == (16, 16, 16) and enc.grid_size == (2, 2, 2)
    assert len(enc.blocks) == 12 and enc.hidden_size == 768 and enc.blocks[0].attn.num_heads == 12
    assert enc.blocks[0].mlp.linear1.out_features == 3072
    assert enc.blocks[0].attn.qkv.bias is not None
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in enc.blocks)
    assert enc.pos_embed.requires_grad
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-6 for m in norms)
    assert enc.cls_token.shape == (1, 1, 768) and enc.pos_embed.shape == (1, 1 + 8, 768)
    assert enc.patch_embed.weight.shape == (768, 1, 16, 16, 16)
    assert isinstance(enc.blocks[0].mlp.fn, torch.nn.GELU)


def test_constructor_arguments_reach_the_blocks():
    enc = ViTEncoder(
        2,
        (32, 16),
        patch_size=8,
        spatial_dims=2,
        hidden_size=24,
        num_layers=3,
        num_heads=3,
        mlp_ratio=2.0,
        qkv_bias=False,
        drop_path_rate=0.2,
        learnable_pos_embed=False,
    )
    assert enc.grid_size == (4, 2) and len(enc.blocks) == 3 and enc.blocks[2].mlp.linear1.out_features == 48
    assert all(b.attn.qkv.bias is None for b in enc.blocks)
    assert isinstance(enc.blocks[0].drop_path, torch.nn.Identity)  # the rate rises linearly from 0
    assert [b.drop_path.drop_prob for b in enc.blocks[1:]] == pytest.approx([0.1, 0.2])
    assert not enc.pos_embed.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(spatial_dims=1), "spatial_dims must be 2 or 3, got 1."),
        (dict(hidden_size=30, num_heads=4), "hidden_size (30) must be divisible by num_heads (4)."),
        (dict(img_size=40), "img_size (40, 40, 40) must be divisible by patch_size (16, 16, 16)."),
    ],
)
def test_impossible_shapes_are_refused_with_the_values(kwargs, message):
    args = dict(in_channels=1, img_size=32, hidden_size=24, num_layers=1, num_heads=4) | kwargs
    with pytest.raises(ValueError) as error:
        ViTEncoder(**args)
    assert str(error.value) == message


def test_patch_embedding_is_xavier_uniform_over_the_flattened_patch():
    """MAE: ``xavier_uniform_(w.view([w.shape[0], -1]))``: bound sqrt(6 / (D + C * prod(p)))."""
    torch.manual_seed(0)
    enc = ViTEncoder(2, 32, hidden_size=48, num_layers=1, num_heads=4)
    w = enc.patch_embed.weight
    bound = math.sqrt(6 / (48 + 2 * 16**3))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert torch.equal(enc.patch_embed.bias, torch.zeros(48))


def test_embedding_kept_patches_equals_embedding_all_then_gathering():
    """The MAE path (a linear map of the kept patches) against the convolution, bias included."""
    torch.manual_seed(0)
    enc = ViTEncoder(2, (32, 48, 16), hidden_size=24, num_layers=1, num_heads=4)
    with torch.no_grad():
        enc.patch_embed.bias.normal_()  # zero at initialisation: a dropped bias would go unseen
    x = torch.randn(2, 2, 32, 48, 16)
    ids_keep = torch.tensor([[0, 5, 2], [4, 1, 3]])
    full = enc.embed_patches(x)
    expected = torch.stack([full[i, ids_keep[i]] for i in range(2)])
    torch.testing.assert_close(enc.embed_patches(x, ids_keep), expected, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients_even_for_an_input_without_grad():
    """On by default when called; non-reentrant, so a block whose input needs no gradient (a frozen embedding)
    still trains: the reentrant form would leave its parameters without gradients."""
    torch.manual_seed(0)
    plain = TransformerBlock(24, 4)
    checkpointed = set_activation_checkpointing(TransformerBlock(24, 4))
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.activation_checkpointing and not plain.activation_checkpointing
    x = torch.randn(2, 5, 24)  # requires_grad False
    plain(x).square().sum().backward()
    checkpointed(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert not set_activation_checkpointing(checkpointed, "false").activation_checkpointing


def _attention_in_float32(attn, x):
    """The reference of CPU bf16 training: bf16 projections (autocast), float32 attention between them."""
    q, k, v = attn.input_rearrange(attn.qkv(x))
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return attn.out_proj(attn.out_rearrange(out))


def test_cpu_bf16_training_attends_in_float32_and_otherwise_as_sablock():
    torch.manual_seed(0)
    attn = SelfAttention(64, 4)
    sablock = SABlock(64, 4, qkv_bias=True, use_flash_attention=True)
    sablock.load_state_dict(attn.state_dict())
    x = torch.randn(2, 50, 64)
    mask = torch.rand(50, 50) > 0.3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = x.clone().requires_grad_()
        ours = attn(trained)
        reference = _attention_in_float32(attn, trained)
        bf16_attention = sablock(trained)
        assert not torch.equal(reference, bf16_attention)  # the two paths can be told apart
        assert torch.equal(ours, reference)
        ours.float().sum().backward()  # and it trains
        assert trained.grad is not None
        attn.eval()  # evaluation with gradients on (e.g. a saliency map): no dropout, the same attention
        assert torch.equal(attn(trained), reference)
        attn.train()
        assert torch.equal(attn(x), sablock(x))  # no gradient wanted: SABlock's attention, in bf16
        assert torch.equal(attn(trained, mask), sablock(trained, mask))  # a mask: SABlock, which applies it
        assert not torch.equal(attn(trained, mask), ours)
    assert torch.equal(attn(trained), sablock(trained))  # float32: SABlock
