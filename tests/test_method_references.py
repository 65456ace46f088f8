"""The method's core against references written out here in plain NumPy from the paper's definitions
(REFERENCE.md, section 2), on small inputs: the normalised-pixel loss over masked patches, the patch order,
the sine-cosine tables and the fine-tuning learning rate of every parameter at every step."""

import math

import numpy as np
import pytest
import torch
from bundle_runner import REPO
from monai.bundle import ConfigParser

from selfmedmae_components.networks import MaskedAutoencoder, sincos_pos_embed

TINY = dict(
    hidden_size=48, num_layers=1, num_heads=4, decoder_hidden_size=48, decoder_num_layers=1, decoder_num_heads=4
)
EPS = 1e-6  # inside the square root: (x - mean) / sqrt(var + eps)


def reference_patches(img: np.ndarray, p: int) -> np.ndarray:
    """(C, *spatial) -> (L, P) by slicing: tokens row-major over the grid, values ordered [p1, (p2,) p3, C]."""
    grid = [s // p for s in img.shape[1:]]
    rows = []
    for pos in np.ndindex(*grid):
        block = img[(slice(None),) + tuple(slice(g * p, (g + 1) * p) for g in pos)]
        rows.append(np.moveaxis(block, 0, -1).reshape(-1))  # channel fastest
    return np.stack(rows)


def reference_loss(imgs: np.ndarray, pred: np.ndarray, mask: np.ndarray, p: int) -> float:
    """The paper's loss, one masked patch at a time: each patch normalised by its own mean and biased variance
    over all its values, squared error averaged over the patch, then over the masked patches of the batch."""
    errors = []
    for img, pr, m in zip(imgs, pred, mask):
        for patch, guess, masked in zip(reference_patches(img, p), pr, m):
            if masked:
                target = (patch - patch.mean()) / math.sqrt(patch.var() + EPS)
                errors.append(np.mean((guess - target) ** 2))
    return float(np.mean(errors))


def low_contrast_images(n, c, spatial, p, seed=0):
    """Random images in which one patch is nearly flat (std 1e-3, as water in CT): there eps equals the
    variance, so where it is added matters; elsewhere it is lost in float32."""
    rng = np.random.default_rng(seed)
    imgs = rng.normal(size=(n, c, *spatial))
    flat = (slice(None), slice(None)) + (slice(0, p),) * len(spatial)  # the first patch of every image
    imgs[flat] = 0.3 + 1e-3 * rng.normal(size=imgs[flat].shape)
    return imgs


@pytest.mark.parametrize("spatial_dims,in_channels", [(3, 1), (3, 4), (2, 3)])
def test_loss_is_the_papers_normalised_pixel_mse_over_masked_patches(spatial_dims, in_channels):
    """A different number of masked patches per sample (mean over masked patches, not over all or per sample),
    predictions near the target (an error summed over a patch is P times the mean) and a flat masked patch
    (eps inside the square root)."""
    p, spatial = 8, (16,) * spatial_dims
    mae = MaskedAutoencoder(in_channels, spatial, p, spatial_dims, **TINY)
    imgs = low_contrast_images(2, in_channels, spatial, p)
    length = 2**spatial_dims
    mask = np.zeros((2, length))
    mask[0, [0, 1, length - 1]] = 1  # sample 0: three masked patches, the flat one (token 0) among them
    mask[1, [0, 2]] = 1
    rng = np.random.default_rng(1)
    targets = np.stack([reference_patches(img, p) for img in imgs])
    pred = rng.normal(size=targets.shape)
    expected = reference_loss(imgs, pred, mask, p)
    loss = mae.forward_loss(*(torch.from_numpy(a).float() for a in (imgs, pred, mask)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("spatial_dims,in_channels", [(3, 2), (2, 3)])
def test_patchify_is_the_reference_slicing_order(spatial_dims, in_channels):
    spatial = (16, 24, 8)[:spatial_dims] if spatial_dims == 3 else (16, 24)
    mae = MaskedAutoencoder(in_channels, spatial, 8, spatial_dims, **TINY)
    imgs = np.random.default_rng(0).normal(size=(2, in_channels, *spatial)).astype(np.float32)
    patches = mae.patchify(torch.from_numpy(imgs)).numpy()
    for n in range(2):
        np.testing.assert_array_equal(patches[n], reference_patches(imgs[n], 8))


def reference_sincos(grid, dim: int) -> np.ndarray:
    """REFERENCE.md: d = dim / (2 * ndim), omega_k = 1 / 10000^(k/d); a token at integer position (h, w[, z]) gets
    [sin(h omega), cos(h omega), sin(w omega), cos(w omega), ...]; tokens row-major; a zero row for cls first."""
    d = dim // (2 * len(grid))
    omega = 1.0 / 10000 ** (np.arange(d) / d)
    rows = [np.concatenate([f(x * omega) for x in pos for f in (np.sin, np.cos)]) for pos in np.ndindex(*grid)]
    return np.concatenate([np.zeros((1, dim)), np.stack(rows)])


@pytest.mark.parametrize("grid,dim", [((3, 4), 16), ((2, 3, 4), 24), ((6, 6, 6), 768)])
def test_sincos_tables_are_the_reference(grid, dim):
    # 1e-7: the float64 table rounded to float32 (6e-8 at most); a float32 computation is off by several 1e-7
    np.testing.assert_allclose(sincos_pos_embed(grid, dim)[0].numpy(), reference_sincos(grid, dim), atol=1e-7, rtol=0)
    mae = MaskedAutoencoder(1, [16 * g for g in grid], 16, len(grid), **dict(TINY, decoder_hidden_size=dim))
    np.testing.assert_allclose(mae.decoder_pos_embed[0].numpy(), reference_sincos(grid, dim), atol=1e-6)
    np.testing.assert_allclose(mae.encoder.pos_embed[0].numpy(), reference_sincos(grid, 48), atol=1e-6)


def reference_lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then a half cosine to 0 at the last step (REFERENCE.md, Optimisation)."""
    if step < warmup:
        return base * step / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def reference_layer_scale(name: str, depth: int, decay: float) -> float:
    """REFERENCE.md, layer-wise LR decay: the embedding decay^(depth + 1), block b decay^(depth - b), the final
    norm and everything outside the encoder 1."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return decay ** (depth + 1)
    if name.startswith("encoder.blocks."):
        return decay ** (depth - int(name.split(".")[2]))
    return 1.0


@pytest.mark.parametrize("bundle", ["btcv_seg", "cxr14_cls"])
def test_finetuning_lr_of_every_parameter_at_every_step(bundle, one_thread):
    """The bundle's optimiser and schedule (3 steps an epoch, 2 warm-up epochs of 6) give each parameter
    base x its layer's scale x the warm-up-cosine factor at every iteration."""
    depth, decay, steps_per_epoch = 3, 0.5, 3
    size = {"cxr14_cls": dict(img_size=32)}.get(bundle, dict(roi_size=[32, 32, 32], skip_hidden_states=[0, 1, 2]))
    p = ConfigParser()
    p.read_config(str(REPO / "bundles" / bundle / "configs" / "finetune.yaml"))
    p.update(
        dict(
            hidden_size=48,
            num_heads=4,
            num_layers=depth,
            layer_decay=decay,
            init_mode="scratch",
            learning_rate=1.0e-3,
            warmup_epochs=2,
            max_epochs=6,
            device="$torch.device('cpu')",
            **size,
        )
    )
    p["train#dataloader"] = [None] * steps_per_epoch  # the schedule reads only its length
    optimizer, scheduler = p.get_parsed_content("optimizer"), p.get_parsed_content("train#lr_scheduler")
    names = {id(param): name for name, param in p.get_parsed_content("network").named_parameters()}
    warmup, total = 2 * steps_per_epoch, 6 * steps_per_epoch
    for step in range(total):
        for group in optimizer.param_groups:
            for param in group["params"]:
                scale = reference_layer_scale(names[id(param)], depth, decay)
                expected = reference_lr(step, 1.0e-3, warmup, total) * scale
                assert group["lr"] == pytest.approx(expected, abs=1e-12), (step, names[id(param)])
        optimizer.step()
        scheduler.step()


def test_decoder_puts_each_token_back_in_place_with_its_position():
    """forward_decoder against a reference that places the tokens one by one: visible token l is the embedded latent
    of its place in the kept order, a masked one the mask token; each gets the sine-cosine row of its position."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(1, 32, 16, 3, **dict(TINY, decoder_num_layers=2)).eval()
    ids_keep, mask, ids_restore = mae.masking_ids(2, 8, 0.5, torch.device("cpu"))
    latent = torch.randn(2, 1 + 4, 48)
    embedded = mae.decoder_embed(latent)
    rows = []
    for n in range(2):
        kept = ids_keep[n].tolist()
        tokens = [embedded[n, 1 + kept.index(t)] if t in kept else mae.mask_token[0, 0] for t in range(8)]
        rows.append(torch.stack([embedded[n, 0], *tokens]) + mae.decoder_pos_embed[0])
    x = torch.stack(rows)
    for block in mae.decoder_blocks:
        x = block(x)
    with torch.no_grad():
        torch.testing.assert_close(
            mae.forward_decoder(latent, ids_restore), mae.decoder_pred(mae.decoder_norm(x))[:, 1:]
        )
    assert torch.equal(mask, (torch.arange(8)[None] != ids_keep[:, :, None]).all(1).float())


def test_mae_tokens_widths_and_bounds_are_the_papers():
    """MAE's mask token (1, 1, D) drawn with std 0.02; LayerNorm eps 1e-6; the MLP ratio reaches both halves; ratios
    in [0, 1). (The defaults, ViT-B and the 384-wide decoder: tests/test_networks.py.)"""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(1, 32, 16, 3, mlp_ratio=2.0, mask_ratio=0.0, **dict(TINY, decoder_hidden_size=384))
    assert mae.mask_token.shape == (1, 1, 384) and 0.015 < mae.mask_token.std().item() < 0.025
    assert mae.decoder_norm.eps == 1e-6 and not any(b.activation_checkpointing for b in mae.decoder_blocks)
    assert (
        mae.encoder.blocks[0].mlp.linear1.out_features == 96 and mae.decoder_blocks[0].mlp.linear1.out_features == 768
    )
    assert mae.no_weight_decay(tokens=False) == {"decoder_pos_embed"}
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError) as err:
            MaskedAutoencoder(1, 32, 16, 3, mask_ratio=bad, **TINY)
        assert str(err.value) == f"mask_ratio must be in [0, 1), got {bad}."
