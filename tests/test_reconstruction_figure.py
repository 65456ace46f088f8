"""tools/reconstruction_figure.py: the paper's Figure 2 layout (3 rows x N cases) from a bundle's pretrain config."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfmedmae_components.data import btcv
from selfmedmae_components.data.demo import btcv as btcv_demo
from selfmedmae_components.weights import CheckpointError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import reconstruction_figure as rf  # noqa: E402

TINY = {"roi_size": [32, 32, 32], "pixdim": [8.0, 8.0, 8.0], "hidden_size": 48, "decoder_hidden_size": 48}


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig")
    btcv_demo.make_demo(root / "btcv", num_test_cases=1, shape=(64, 64, 24))
    btcv.prepare_datalist(root / "btcv")
    parser = rf.bundle_parser("btcv_seg", "pretrain", ["demo"], {**TINY, "device": "$torch.device('cpu')"})
    torch.manual_seed(0)
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, root / "mae.pt")
    return root


def test_figure_has_three_rows_and_one_column_per_case(data_and_checkpoint):
    root = data_and_checkpoint
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    rf.main(
        [
            str(root / "mae.pt"),
            "--bundle",
            "btcv_seg",
            "--dataset_dir",
            str(root / "btcv"),
            "--cases",
            "3",
            "--mask_ratio",
            "0.5",
            "--preset",
            "demo",
            "--override",
            *overrides,
            "--out",
            str(root / "fig.png"),
        ]
    )
    img = Image.open(root / "fig.png")
    assert img.text["rows"] == "3" and img.text["columns"] == "3"
    tw, th = map(int, img.text["tile"].split("x"))
    assert img.size == (rf.LABEL_WIDTH + 3 * tw + 2 * rf.GAP, 2 * rf.HEADER + 3 * th + 2 * rf.GAP)
    px = np.asarray(img.convert("L"))
    tile = lambda r, c: px[2 * rf.HEADER + r * (th + rf.GAP) :][:th, rf.LABEL_WIDTH + c * (tw + rf.GAP) :][:, :tw]
    for c in range(3):
        original, masked, recon = (tile(r, c) for r in range(3))
        assert original.std() > 10  # an image, not a blank tile
        # half the 2 x 2 x 2 patches are masked: the masked view differs from the original, black where masked
        diff = original.astype(int) != masked
        assert 0.2 < diff.mean() < 0.8 and (masked[diff] == 0).all()
        visible = masked > 0
        assert (recon[visible] == original[visible]).all()  # visible patches are shown as the input
    assert len({tile(0, c).tobytes() for c in range(3)}) == 3  # three different cases


def test_a_checkpoint_of_other_settings_says_which_to_pass(data_and_checkpoint, tmp_path):
    root = data_and_checkpoint
    with pytest.raises(CheckpointError, match=r"(?s)does not fit the btcv_seg pretrain network.*--preset demo"):
        rf.make_figure(
            str(root / "mae.pt"),
            "btcv_seg",
            str(root / "btcv"),
            str(tmp_path / "x.png"),
            cases=1,
            presets=["demo"],
            overrides={**TINY, "hidden_size": 96},
        )
