"""The paper's Figure 2 for a pre-trained MAE checkpoint: rows original / masked / reconstruction, one
column per case (the middle axial slice of a central ROI crop for 3D bundles, the centre crop for 2D).

    python tools/reconstruction_figure.py bundles/btcv_seg/models/mae_pretrain.pt --bundle btcv_seg \\
        --dataset_dir /data/btcv --cases 4 --mask_ratio 0.75 --out fig2_btcv.png

The network and the deterministic preprocessing come from the bundle's own pretrain config (read with
monai.bundle.ConfigParser), so the figure follows the bundle: a checkpoint pre-trained with the demo
preset or with overrides needs the same here (``--preset demo``, ``--override roi_size=[64,64,64]``).
Cases come from the datalist's ``evaluation`` list (images never seen in pre-training) unless
``--split`` says otherwise. Each tile is drawn by ``handlers.reconstruction_panel`` (the image the
pre-training writes to TensorBoard): visible patches show the input, masked ones the prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selfmedmae_components import errors, registry  # noqa: E402

ROWS = ("original", "masked", "reconstruction")
GAP, LABEL_WIDTH, HEADER = 4, 110, 20


def parse_overrides(items: list[str] | None) -> dict:
    """``["key=value", ...]`` -> {key: YAML-parsed value} (``roi_size=[32,32,32]`` gives a list)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--override expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def bundle_parser(bundle: str, config: str, presets: list[str], overrides: dict):
    """A ConfigParser on ``bundles/<bundle>/configs/<config>.yaml`` layered with presets and overrides; ``bundle``
    may also be a dataset's name (registry: btcv, brats, cxr14)."""
    from monai.bundle import ConfigParser

    entry = registry.find(bundle)
    bundle = entry.bundle if entry else bundle
    files = [REPO / "bundles" / bundle / "configs" / f"{name}.yaml" for name in [config, *presets]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"config file(s) not found: {missing}")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    return parser


def case_transform(parser, roi_size):
    """The pretrain config's deterministic preprocessing, a central ROI crop, then the non-random part of
    its augmentation (2D: channel repeat and intensity normalisation); random crops and flips are left out."""
    from monai.transforms import CenterSpatialCropd, Compose, Randomizable

    steps = list(parser.get_parsed_content("train#preprocessing"))
    steps.append(CenterSpatialCropd(keys="image", roi_size=roi_size))
    for t in parser.get_parsed_content("train#augmentation"):
        if not isinstance(t, Randomizable):
            steps.append(t)
    return Compose(steps)


