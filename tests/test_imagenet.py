"""ImageNet ViT -> our encoder: every tensor of a (generated) timm checkpoint maps, by the documented rules."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfmedmae_components.networks import UNETR, ViTClassifier
from selfmedmae_components.weights import CheckpointError, init_encoder
from selfmedmae_components.weights.imagenet import load_imagenet_vit, read_checkpoint, resample_pos_embed, to_timm_names

REPO = Path(__file__).resolve().parents[1]
WIDTH, DEPTH, HEADS = 48, 2, 4


def timm_vit(width=WIDTH, depth=DEPTH, grid=14, patch=16, seed=0, head=True):
    """Random tensors with the names and shapes of timm's VisionTransformer (ViT-B/16 layout, small width)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {
        "cls_token": r(1, 1, width),
        "pos_embed": r(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": r(width, 3, patch, patch),
        "patch_embed.proj.bias": r(width),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": r(width),
                b + "norm1.bias": r(width),
                b + "attn.qkv.weight": r(3 * width, width) / width**0.5,
                b + "attn.qkv.bias": r(3 * width),
                b + "attn.proj.weight": r(width, width) / width**0.5,
                b + "attn.proj.bias": r(width),
                b + "norm2.weight": r(width),
                b + "norm2.bias": r(width),
                b + "mlp.fc1.weight": r(4 * width, width) / width**0.5,
                b + "mlp.fc1.bias": r(4 * width),
                b + "mlp.fc2.weight": r(width, 4 * width) / (4 * width) ** 0.5,
                b + "mlp.fc2.bias": r(width),
            }
        )
    sd.update({"norm.weight": r(width), "norm.bias": r(width)})
    if head:
        sd.update({"head.weight": r(1000, width), "head.bias": r(1000)})
    return sd


def timm_forward(sd, x, heads=HEADS):
    """timm's ViT forward (pre-norm blocks, eps 1e-6), written out: the reference our encoder must reproduce."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embed"]
    ln = lambda t, k: F.layer_norm(t, t.shape[-1:], sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)
    lin = lambda t, k: F.linear(t, sd[k + ".weight"], sd[k + ".bias"])
    n, length, d = x.shape
    for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
        b = f"blocks.{i}."
        qkv = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(n, length, d)
        x = x + lin(att, b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, "norm")


def to_hf(sd):
    """The same weights with Hugging Face transformers' ViT names."""
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"],
        "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"],
        "classifier.bias": sd["head.bias"],
    }
    names = {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    for i in range(DEPTH):
        for kind in ("weight", "bias"):
            for ours, theirs in names.items():
                out[f"vit.encoder.layer.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
            for j, part in enumerate(sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, 0)):
                out[f"vit.encoder.layer.{i}.attention.attention.{('query', 'key', 'value')[j]}.{kind}"] = part
    return out


def unetr(img_size):
    return UNETR(1, 14, img_size, hidden_size=WIDTH, num_layers=DEPTH, num_heads=HEADS, skip_hidden_states=(0, 1, 1))


def classifier(img_size=224, in_channels=3):
    return ViTClassifier(in_channels, 14, img_size, hidden_size=WIDTH, num_layers=DEPTH, num_heads=HEADS)


def test_2d_classifier_at_224_reproduces_the_imagenet_vit(tmp_path):
    sd = timm_vit()
    torch.save(sd, tmp_path / "vit.pth")
    net = classifier()
    report = load_imagenet_vit(net, tmp_path / "vit.pth")
    ours = {k.removeprefix("encoder."): v for k, v in net.state_dict().items() if k.startswith("encoder.")}
    assert sorted(report.loaded) == sorted("encoder." + k for k in ours)  # every encoder tensor loaded
    assert sorted(report.dropped) == ["head.bias", "head.weight"] and report.initialised == ["head.weight", "head.bias"]
    assert torch.equal(ours["pos_embed"], sd["pos_embed"]) and torch.equal(
        ours["patch_embed.weight"], sd["patch_embed.proj.weight"]
    )
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(ours["blocks.1.mlp.linear2.bias"], sd["blocks.1.mlp.fc2.bias"])
    x = torch.randn(2, 3, 224, 224)
    net.eval()
    with torch.no_grad():
        tokens, _ = net.encoder(x)
    torch.testing.assert_close(
        tokens, timm_forward(sd, x), atol=1e-4, rtol=1e-4
    )  # same function, not just same tensors
    assert "position grid 14x14 -> 14x14" in str(report)


def test_2d_classifier_at_another_size_resamples_the_grid_bicubically(tmp_path):
    sd = timm_vit()
    torch.save({"model": sd}, tmp_path / "vit.pth")  # DeiT-style wrapping
    net = classifier(img_size=112, in_channels=1)
    load_imagenet_vit(net, tmp_path / "vit.pth")
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, WIDTH).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(net.encoder.pos_embed[:, 1:], expected)
    assert torch.equal(net.encoder.pos_embed[:, :1], sd["pos_embed"][:, :1])
    torch.testing.assert_close(net.encoder.patch_embed.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))


