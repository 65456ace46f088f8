"""Chest X-ray transforms that MONAI lacks: a PNG/JPEG/DICOM loader, classic histogram
equalisation, shorter-side resize and an area/aspect random resized crop.

Intended pipelines (ViT-B/16 at 224, as in the paper; all other steps are MONAI's own)::

    train: LoadChestXRayd("image") -> HistogramEqualized("image") -> ResizeShortestd("image", 256)
           -> RandResizedCropd("image", 224, scale=(0.08, 1.0))
           -> RandFlipd("image", prob=0.5, spatial_axis=1)          # horizontal flip
           -> RepeatChanneld("image", repeats=3)                     # grayscale -> 3 channels
           -> [NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD,
                                   channel_wise=True)]               # optional
    eval:  LoadChestXRayd -> HistogramEqualized -> ResizeShortestd(256)
           -> CenterSpatialCropd(roi_size=224) -> RepeatChanneld(repeats=3) -> [NormalizeIntensityd]

Everything up to the resize is deterministic, so MONAI's CacheDataset caches it (it stops at the
first ``Randomizable``). Images are channel-first ``(C, H, W)`` with H = rows; spatial axis 1 is
the image width.

The training bundles cache and send 8-bit images (``ToUInt8d``: 1 byte per pixel, where the original's
PIL pipeline held 8-bit images between its steps too) and replicate and normalise them on the device
(``PrepareChestXRayBatch``); inference keeps the float pipeline above, self-contained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.transforms import MapTransform, Randomizable, Resize, Transform
from monai.utils import convert_to_dst_type, ensure_tuple_rep
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HistogramEqualize",
    "HistogramEqualized",
    "LoadChestXRay",
    "LoadChestXRayd",
    "PrepareChestXRayBatch",
    "RandResizedCropd",
    "ResizeShortestd",
    "ToUInt8d",
    "equalize_histogram",
    "rand_resized_crop_box",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_EXPECTED = (
    "expected a 2D image PIL can read (PNG, JPEG, TIFF, ...), a single-frame DICOM file or a single-slice "
    "NIfTI/NRRD volume"
)
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# what 3D Slicer holds (and sends to MONAI Label) after loading a radiograph: a volume with one slice
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(_VOLUME_SUFFIXES)


def _volume_to_unit(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """A single-slice NIfTI/NRRD image -> float32 (rows, columns) in [0, 1] and its (row, column) spacing.

    The volume's first axis runs along the image columns and its second along the rows (as ITK, nibabel
    and 3D Slicer store a 2D image), so the slice is transposed to (rows, columns). 8- and 16-bit
    unsigned data are scaled by 255 and 65535 (as a PNG of that depth), other data by their range.
    """
    from monai.transforms import LoadImage

    try:
        vol = LoadImage(image_only=True, dtype=None)(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path} as a NIfTI/NRRD volume: {e}; {_EXPECTED}") from e
    arr = np.asarray(vol)
    spacing = (
        np.sqrt((np.asarray(vol.affine, dtype=np.float64)[:3, :2] ** 2).sum(axis=0)) if arr.ndim >= 2 else (1.0, 1.0)
    )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: a volume of shape {arr.shape}, not a single 2D slice; {_EXPECTED}")
    if arr.dtype == np.uint8:
        unit = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        unit = arr.astype(np.float32) / 65535.0
    else:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        unit = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.ascontiguousarray(unit.T), (float(spacing[1]), float(spacing[0]))


# ------------------------------------------------------------------------------------- loading
def _pil_to_unit(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 (H, W) in [0, 1]; 16-bit data keeps its full precision."""
    img = ImageOps.exif_transpose(img)  # JPEGs from phones/scanners may carry an orientation tag
    if img.mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":  # how PIL opens some 16-bit PNG/TIFF files
        return np.clip(np.asarray(img, dtype=np.float32), 0, 65535) / 65535.0
    if img.mode == "F":  # float TIFF: no fixed range, so use the data range
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    # L, LA, P, 1, RGB, RGBA, CMYK, ...: ITU-R 601 luma, alpha dropped
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM element (e.g. several VOI windows)."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def _dicom_to_unit(ds, path: Path, window: bool) -> tuple[np.ndarray, tuple[float, float]]:
    """Pixel data -> float32 (H, W) in [0, 1] with air dark, and the (row, column) spacing."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(f"{path}: {ds.NumberOfFrames} frames; {_EXPECTED}")
    try:
        arr = ds.pixel_array
    except Exception as e:  # compressed syntaxes need decoder plugins (pylibjpeg, gdcm)
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ValueError(
            f"cannot decode the pixel data of {path} (transfer syntax {tsuid}): {e}; "
            "compressed DICOM needs a pydicom decoder plugin such as pylibjpeg or gdcm"
        ) from e
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if int(ds.get("SamplesPerPixel", 1)) == 3:  # colour secondary captures: luma
        arr = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        lo, hi = 0.0, float(2**bits - 1)
    else:
        if not signed and bits < arr.dtype.itemsize * 8:
            arr = arr & ((1 << bits) - 1)  # high bits beyond BitsStored are not pixel data
        lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
        # modality LUT (rescale) maps stored values and the stored range alike
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        arr = arr.astype(np.float64) * slope + intercept
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    if window and "WindowCenter" in ds and "WindowWidth" in ds:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        out = np.clip((arr - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)  # DICOM linear VOI
    else:
        out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 shows low values bright; we want air dark like the PNGs
    spacing = ds.get("PixelSpacing", ds.get("ImagerPixelSpacing", None))
    spacing = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    return out.astype(np.float32), spacing


def _read_dicom(path: Path, force: bool):
    import pydicom  # imported lazily: PNG-only users never pay for it

    return pydicom.dcmread(path, force=force)


class LoadChestXRay(Transform):
    """Load a chest radiograph as a float32 ``MetaTensor`` of shape (1, H, W) in [0, 1], air dark.

    Reads every PIL image mode (L, I;16, RGB, RGBA, ... -> grayscale; 16-bit data is scaled by
    65535, not truncated to 8 bits), DICOM (BitsStored-aware, signed or unsigned, rescale
    slope/intercept applied, MONOCHROME1 inverted) and single-slice NIfTI/NRRD volumes (what 3D Slicer
    sends after loading a radiograph; see ``_volume_to_unit``). DICOM is recognised by its ``DICM`` preamble
    or a ``.dcm``/``.dicom`` suffix. The meta dict carries ``filename_or_obj`` and the affine holds
    the DICOM pixel spacing (row, column) when present.

    Args:
        window: for DICOM, apply the file's first WindowCenter/WindowWidth (DICOM linear VOI
            function) instead of mapping the whole stored range to [0, 1]. VOI LUT sequences are
            not applied. Histogram equalisation afterwards makes this matter little.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file is neither a readable image nor a decodable DICOM (names it).
    """

    def __init__(self, window: bool = False) -> None:
        self.window = window

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"chest X-ray file not found: {path}")
        with open(path, "rb") as f:
            is_dicom = f.read(132)[128:132] == b"DICM" or path.suffix.lower() in _DICOM_SUFFIXES
        spacing, fmt = (1.0, 1.0), "dicom" if is_dicom else "pil"
        if not is_dicom and _is_volume(path):
            arr, spacing = _volume_to_unit(path)
            fmt = "volume"
        elif is_dicom:
            arr, spacing = self._dicom(path, force=True)
        else:
            try:
                with Image.open(path) as img:
                    img.load()
                    arr = _pil_to_unit(img)
            except UnidentifiedImageError:
                arr, spacing = self._dicom(path, force=True)  # DICOM without a preamble
                fmt = "dicom"
            except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt image data
                raise ValueError(f"cannot read image {path}: {e}; {_EXPECTED}") from e
        if arr.ndim != 2:
            raise ValueError(f"{path}: pixel array of shape {arr.shape}; {_EXPECTED}")
        affine = torch.diag(torch.tensor([spacing[0], spacing[1], 1.0], dtype=torch.float64))
        meta = {
            "filename_or_obj": str(path),
            "spatial_shape": np.asarray(arr.shape),
            "original_channel_dim": 0,
            "format": fmt,
        }
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr))[None], affine=affine, meta=meta)

    def _dicom(self, path: Path, force: bool) -> tuple[np.ndarray, tuple[float, float]]:
        try:
            ds = _read_dicom(path, force)
        except Exception as e:
            raise ValueError(f"cannot read {path} as DICOM: {e}; {_EXPECTED}") from e
        if "PixelData" not in ds:
            raise ValueError(f"cannot read {path}: not an image and no DICOM pixel data; {_EXPECTED}")
        return _dicom_to_unit(ds, path, self.window)


class LoadChestXRayd(MapTransform):
    """Dictionary version of :class:`LoadChestXRay`: replaces each file path under ``keys`` by
    the loaded (1, H, W) image. Use it as the first transform of a MONAI ``Compose``.

    Args:
        keys: keys holding file paths (usually ``"image"``).
        window: see :class:`LoadChestXRay`.
        allow_missing_keys: do not raise if a key is absent.
    """

    def __init__(self, keys: KeysCollection, window: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadChestXRay(window=window)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


# ------------------------------------------------------------------------ histogram equalisation
def equalize_histogram(img: np.ndarray) -> np.ndarray:
    """Global histogram equalisation with 256 bins, returning float32 in [0, 1] on 256 levels.

    The bins span the image's own [min, max], so for 8-bit data (one level per bin) the result is
    exactly OpenCV's ``equalizeHist`` / 255, and 12-16 bit data are not crushed into a few levels.
    A constant image is returned unchanged (as ``equalizeHist`` does).
    """
    x = np.asarray(img, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x.astype(np.float32)
    idx = np.minimum(((x - lo) * (256.0 / (hi - lo))).astype(np.int64), 255)
    cdf = np.bincount(idx.ravel(), minlength=256).cumsum()
    cdf_min = cdf[0]  # bin 0 holds the minimum, so it is the first non-empty bin
    lut = np.round((cdf - cdf_min) * (255.0 / (cdf[-1] - cdf_min))) / 255.0
    return lut[idx].astype(np.float32)


class HistogramEqualize(Transform):
    """Classic global histogram equalisation (see :func:`equalize_histogram`) of a whole image.

    MONAI's ``HistogramNormalize`` interpolates the cumulative histogram linearly between bin
    centres (and switches to scikit-image's histogram when that is installed), which differs from
    ``equalizeHist`` by up to ~1.5 grey levels on 8-bit data; the paper's preprocessing is the
    classic one, hence this transform.
    """

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        out, *_ = convert_to_dst_type(equalize_histogram(arr), dst=img, dtype=np.float32)
        return out


class HistogramEqualized(MapTransform):
    """Dictionary version of :class:`HistogramEqualize`.

    Args:
        keys: keys of the images to equalise.
        allow_missing_keys: do not raise if a key is absent.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.equalize = HistogramEqualize()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.equalize(d[key])
        return d


# ------------------------------------------------------------------------------ resize and crop
class ResizeShortestd(MapTransform):
    """Resize so that the shorter spatial side equals ``size``, keeping the aspect ratio (MONAI's
    ``Resized`` offers only ``size_mode="longest"``). For the square NIH images this equals
    ``Resized(spatial_size=(size, size))``; it matters for DICOMs of other aspect ratios.

    Args:
        keys: keys of (C, H, W) images.
        size: target length of the shorter side.
        mode: interpolation mode of ``monai.transforms.Resize``; ``"area"`` averages when shrinking.
        allow_missing_keys: do not raise if a key is absent.
    """

    def __init__(self, keys: KeysCollection, size: int, mode: str = "area", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size, self.mode = int(size), mode

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            h, w = d[key].shape[-2:]
            scale = self.size / min(h, w)
            shape = (max(1, round(h * scale)), max(1, round(w * scale)))
            d[key] = Resize(spatial_size=shape, mode=self.mode)(d[key])
        return d


def rand_resized_crop_box(
    shape: Sequence[int], scale: Sequence[float], ratio: Sequence[float], rng: np.random.RandomState
) -> tuple[int, int, int, int]:
    """Sample (top, left, height, width) of a crop covering a ``scale`` fraction of the area with
    aspect ratio width/height drawn log-uniformly from ``ratio``; after 10 misses fall back to
    the largest central crop within ``ratio`` (the Inception / torchvision recipe)."""
    height, width = int(shape[0]), int(shape[1])
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.randint(0, height - h + 1)), int(rng.randint(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class RandResizedCropd(Randomizable, MapTransform):
    """Random crop of random area fraction and aspect ratio, resized to ``size`` (2D).

    MONAI's ``RandSpatialCropd(random_size=True)`` and ``RandScaleCropd`` draw each side
    independently, not an area fraction and a log-uniform aspect ratio, so they do not reproduce
    the RandomResizedCrop used for ViT training on ChestX-ray14. The same box is applied to every
    key. Seed it with ``set_random_state`` (``Compose.set_random_state`` does so too).

    Args:
        keys: keys of (C, H, W) images.
        size: output spatial size (int or (H, W)).
        scale: range of the crop's fraction of the image area.
        ratio: range of the crop's aspect ratio width / height.
        mode: interpolation mode of ``torch.nn.functional.interpolate``.
        anti_aliasing: for bilinear and bicubic, torch's antialiased interpolation, which widens the
            filter when shrinking as PIL does (torchvision's RandomResizedCrop, which the original code
            ran, resizes with PIL); about 10x faster than ``monai.transforms.Resize``'s Gaussian
            pre-smoothing, the largest cost of the chest X-ray data loader.
        allow_missing_keys: do not raise if a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int | Sequence[int],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        mode: str = "bilinear",
        anti_aliasing: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"expected 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got scale={scale}, ratio={ratio}"
            )
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.size, self.mode = ensure_tuple_rep(size, 2), mode
        self.antialias = anti_aliasing and mode in ("bilinear", "bicubic")
        self._box: tuple[int, int, int, int] | None = None

    def randomize(self, data: Sequence[int]) -> None:
        self._box = rand_resized_crop_box(data, self.scale, self.ratio, self.R)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        first = self.first_key(d)
        if first == ():
            return d
        self.randomize(d[first].shape[-2:])
        top, left, h, w = self._box
        for key in self.key_iterator(d):
            img = d[key]
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            x = x[None, :, top : top + h, left : left + w].float()
            align = False if self.mode in ("bilinear", "bicubic") else None
            out = torch.nn.functional.interpolate(
                x, self.size, mode=self.mode, align_corners=align, antialias=self.antialias
            )
            d[key] = convert_to_dst_type(out[0], dst=img, dtype=torch.float32)[0]
        return d


# ------------------------------------------------------------------------- 8-bit cache and transfer
class ToUInt8d(MapTransform):
    """[0, 1] images to their 8-bit levels ``round(255 x)`` (clipped to 0..255), as uint8.

    A cached 256 x 256 image takes 64 KiB instead of 256 KiB in float32 (ChestX-ray14's 86.5k train_val
    images: 5.3 GiB instead of 21.1 GiB), and a batch for the GPU 1 byte per pixel instead of 12 for three
    float32 channels. The rounding moves a pixel by at most half a grey level (1/510); the original's PIL
    pipeline rounded to 8 bits after each of its steps as well. Back to [0, 1]:
    ``ScaleIntensityRanged(a_min=0, a_max=255, b_min=0, b_max=1)``, or :class:`PrepareChestXRayBatch`.

    Args:
        keys: keys of the images.
        allow_missing_keys: do not raise if a key is absent.
    """

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            d[key] = (x.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
        return d


class PrepareChestXRayBatch(PrepareBatch):
    """``prepare_batch`` of the chest X-ray trainers and evaluators: moves a batch of 8-bit single-channel
    images (B, 1, H, W) to the device, and there scales it to [0, 1], replicates it to ``channels`` and
    normalises each channel with ``mean`` and ``std`` (what RepeatChanneld and NormalizeIntensityd with
    ``channel_wise=True`` did in the data-loader workers). The label, if any, is moved with ``kwargs``.

    Args:
        mean: per-channel subtrahend (``channels`` values).
        std: per-channel divisor (``channels`` values).
        channels: channels the network takes (3 for ImageNet-style ViTs).

    Example::

        prepare = PrepareChestXRayBatch(IMAGENET_MEAN, IMAGENET_STD)
        image, label = prepare({"image": torch.zeros(2, 1, 224, 224, dtype=torch.uint8)}, torch.device("cpu"))
        image.shape  # (2, 3, 224, 224), float32
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int = 3) -> None:
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"expected {channels} values of mean and std, got {list(mean)} and {list(std)}")
        self.mean, self.std, self.channels = [float(m) for m in mean], [float(s) for s in std], int(channels)

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        image = batchdata["image"]
        if image.dtype != torch.uint8 or image.shape[1] != 1:
            raise ValueError(
                f"expected 8-bit single-channel images (B, 1, H, W) uint8, got {tuple(image.shape)} "
                f"{image.dtype}; the bundle's transforms end with ToUInt8d"
            )
        image = image.to(device=device, non_blocking=non_blocking).float().div_(255)
        shape = (1, self.channels) + (1,) * (image.ndim - 2)
        mean = torch.tensor(self.mean, device=image.device).view(shape)
        std = torch.tensor(self.std, device=image.device).view(shape)
        image = (image.expand(-1, self.channels, *image.shape[2:]) - mean) / std
        label = batchdata.get("label")
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kwargs)
        return image, label
