"""MAE -> UNETR / classifier weight transfer: every encoder tensor loads, and nothing fails silently."""

import os

import pytest
import torch

from selfmedmae_components.networks import UNETR, MaskedAutoencoder, ViTClassifier
from selfmedmae_components.weights import CheckpointError, init_encoder, load_state_dict, transfer_encoder

VIT = dict(hidden_size=48, num_layers=3, num_heads=4)


def save_mae(path, img_size=32, spatial_dims=3, in_channels=1, wrap=True):
    mae = MaskedAutoencoder(
        in_channels,
        img_size,
        16,
        spatial_dims,
        decoder_hidden_size=48,
        decoder_num_layers=1,
        decoder_num_heads=4,
        **VIT,
    )
    torch.save({"model": mae.state_dict()} if wrap else mae.state_dict(), path)
    return mae


@pytest.mark.parametrize("wrap", [True, False])
def test_transfer_loads_every_encoder_tensor_into_unetr(tmp_path, wrap):
    mae = save_mae(tmp_path / "mae.pt", wrap=wrap)
    unetr = UNETR(1, 14, 32, skip_hidden_states=(0, 1, 2), **VIT)
    report = transfer_encoder(unetr, tmp_path / "mae.pt")
    mae_encoder = {k: v for k, v in mae.state_dict().items() if k.startswith("encoder.")}
    assert sorted(report.loaded) == sorted(mae_encoder)
    for key, value in mae_encoder.items():
        assert torch.equal(unetr.state_dict()[key], value), key
    assert "encoder.pos_embed" in report.loaded and unetr.encoder.pos_embed.requires_grad
    assert any(k.startswith("decoder_blocks") for k in report.dropped) and "mask_token" in report.dropped
    assert any(k.startswith("decoder5") for k in report.initialised)
    assert "loaded" in str(report) and "dropped" in str(report)


def test_transfer_2d_into_classifier_including_position_embedding(tmp_path):
    mae = save_mae(tmp_path / "mae2d.pt", img_size=64, spatial_dims=2, in_channels=3)
    clf = ViTClassifier(3, 14, 64, **VIT)
    report = transfer_encoder(clf, tmp_path / "mae2d.pt")
    assert torch.equal(clf.encoder.pos_embed, mae.encoder.pos_embed)
    assert len(report.loaded) == len([k for k in mae.state_dict() if k.startswith("encoder.")])
    assert report.initialised == ["head.weight", "head.bias"]


def test_transfer_fails_loudly_on_a_different_roi(tmp_path):
    save_mae(tmp_path / "mae.pt", img_size=32)
    unetr = UNETR(1, 14, 48, skip_hidden_states=(0, 1, 2), **VIT)  # fine-tuning ROI differs from pre-training
    with pytest.raises(
        CheckpointError,
        match=r"(?s)mae.pt does not fit.*encoder.pos_embed: checkpoint \(1, 9, 48\) vs model \(1, 28, 48\)",
    ):
        transfer_encoder(unetr, tmp_path / "mae.pt")


def test_missing_checkpoint_is_an_error_not_scratch_training(tmp_path):
    unetr = UNETR(1, 14, 32, skip_hidden_states=(0, 1, 2), **VIT)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        init_encoder(unetr, "mae", tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="init_mode"):
        init_encoder(unetr, "imagenet?", None)
    before = {k: v.clone() for k, v in unetr.state_dict().items()}
    init_encoder(unetr, "scratch")
    assert all(torch.equal(before[k], v) for k, v in unetr.state_dict().items())


def test_checkpoint_without_encoder_is_refused(tmp_path):
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="contains no 'encoder.\\*' tensors"):
        transfer_encoder(UNETR(1, 14, 32, skip_hidden_states=(0, 1, 2), **VIT), tmp_path / "other.pt")


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="Refusing to load .*evil.pt"):
        load_state_dict(tmp_path / "evil.pt")


def test_truncated_checkpoint_is_named(tmp_path):
    save_mae(tmp_path / "mae.pt")
    data = (tmp_path / "mae.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_state_dict(tmp_path / "cut.pt")


@pytest.mark.parametrize(
    "content, found",
    [(b"hello\n", "text starting 'hello'"), (b"", "an empty file"), (b"\x00\x01\x02\x03", "binary data")],
)
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, content, found):
    (tmp_path / "notes.txt").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "notes.txt")
    message = str(err.value)
    assert f"{tmp_path / 'notes.txt'} is not a PyTorch checkpoint" in message and found in message
    assert "pickle" not in message  # not the weights_only refusal meant for checkpoints that hold code


def test_ddp_prefix_is_removed(tmp_path):
    mae = save_mae(tmp_path / "mae.pt", wrap=False)
    torch.save({"model": {f"module.{k}": v for k, v in mae.state_dict().items()}}, tmp_path / "ddp.pt")
    assert set(load_state_dict(tmp_path / "ddp.pt")) == set(mae.state_dict())


