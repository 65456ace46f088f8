"""What each bundle's own configs build, pinned against the paper rather than against each other: the mask ratio
the network sees in a real training step, and the encoder blocks the UNETR's skips come from. Built in process
from the shipped config files with tiny widths (ConfigParser overrides), never from the demo preset, whose
skips and depth differ."""

import pytest
import torch
from bundle_runner import REPO
from monai.bundle import ConfigParser

pytestmark = pytest.mark.usefixtures("one_thread")

# REFERENCE.md: 0.125 is the paper's best ratio for segmentation, 0.75 MAE's for chest X-ray pre-training
PAPER_MASK_RATIO = {"btcv_seg": 0.125, "brats_seg": 0.125, "msd_seg": 0.125, "cxr14_cls": 0.75}
UNETR_BUNDLES = ("btcv_seg", "brats_seg", "msd_seg")
TINY_WIDTH = dict(hidden_size=48, num_heads=4, decoder_hidden_size=48, decoder_num_layers=1, decoder_num_heads=4)


def parser(bundle: str, stage: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config(str(REPO / "bundles" / bundle / "configs" / f"{stage}.yaml"))
    p.update(overrides)
    return p


def tiny_pretrain(bundle: str, tmp_path, **overrides) -> tuple[ConfigParser, dict, int]:
    """The bundle's pretrain config with one tiny block on a 16-token grid, fed one in-memory batch of the kind
    its data loader gives; returns the parser, the batch and the number of tokens."""
    if bundle == "cxr14_cls":
        size = dict(img_size=64)  # 4 x 4 tokens; the batch is 8-bit grey, as the loader gives it
        batch = {"image": torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)}
    else:
        channels = {"brats_seg": 4}.get(bundle, 1)
        size = dict(roi_size=[64, 32, 32], in_channels=channels)  # 4 x 2 x 2 tokens
        batch = {"image": torch.rand(2, channels, 64, 32, 32)}
    p = parser(
        bundle,
        "pretrain",
        bundle_root=str(tmp_path),
        device="$torch.device('cpu')",
        amp=False,
        num_layers=1,
        max_epochs=1,
        warmup_epochs=0,
        micro_batch_size=0,
        **TINY_WIDTH,
        **size,
        **overrides,
    )
    p["train#dataloader"], p["train#data"], p["train#handlers"] = [batch], [{}], []
    return p, batch, 16


@pytest.mark.parametrize("bundle", sorted(PAPER_MASK_RATIO))
@pytest.mark.parametrize("override", [None, 0.5], ids=["bundle_default", "override_0.5"])
def test_a_training_step_masks_the_bundles_mask_ratio(bundle, override, tmp_path):
    """One step of the bundle's own SupervisedTrainer and MAETrainingStep: the encoder's first block sees
    1 + L * (1 - mask_ratio) tokens. 0.5 differs from the network's default (0.75), so a step that stopped passing
    the ratio fails for cxr14_cls too; the default is the paper's."""
    p, _, tokens = tiny_pretrain(bundle, tmp_path, **({} if override is None else {"mask_ratio": override}))
    expected_ratio = PAPER_MASK_RATIO[bundle] if override is None else override
    assert p.get_parsed_content("mask_ratio") == expected_ratio
    seen = []
    network = p.get_parsed_content("network_def")
    network.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    p["network_def"] = network  # the trainer's network is this one (ConfigParser resolves it once)
    p.get_parsed_content("train#trainer").run()
    assert seen, "the training step never ran the encoder"
    assert seen == [1 + int(tokens * (1 - expected_ratio))] * len(seen)


def hidden_state_outputs(unetr) -> tuple[dict, dict]:
    """Forward hooks: each encoder block's output (cls removed), and the input of the decoder's skip encoders."""
    block_out, skip_in = {}, {}
    for number, block in enumerate(unetr.encoder.blocks, start=1):
        block.register_forward_hook(lambda m, i, out, n=number: block_out.__setitem__(n, out[:, 1:]))
    for name in ("encoder2", "encoder3", "encoder4"):
        getattr(unetr, name).register_forward_pre_hook(lambda m, args, n=name: skip_in.__setitem__(n, args[0]))
    return block_out, skip_in


@pytest.mark.parametrize("bundle", UNETR_BUNDLES)
@pytest.mark.parametrize("stage", ["finetune", "evaluate", "inference"])
def test_the_bundles_unetr_takes_its_skips_from_blocks_4_7_10(bundle, stage):
    """The UNETR each stage builds from its config (12 blocks as ViT-B, tiny width) feeds the decoder with the
    outputs of blocks 4, 7 and 10 counted from 1 (REFERENCE.md: hidden_states_out[3], [6], [9]); a skip index
    changed in a bundle's configs, consistently or not, fails here."""
    channels = {"brats_seg": 4}.get(bundle, 1)
    p = parser(
        bundle,
        stage,
        roi_size=[32, 32, 32],
        in_channels=channels,
        out_channels=2,
        hidden_size=48,
        num_heads=4,
        feature_size=8,
    )
    unetr = p.get_parsed_content("network_def").eval()
    assert len(unetr.encoder.blocks) == 12
    block_out, skip_in = hidden_state_outputs(unetr)
    with torch.no_grad():
        unetr(torch.randn(1, channels, 32, 32, 32))
    for name, block_number in (("encoder2", 4), ("encoder3", 7), ("encoder4", 10)):
        assert torch.equal(skip_in[name], unetr.tokens_to_volume(block_out[block_number])), (name, block_number)