def reconstruction_tiles(mae, image: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """[original, masked, reconstruction] uint8 tiles of one sample, cut from ``reconstruction_panel``."""
    from selfmedmae_components.handlers import reconstruction_panel

    return np.split(reconstruction_panel(mae, image, pred, mask), 3, axis=1)


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def compose_figure(columns: list[list[np.ndarray]], names: list[str], title: str = "") -> Image.Image:
    """Tiles laid out as 3 rows (original / masked / reconstruction) x one column per case, with labels."""
    th, tw = columns[0][0].shape
    n = len(columns)
    width = LABEL_WIDTH + n * tw + (n - 1) * GAP
    height = HEADER + 3 * th + 2 * GAP + (HEADER if title else 0)
    fig = Image.new("L", (width, height), 255)
    draw, font = ImageDraw.Draw(fig), _font()
    top = HEADER + (HEADER if title else 0)
    if title:
        draw.text((4, 2), title, fill=0, font=font)
    for j, (tiles, name) in enumerate(zip(columns, names)):
        x = LABEL_WIDTH + j * (tw + GAP)
        draw.text((x + 2, top - HEADER + 2), name[: max(4, tw // 8)], fill=0, font=font)
        for i, tile in enumerate(tiles):
            fig.paste(Image.fromarray(tile), (x, top + i * (th + GAP)))
    for i, label in enumerate(ROWS):
        draw.text((4, top + i * (th + GAP) + th // 2 - 7), label, fill=0, font=font)
    fig.info.update(rows="3", columns=str(n), tile=f"{tw}x{th}")
    return fig


def make_figure(
    checkpoint: str,
    bundle: str,
    dataset_dir: str,
    out: str,
    cases: int = 4,
    mask_ratio: float | None = None,
    split: str = "evaluation",
    presets: list[str] | None = None,
    overrides: dict | None = None,
    seed: int = 0,
) -> Path:
    from monai.utils import set_determinism

    from selfmedmae_components.data.common import load_datalist
    from selfmedmae_components.weights import CheckpointError, load_state_dict

    entry = registry.find(bundle)  # a dataset's name (btcv) stands for its bundle folder (btcv_seg)
    bundle = entry.bundle if entry else bundle
    settings = {
        "dataset_dir": str(dataset_dir),
        "device": "$torch.device('cpu')",
        "num_workers": 0,
        **(overrides or {}),
    }
    parser = bundle_parser(bundle, "pretrain", presets or [], settings)
    if "mae_crops" in parser.get():
        parser["mae_crops"] = "random"  # images only: the figure needs no labels
    mae = parser.get_parsed_content("network_def")
    state = load_state_dict(checkpoint)
    try:
        mae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint} does not fit the {bundle} pretrain network: pass the settings it was pre-trained with "
            f"(--preset demo, --override roi_size=[...] hidden_size=...).\n{str(e)[:1500]}"
        ) from e
    mae.eval()
    ratio = float(parser.get_parsed_content("mask_ratio") if mask_ratio is None else mask_ratio)
    items = load_datalist(parser.get_parsed_content("datalist_file"), split, dataset_dir)[:cases]
    if not items:
        raise SystemExit(f"the datalist's '{split}' list is empty")
    transform = case_transform(parser, list(mae.encoder.img_size))
    set_determinism(seed=seed)
    columns, names = [], []
    for item in items:
        image = transform({"image": item["image"]})["image"]
        image = torch.as_tensor(image).float()[None]
        with torch.no_grad():
            _, pred, mask = mae(image, mask_ratio=ratio)
        columns.append(reconstruction_tiles(mae, image, pred, mask))
        names.append(Path(str(item["image"])).name.split(".")[0])
    fig = compose_figure(columns, names, title=f"{bundle}: MAE reconstruction, mask ratio {ratio:g}")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    for k, v in fig.info.items():
        meta.add_text(k, v)
    fig.save(out_path, pnginfo=meta)
    print(f"wrote {out_path}: 3 rows x {len(columns)} cases, mask ratio {ratio:g}, checkpoint {checkpoint}")
    return out_path


def main(argv: list[str] | None = None) -> None:
    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="MAE pre-training checkpoint (models/mae_pretrain.pt)")
    p.add_argument(
        "--bundle",
        default="btcv_seg",
        help="a bundle folder under bundles/ or its dataset's name: "
        + ", ".join(f"{d.bundle} ({d.name})" for d in registry.DATASETS),
    )
    p.add_argument("--dataset_dir", required=True, help="the prepared dataset (with datalist.json)")
    p.add_argument("--cases", type=int, default=4, help="columns (cases) in the figure")
    p.add_argument("--mask_ratio", type=float, default=None, help="default: the config's (pre-training) mask ratio")
    p.add_argument("--split", default="evaluation", help="datalist list the cases come from")
    p.add_argument(
        "--preset", action="append", default=[], help="extra config of the bundle layered on pretrain.yaml (e.g. demo)"
    )
    p.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config ids as pre-trained, e.g. roi_size=[32,32,32] hidden_size=48",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--out", default="reconstruction.png", help="PNG to write")
    a = p.parse_args(argv)
    make_figure(
        a.checkpoint,
        a.bundle,
        a.dataset_dir,
        a.out,
        a.cases,
        a.mask_ratio,
        a.split,
        a.preset,
        parse_overrides(a.override),
        a.seed,
    )


if __name__ == "__main__":
    sys.exit(main())