def test_3d_unetr_inflates_patch_embedding_and_position_grid(tmp_path):
    sd = timm_vit()
    torch.save(sd, tmp_path / "vit.pth")
    net = unetr((224, 224, 32))  # in-plane grid 14 x 14 (no resampling), 2 patches deep
    report = load_imagenet_vit(net, tmp_path / "vit.pth")
    assert len(report.loaded) == len([k for k in net.state_dict() if k.startswith("encoder.")])
    assert any(k.startswith("decoder5") for k in report.initialised)
    w2d, w3d = sd["patch_embed.proj.weight"], net.encoder.patch_embed.weight.detach()
    assert w3d.shape == (WIDTH, 1, 16, 16, 16)
    # rule: w3d[o, c, x, y, z] = sum_RGB w2d[o, :, 15 - y, x] / in_channels / 16
    expected = w2d.sum(1).flip(-2).transpose(-2, -1) / 16
    for z in (0, 7, 15):
        torch.testing.assert_close(w3d[:, 0, :, :, z], expected)
    # property: a grey patch constant along depth, laid out as an axial slice is displayed, responds like (g, g, g)
    g = torch.rand(16, 16)
    vol = g.flip(0).T[:, :, None].expand(16, 16, 16)  # vol[x, y, z] = g[15 - y, x]
    r3 = F.conv3d(vol[None, None], w3d, net.encoder.patch_embed.bias).flatten()
    r2 = F.conv2d(g.expand(1, 3, 16, 16), w2d, sd["patch_embed.proj.bias"]).flatten()
    torch.testing.assert_close(r3, r2, atol=1e-4, rtol=1e-4)
    # position table: pos3d[x, y, z] = pos2d[13 - y, x] at every depth z; cls row copied
    pos2d = sd["pos_embed"][0, 1:].reshape(14, 14, WIDTH)
    pos3d = net.encoder.pos_embed.detach()[0, 1:].reshape(14, 14, 2, WIDTH)
    for z in range(2):
        torch.testing.assert_close(pos3d[:, :, z], pos2d.flip(0).transpose(0, 1))
    assert torch.equal(net.encoder.pos_embed[0, 0], sd["pos_embed"][0, 0])
    assert torch.equal(net.encoder.blocks[0].attn.out_proj.weight, sd["blocks.0.attn.proj.weight"])
    assert "repeated over depth / 16" in str(report) and "14x14 -> 14x14x2" in str(report)


def test_3d_unetr_at_the_paper_roi_grid_and_several_channels(tmp_path):
    sd = timm_vit()
    torch.save(sd, tmp_path / "vit.pth")
    net = UNETR(4, 3, (96, 64, 48), hidden_size=WIDTH, num_layers=DEPTH, num_heads=HEADS, skip_hidden_states=(0, 1, 1))
    load_imagenet_vit(net, tmp_path / "vit.pth")  # BraTS-like: 4 channels, non-cubic grid 6 x 4 x 3
    pos = net.encoder.pos_embed.detach()[0, 1:].reshape(6, 4, 3, WIDTH)
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, WIDTH).permute(0, 3, 1, 2)
    inplane = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)[0].permute(
        1, 2, 0
    )  # (rows y, cols x)
    torch.testing.assert_close(pos[:, :, 1], inplane.flip(0).transpose(0, 1))
    w = net.encoder.patch_embed.weight.detach()
    assert w.shape == (WIDTH, 4, 16, 16, 16)
    torch.testing.assert_close(
        w[:, 2, :, :, 3], sd["patch_embed.proj.weight"].sum(1).flip(-2).transpose(-2, -1) / 4 / 16
    )