def test_the_transfer_report_is_printed_as_it_happened(tmp_path, capsys):
    """What a user reads after fine-tuning starts: the file, and per kind the tensors with their top-level names."""
    mae = save_mae(tmp_path / "mae.pt")
    unetr = UNETR(1, 14, 32, skip_hidden_states=(0, 1, 2), **VIT)
    init_encoder(unetr, "mae", tmp_path / "mae.pt")
    assert torch.equal(unetr.encoder.blocks[2].attn.qkv.weight, mae.encoder.blocks[2].attn.qkv.weight)
    encoder = sum(k.startswith("encoder.") for k in mae.state_dict())
    dropped = ["decoder_blocks", "decoder_embed", "decoder_norm", "decoder_pred", "decoder_pos_embed", "mask_token"]
    decoder = sorted({k.split(".")[0] for k in unetr.state_dict() if not k.startswith("encoder.")})
    assert capsys.readouterr().out == (
        f"Weight transfer from {tmp_path / 'mae.pt'}:\n"
        f"  loaded      {encoder:4d} tensors (encoder: patch embedding, cls token, position embedding, 3 blocks, norm)\n"
        f"  dropped     {len(mae.state_dict()) - encoder:4d} tensors of the checkpoint ({', '.join(sorted(dropped))})\n"
        f"  initialised {len(unetr.state_dict()) - encoder:4d} tensors of the model at random ({', '.join(decoder)})\n"
    )


def test_init_modes_say_what_they_need_or_do(tmp_path, capsys):
    unetr = UNETR(1, 14, 32, skip_hidden_states=(0, 1, 2), **VIT)
    for mode, needs in (
        ("mae", "init_mode 'mae' needs a pretrained_checkpoint."),
        ("imagenet", "init_mode 'imagenet' needs a pretrained_checkpoint (an ImageNet ViT-B/16 file)."),
    ):
        with pytest.raises(CheckpointError) as err:
            init_encoder(unetr, mode, None)
        assert str(err.value) == needs
    init_encoder(unetr, "scratch")
    no_load = "Training from random initialisation (init_mode='scratch'): no pre-trained weights are loaded.\n"
    assert capsys.readouterr().out == no_load
    save_mae(tmp_path / "mae.pt")
    with pytest.raises(CheckpointError, match=r"The network has no 'encoder\.\*' parameters to load .*mae\.pt into"):
        transfer_encoder(torch.nn.Linear(1, 1), tmp_path / "mae.pt")


@pytest.mark.parametrize("key", ["model", "network", "state_dict"])
def test_the_state_dict_is_found_under_each_usual_key(tmp_path, key):
    torch.save({key: {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "c.pt")
    assert load_state_dict(tmp_path / "c.pt").keys() == {"w"}


def test_a_checkpoint_without_a_state_dict_is_named(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "trainer.pt")  # a dict, but not of tensors
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "trainer.pt")
    assert str(err.value) == (
        f"{tmp_path / 'trainer.pt'} holds no model state dict (expected a dict of tensors, or one under 'model')."
    )


def test_refusals_carry_the_first_line_of_torchs_reason(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "evil.pt")
    try:
        torch.load(tmp_path / "evil.pt", weights_only=True)
    except Exception as e:  # torch's own reason, whose first line ours repeats
        first_line = str(e).splitlines()[0]
    assert str(err.value).endswith(f"Details: {first_line}") and first_line
    save_mae(tmp_path / "mae.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "mae.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "cut.pt")
    cause = err.value.__cause__
    assert f"(truncated or damaged PyTorch file): {type(cause).__name__}: {cause}" in str(err.value)


@pytest.mark.parametrize(
    "content, found",
    [
        (
            b"  \n  first line of some notes, long enough to be cut at forty\nsecond\n",
            "text starting 'first line of some notes, long enough to'",
        ),
        (b"\xff\xfe\x00\x01binary\x80", "binary data starting b'\\xff\\xfe\\x00\\x01bina'"),
    ],
)
def test_what_a_non_checkpoint_looks_like_is_described_exactly(tmp_path, content, found):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "f")
    assert str(err.value).endswith(f"found {found}.")


def test_a_report_with_nothing_dropped_says_so(tmp_path):
    unetr = UNETR(1, 14, 32, skip_hidden_states=(0, 1, 2), **VIT)
    torch.save({k: v for k, v in unetr.state_dict().items() if k.startswith("encoder.")}, tmp_path / "enc.pt")
    assert "  dropped        0 tensors of the checkpoint (-)\n" in str(transfer_encoder(unetr, tmp_path / "enc.pt"))


@pytest.mark.parametrize("content, found", [(b"", "an empty file"), (b"hello\nworld\nmore\n", "text starting 'hello'")])
def test_the_description_is_the_whole_finding(tmp_path, content, found):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path / "f")
    assert str(err.value).endswith(f"found {found}.")
