"""Chest X-ray transforms: loading every format to the same [0, 1] image, equalisation, crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cxr_helpers import write_dicom
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCropd, Compose, NormalizeIntensityd, RandFlipd, RepeatChanneld
from PIL import Image

from selfmedmae_components.transforms.cxr import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    HistogramEqualize,
    HistogramEqualized,
    LoadChestXRay,
    LoadChestXRayd,
    RandResizedCropd,
    ResizeShortestd,
    equalize_histogram,
    rand_resized_crop_box,
)

H, W = 48, 40  # non-square, so a transposed loader would show


def _content() -> np.ndarray:
    """Smooth 12-bit test content (air dark, tissue bright) of shape (H, W)."""
    y, x = np.mgrid[0:H, 0:W]
    return np.round(4095 * (0.5 + 0.5 * np.sin(x / 7.0) * np.cos(y / 11.0)) * (y + 1) / H).astype(np.uint16)


def test_dicom_monochrome1_12bit_matches_monochrome2_and_png(tmp_path):
    content = _content()  # as a viewer shows it: air dark
    write_dicom(tmp_path / "m1.dcm", 4095 - content, "MONOCHROME1")  # stored inverted
    write_dicom(tmp_path / "m2.dcm", content, "MONOCHROME2", PixelSpacing=[0.2, 0.1])
    Image.fromarray(np.round(content / 4095 * 255).astype(np.uint8)).save(tmp_path / "c.png")
    load = LoadChestXRay()
    m1, m2, png = (load(tmp_path / n) for n in ("m1.dcm", "m2.dcm", "c.png"))
    for img in (m1, m2, png):
        assert isinstance(img, MetaTensor) and img.shape == (1, H, W) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
    assert torch.allclose(m1, m2, atol=1e-6)
    assert torch.allclose(m1, png, atol=0.5 / 255 + 1e-6)  # 8-bit quantisation
    assert m1.meta["filename_or_obj"] == str(tmp_path / "m1.dcm")
    assert m2.affine[0, 0] == pytest.approx(0.2) and m2.affine[1, 1] == pytest.approx(0.1)


def test_dicom_rescale_high_bits_and_window(tmp_path):
    content = _content()
    plain = LoadChestXRay()
    write_dicom(tmp_path / "a.dcm", content, "MONOCHROME2")
    # rescale is linear, so the [0, 1] image is unchanged; bits above BitsStored are not pixel data
    write_dicom(tmp_path / "b.dcm", content | 0xF000, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-1024)
    assert torch.allclose(plain(tmp_path / "a.dcm"), plain(tmp_path / "b.dcm"), atol=1e-6)
    write_dicom(tmp_path / "w.dcm", content, "MONOCHROME2", WindowCenter=2048, WindowWidth=1024)
    img = LoadChestXRay(window=True)(tmp_path / "w.dcm")[0].numpy()
    expected = np.clip((content - 2047.5) / 1023 + 0.5, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "I;16"])
def test_png_modes_load_as_same_grayscale(tmp_path, mode):
    gray = (_content() >> 4).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit holding the same levels
    else:
        img = Image.fromarray(gray).convert(mode)
    img.save(tmp_path / "x.png")
    out = LoadChestXRayd("image")({"image": str(tmp_path / "x.png"), "label": [0.0]})
    assert out["label"] == [0.0] and out["image"].shape == (1, H, W)
    np.testing.assert_allclose(out["image"][0].numpy(), gray / 255.0, atol=1e-6)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        LoadChestXRay()(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.png.*DICOM"):
        LoadChestXRay()(tmp_path / "junk.png")
    Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ValueError, match=r"t\.png"):
        LoadChestXRay()(tmp_path / "t.png")


def _cv2_equalize(u8: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist, written out (cv::equalizeHist, 8-bit)."""
    hist = np.bincount(u8.ravel(), minlength=256)
    i = int(np.nonzero(hist)[0][0])
    lut = np.round((hist.cumsum() - hist[i]) * 255.0 / (u8.size - hist[i]))
    return lut[u8]


def test_histogram_equalisation_is_classic_and_uniform():
    rng = np.random.default_rng(0)
    u8 = np.round(rng.beta(2, 6, (1, 128, 128)) * 200 + 20).astype(np.uint8)  # skewed, not full range
    out = HistogramEqualized("image")({"image": MetaTensor(torch.from_numpy(u8 / 255.0).float())})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    np.testing.assert_array_equal(np.round(out.numpy() * 255), _cv2_equalize(u8))
    counts = np.histogram(out.numpy(), bins=8, range=(0, 1))[0]
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()  # ~uniform
    # 12-bit data in a 16-bit range keeps 256 levels instead of collapsing into a few
    deep = rng.integers(0, 4096, (64, 64)) / 65535.0
    assert len(np.unique(equalize_histogram(deep))) > 200
    const = np.full((4, 4), 0.3, np.float32)
    np.testing.assert_array_equal(HistogramEqualize()(const), const)


def test_rand_resized_crop_shape_determinism_and_box_bounds():
    img = MetaTensor(torch.rand(1, 256, 256))
    crop = lambda seed: RandResizedCropd("image", 224).set_random_state(seed)({"image": img})["image"]
    a, b, c = crop(0), crop(0), crop(1)
    assert a.shape == (1, 224, 224)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rng = np.random.RandomState(0)
    for _ in range(200):
        top, left, h, w = rand_resized_crop_box((256, 192), (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 192
        assert 0.07 <= h * w / (256 * 192) <= 1.0 and 0.74 <= w / h <= 1.34
    # impossible aspect range -> largest central crop of the nearest allowed ratio
    assert rand_resized_crop_box((100, 100), (0.9, 1.0), (2.0, 3.0), rng) == (25, 0, 50, 100)
    with pytest.raises(ValueError, match="scale"):
        RandResizedCropd("image", 224, scale=(0.5, 0.1))


def test_documented_pipelines_run(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260), dtype=np.uint8)).convert("RGBA").save(
        tmp_path / "x.png"
    )
    head = [LoadChestXRayd("image"), HistogramEqualized("image"), ResizeShortestd("image", 256)]
    tail = [
        RepeatChanneld("image", repeats=3),
        NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
    ]
    train = Compose([*head, RandResizedCropd("image", 224), RandFlipd("image", prob=0.5, spatial_axis=1), *tail])
    evaluate = Compose([*head, CenterSpatialCropd("image", roi_size=224), *tail])
    train.set_random_state(0)
    assert ResizeShortestd("image", 256)({"image": torch.zeros(1, 300, 200)})["image"].shape == (1, 384, 256)
    for t in (train, evaluate):
        out = t({"image": str(tmp_path / "x.png")})["image"]
        assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
        channels = [out[i] * IMAGENET_STD[i] + IMAGENET_MEAN[i] for i in range(3)]  # undo the normalisation
        assert torch.allclose(channels[0], channels[1], atol=1e-5) and torch.allclose(
            channels[0], channels[2], atol=1e-5
        )
