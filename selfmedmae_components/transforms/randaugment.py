"""RandAugment (Cubuk et al. 2020) for grayscale radiographs in [0, 1].

MONAI has no RandAugment; the paper fine-tunes on ChestX-ray14 with RandAugment at magnitude 9 as
in the MAE fine-tuning recipe (timm's ``rand-m9-mstd0.5-inc1``). This is that policy on a
single-channel tensor: per image, ``num_ops`` operations are drawn uniformly (with replacement),
each applied with probability ``prob`` at a magnitude drawn from N(``magnitude``, ``magnitude_std``)
and clipped to [0, 10]; with level ``l = magnitude / 10``:

    auto_contrast, equalize, invert            (no magnitude)
    rotate          +-30 l degrees             shear_x, shear_y      +-0.3 l
    translate_x/y   +-0.45 l of the side       posterize             4 - int(4 l) bits
    solarize        invert above 1 - l         solarize_add          +110/255 l below mid grey
    contrast, brightness, sharpness            factor 1 +- 0.9 l (PIL's ImageEnhance definitions)

timm's ``Color`` is left out (a no-op on grayscale). Geometric operations use MONAI's ``Affine``
about the image centre, filling uncovered pixels with ``fill`` (timm fills with the ImageNet mean).
Apply it before the channel replication and intensity normalisation, where PIL-based RandAugment
sits in the original pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Affine, MapTransform, Randomizable
from monai.utils import convert_to_dst_type

from .cxr import IMAGENET_MEAN, equalize_histogram

__all__ = ["OPS", "RandAugmentd", "apply_op"]

_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13  # PIL ImageFilter.SMOOTH


def _affine(x: torch.Tensor, fill: float, **params: Sequence[float]) -> torch.Tensor:
    out = Affine(padding_mode="zeros", mode="bilinear", image_only=True, **params)(x - fill)
    return torch.as_tensor(out) + fill


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (x - degenerate)``, clipped to [0, 1]."""
    return (degenerate + factor * (x - degenerate)).clamp(0, 1)


def _sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    smooth = F.conv2d(x[:, None], _SMOOTH.to(x)[None, None], padding=1)[:, 0]
    degenerate = x.clone()
    degenerate[:, 1:-1, 1:-1] = smooth[:, 1:-1, 1:-1]  # PIL leaves the border pixels unchanged
    return _blend(degenerate, x, factor)


def _posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    step = 2 ** (8 - bits)
    return torch.floor(torch.round(x * 255) / step) * step / 255


def _auto_contrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)


# name -> function of (image (C, H, W), level in [0, 1], sign +-1, fill)
OPS: dict[str, Callable[[torch.Tensor, float, float, float], torch.Tensor]] = {
    "auto_contrast": lambda x, l, s, f: _auto_contrast(x),
    "equalize": lambda x, l, s, f: torch.stack([torch.from_numpy(equalize_histogram(c.numpy())) for c in x]),
    "invert": lambda x, l, s, f: 1 - x,
    "rotate": lambda x, l, s, f: _affine(x, f, rotate_params=[s * math.radians(30 * l)]),
    "shear_x": lambda x, l, s, f: _affine(x, f, shear_params=[0.0, s * 0.3 * l]),
    "shear_y": lambda x, l, s, f: _affine(x, f, shear_params=[s * 0.3 * l, 0.0]),
    "translate_x": lambda x, l, s, f: _affine(x, f, translate_params=[0.0, s * 0.45 * l * x.shape[-1]]),
    "translate_y": lambda x, l, s, f: _affine(x, f, translate_params=[s * 0.45 * l * x.shape[-2], 0.0]),
    "posterize": lambda x, l, s, f: _posterize(x, 4 - int(4 * l)),
    "solarize": lambda x, l, s, f: torch.where(x >= 1 - l, 1 - x, x),
    "solarize_add": lambda x, l, s, f: torch.where(x < 128 / 255, (x + 110 / 255 * l).clamp(0, 1), x),
    "contrast": lambda x, l, s, f: _blend(x.mean().expand_as(x), x, 1 + s * 0.9 * l),
    "brightness": lambda x, l, s, f: _blend(torch.zeros_like(x), x, 1 + s * 0.9 * l),
    "sharpness": lambda x, l, s, f: _sharpness(x, 1 + s * 0.9 * l),
}


def apply_op(
    name: str, img: torch.Tensor, magnitude: float, sign: float = 1.0, fill: float = IMAGENET_MEAN[0]
) -> torch.Tensor:
    """Apply one RandAugment operation at ``magnitude`` (0-10) to a (C, H, W) image in [0, 1]."""
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; expected one of {sorted(OPS)}")
    x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
    out = OPS[name](x.float(), min(max(magnitude, 0.0), 10.0) / 10, sign, fill)
    return convert_to_dst_type(out, dst=img, dtype=out.dtype)[0]


class RandAugmentd(Randomizable, MapTransform):
    """RandAugment on (C, H, W) images in [0, 1] (see the module docstring). The same operations
    and magnitudes are applied to every key.

    Args:
        keys: keys of the images.
        num_ops: operations drawn per image (2 in timm's policy); 0 disables the transform.
        magnitude: mean magnitude on timm's 0-10 scale (9 in the paper).
        magnitude_std: standard deviation of the per-operation magnitude (0.5; 0 = fixed).
        prob: probability that each drawn operation is applied (0.5, as timm).
        ops: names of the operations to draw from (default: all of :data:`OPS`).
        fill: value of pixels uncovered by rotate / shear / translate.
        allow_missing_keys: do not raise if a key is absent.

    Example::

        aug = RandAugmentd("image", num_ops=2, magnitude=9)
        out = aug({"image": torch.rand(1, 224, 224)})["image"]
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        ops: Sequence[str] | None = None,
        fill: float = IMAGENET_MEAN[0],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ops = list(OPS) if ops is None else list(ops)
        unknown = [o for o in self.ops if o not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; expected a non-empty subset of {sorted(OPS)}")
        if num_ops < 0 or not 0 <= magnitude <= 10 or not 0 <= prob <= 1:
            raise ValueError(
                f"expected num_ops >= 0, 0 <= magnitude <= 10 and 0 <= prob <= 1, got {num_ops}, {magnitude}, {prob}"
            )
        self.num_ops, self.magnitude, self.magnitude_std = int(num_ops), float(magnitude), float(magnitude_std)
        self.prob, self.fill = float(prob), float(fill)
        self._chosen: list[tuple[str, float, float]] = []

    def randomize(self, data: object = None) -> None:
        self._chosen = []
        for _ in range(self.num_ops):
            name = self.ops[self.R.randint(len(self.ops))]
            magnitude = self.magnitude + (self.R.normal(0, self.magnitude_std) if self.magnitude_std > 0 else 0.0)
            sign = 1.0 if self.R.rand() < 0.5 else -1.0
            if self.R.rand() < self.prob:
                self._chosen.append((name, float(np.clip(magnitude, 0, 10)), sign))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            for name, magnitude, sign in self._chosen:
                d[key] = apply_op(name, d[key], magnitude, sign, self.fill)
        return d