def test_hugging_face_names_load_the_same_weights(tmp_path):
    sd = timm_vit()
    torch.save(sd, tmp_path / "timm.pth")
    torch.save(to_hf(sd), tmp_path / "hf.bin")
    a, b = unetr((64, 64, 64)), unetr((64, 64, 64))
    load_imagenet_vit(a, tmp_path / "timm.pth")
    report = load_imagenet_vit(b, tmp_path / "hf.bin")
    enc = lambda n: {k: v for k, v in n.state_dict().items() if k.startswith("encoder.")}
    for key, value in enc(a).items():
        assert torch.equal(value, enc(b)[key]), key
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight"]


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="safetensors not installed")
def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    sd = timm_vit()
    save_file(sd, str(tmp_path / "vit.safetensors"))
    net = classifier()
    load_imagenet_vit(net, tmp_path / "vit.safetensors")
    assert torch.equal(net.encoder.cls_token, sd["cls_token"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(width=64),
            r"width 64 with 2 blocks, but the model's encoder has width 48 and 2 blocks",
        ),  # ViT-L into ViT-B
        (dict(depth=3), r"width 48 with 3 blocks, but the model's encoder has width 48 and 2 blocks"),
        (
            dict(patch=32, grid=7),
            r"patch embedding \(48, 3, 32, 32\) does not fit the encoder's patch size",
        ),  # ViT-B/32
    ],
)
def test_a_checkpoint_of_another_shape_is_refused(tmp_path, kwargs, message):
    torch.save(timm_vit(**kwargs), tmp_path / "vit_other.pth")
    net = unetr((32, 32, 32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as err:
        load_imagenet_vit(net, tmp_path / "vit_other.pth")
    assert "vit_other.pth" in str(err.value)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_layer_scale_variants_and_non_vit_files_are_refused(tmp_path):
    sd = timm_vit()
    sd["blocks.0.ls1.gamma"] = torch.ones(WIDTH)
    torch.save(sd, tmp_path / "ls.pth")
    with pytest.raises(CheckpointError, match=r"blocks.0.ls1.gamma"):
        load_imagenet_vit(classifier(), tmp_path / "ls.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"not a ViT checkpoint.*conv1.weight"):
        load_imagenet_vit(classifier(), tmp_path / "resnet.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        init_encoder(classifier(), "imagenet", tmp_path / "nowhere.pth")


def test_bundle_builds_the_network_with_init_mode_imagenet(tmp_path):
    """The finetune config resolves `--init_mode imagenet --pretrained_checkpoint ...` (network only, no training)."""
    from monai.bundle import ConfigParser

    sd = timm_vit(depth=4)
    torch.save(sd, tmp_path / "vit_b16.pth")
    parser = ConfigParser()
    parser.read_config([REPO / "bundles/btcv_seg/configs/finetune.yaml", REPO / "bundles/btcv_seg/configs/demo.yaml"])
    parser.update(
        {
            "roi_size": [32, 32, 32],
            "hidden_size": WIDTH,
            "init_mode": "imagenet",
            "device": "$torch.device('cpu')",
            "pretrained_checkpoint": str(tmp_path / "vit_b16.pth"),
            "bundle_root": str(tmp_path),
        }
    )
    net = parser.get_parsed_content("network")
    assert torch.equal(net.encoder.blocks[3].norm2.weight, sd["blocks.3.norm2.weight"])


def test_the_report_names_each_conversion(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    torch.save(timm_vit(), tmp_path / "vit.pth")
    flat = load_imagenet_vit(classifier(), tmp_path / "vit.pth")
    assert capsys.readouterr().out == str(flat) + "\n"  # printed, and logged
    assert str(flat) in [r.getMessage() for r in caplog.records]
    assert flat.conversions == [
        "patch embedding (48, 3, 16, 16) -> (48, 3, 16, 16): kept RGB",
        "position grid 14x14 -> 14x14 (bicubic); cls row copied",
    ]
    volume = load_imagenet_vit(unetr((64, 48, 32)), tmp_path / "vit.pth")
    assert volume.conversions == [
        "patch embedding (48, 3, 16, 16) -> (48, 1, 16, 16, 16): RGB summed / 1, repeated over depth / 16 (I3D)",
        "position grid 14x14 -> 4x3x2 (bicubic in-plane, repeated over depth); cls row copied",
    ]
    assert volume.source == f"{tmp_path / 'vit.pth'} (ImageNet ViT)"
    assert str(volume).splitlines()[0] == f"Weight transfer from {tmp_path / 'vit.pth'} (ImageNet ViT):"
    assert str(volume).splitlines()[-2:] == ["  converted   " + c for c in volume.conversions]


def test_global_pool_checkpoints_give_their_fc_norm_as_the_final_norm(tmp_path):
    """timm's global-pool ViTs (e.g. MAE's fine-tuned ones) keep the final norm as fc_norm."""
    sd = timm_vit()
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    torch.save(sd, tmp_path / "gap.pth")
    net = classifier()
    report = load_imagenet_vit(net, tmp_path / "gap.pth")
    assert torch.equal(net.encoder.norm.weight, sd["fc_norm.weight"])
    assert torch.equal(net.encoder.norm.bias, sd["fc_norm.bias"])
    assert "fc_norm.weight" not in report.dropped
    sd["norm.weight"], sd["norm.bias"] = torch.ones(WIDTH), torch.zeros(WIDTH)  # both: fc_norm is a head's norm
    torch.save(sd, tmp_path / "both.pth")
    load_imagenet_vit(net, tmp_path / "both.pth")
    assert torch.equal(net.encoder.norm.weight, torch.ones(WIDTH))


def test_a_position_table_without_a_cls_row_gets_a_zero_one(tmp_path):
    sd = timm_vit()
    sd["pos_embed"] = sd["pos_embed"][:, 1:].clone()  # timm's no_embed_class models
    torch.save(sd, tmp_path / "vit.pth")
    net = classifier()
    load_imagenet_vit(net, tmp_path / "vit.pth")
    assert torch.equal(net.encoder.pos_embed[0, 0], torch.zeros(WIDTH))
    assert torch.equal(net.encoder.pos_embed[0, 1:], sd["pos_embed"][0])

    sd["pos_embed"] = sd["pos_embed"][:, 1:]  # 195 rows: neither a square grid nor one with a cls row
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as error:
        load_imagenet_vit(classifier(), tmp_path / "odd.pth")
    assert str(error.value) == "pos_embed of length 195 is not a square patch grid (with or without a cls row)."


def test_half_precision_checkpoints_load_as_the_models_float32(tmp_path):
    sd = {k: v.half() for k, v in timm_vit().items()}
    torch.save(sd, tmp_path / "fp16.pth")
    net = unetr((32, 32, 32))
    load_imagenet_vit(net, tmp_path / "fp16.pth")
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())
    assert torch.equal(net.encoder.blocks[1].norm1.weight, sd["blocks.1.norm1.weight"].float())
    assert resample_pos_embed(sd["pos_embed"], (7, 7)).dtype == torch.float16  # the table keeps its dtype


def test_hugging_face_names_without_the_vit_prefix_and_unknown_dicts_unchanged():
    sd = timm_vit(head=False)
    hf = {k.removeprefix("vit."): v for k, v in to_hf({**sd, "head.weight": 0, "head.bias": 0}).items()}
    hf["pooler.dense.weight"] = torch.zeros(WIDTH, WIDTH)  # ViTModel's pooler: kept, dropped later by the loader
    converted = to_timm_names(hf)
    assert set(converted) == set(sd) | {"classifier.weight", "classifier.bias", "pooler.dense.weight"}
    for key, value in sd.items():
        assert torch.equal(converted[key], value), key
    assert to_timm_names(sd) is sd  # already timm
    other = {"conv1.weight": torch.zeros(1)}
    assert to_timm_names(other) is other  # not recognised: the loader says what is missing


def test_a_missing_tensor_and_a_wrong_shape_name_the_tensor(tmp_path):
    sd = timm_vit()
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as error:
        load_imagenet_vit(classifier(), tmp_path / "cut.pth")
    assert str(error.value) == (
        f"{tmp_path / 'cut.pth'} does not match the ViT encoder: missing ['blocks.1.mlp.fc2.bias (for "
        "blocks.1.mlp.linear2.bias)']; block tensors this encoder has no place for (layer scale, other variants) []"
    )
    sd = timm_vit()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(2 * WIDTH, WIDTH)  # an MLP ratio of 2
    torch.save(sd, tmp_path / "mlp2.pth")
    with pytest.raises(CheckpointError) as error:
        load_imagenet_vit(classifier(), tmp_path / "mlp2.pth")
    assert str(error.value) == (
        f"{tmp_path / 'mlp2.pth'} does not fit the encoder after conversion: "
        "['blocks.0.mlp.linear1.weight: (96, 48) vs model (192, 48)']"
    )


def test_a_network_without_a_vit_encoder_is_refused(tmp_path):
    torch.save(timm_vit(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError) as error:
        load_imagenet_vit(torch.nn.Linear(2, 2), tmp_path / "vit.pth")
    assert str(error.value) == f"The network has no ViT 'encoder' to load {tmp_path / 'vit.pth'} into."


def test_safetensors_files_need_the_package_exist_and_parse(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as error:
        read_checkpoint(tmp_path / "absent.safetensors")
    assert str(error.value) == (
        f"Checkpoint not found: {tmp_path / 'absent.safetensors'}. Give the ImageNet ViT-B/16 weights you downloaded."
    )
    (tmp_path / "vit.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{broken}")
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)  # as if not installed
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path / "vit.safetensors")
    assert str(error.value).startswith(
        f"{tmp_path / 'vit.safetensors'} is a .safetensors file: `pip install safetensors`"
    )
    monkeypatch.undo()
    if importlib.util.find_spec("safetensors") is not None:
        with pytest.raises(CheckpointError, match=r"^Cannot read .*vit\.safetensors as safetensors: "):
            read_checkpoint(tmp_path / "vit.safetensors")


def test_cls_token_flat_or_missing(tmp_path):
    sd = timm_vit()
    sd["cls_token"] = sd["cls_token"].flatten()  # (D,): reshaped to the model's (1, 1, D)
    torch.save(sd, tmp_path / "flat.pth")
    net = classifier()
    load_imagenet_vit(net, tmp_path / "flat.pth")
    assert torch.equal(net.encoder.cls_token.flatten(), sd["cls_token"])
    del sd["cls_token"]
    torch.save(sd, tmp_path / "nocls.pth")
    with pytest.raises(CheckpointError, match=r"missing \['cls_token \(for cls_token\)'\]"):
        load_imagenet_vit(classifier(), tmp_path / "nocls.pth")


def test_an_encoder_that_is_not_a_vit_and_a_file_that_is_not_one_are_named(tmp_path):
    torch.save(timm_vit(), tmp_path / "vit.pth")
    net = torch.nn.Module()
    net.encoder = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"^The network has no ViT 'encoder' to load .*vit.pth into.$"):
        load_imagenet_vit(net, tmp_path / "vit.pth")
    keys = [f"layer{i}.weight" for i in range(10)]
    torch.save({k: torch.zeros(1) for k in keys}, tmp_path / "cnn.pth")
    with pytest.raises(CheckpointError) as error:
        load_imagenet_vit(classifier(), tmp_path / "cnn.pth")
    assert str(error.value).endswith(f"First keys: {keys[:8]}")


def test_hugging_face_block_tensors_of_unknown_kinds_are_named(tmp_path):
    hf = to_hf(timm_vit())
    hf["vit.encoder.layer.1.lambda_1.weight"] = torch.ones(WIDTH)  # a layer-scale variant
    torch.save(hf, tmp_path / "hf_ls.bin")
    with pytest.raises(
        CheckpointError, match=r"no place for \(layer scale, other variants\) \['blocks.1.lambda_1.weight'\]"
    ):
        load_imagenet_vit(classifier(), tmp_path / "hf_ls.bin")
