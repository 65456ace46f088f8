"""Cached crop centres at 1 bit per voxel: MONAI's FgBgToIndicesd gives int64 voxel indices, 8 bytes per
foreground or background voxel, more than the float16 image they are cached beside."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["PackedIndices", "PackIndicesd"]


class PackedIndices:
    """Sorted flat voxel indices (as ``FgBgToIndicesd`` gives them) kept as a bit mask over the volume:
    ``len()`` and ``[k]`` (the k-th index) are all ``RandCropByPosNegLabeld`` reads, so it takes them in place
    of the index array and draws the same crop centres.

    1 bit per voxel of the volume plus a count per block of 4096 voxels, instead of 8 bytes (int64) per
    index; ``[k]`` unpacks one block. ``np.asarray`` gives the index array back.

    Args:
        indices: sorted flat indices into a volume of ``size`` voxels.
        size: number of voxels of the volume (its spatial shape's product).

    Example::

        packed = PackedIndices(np.array([3, 5, 9000]), size=10000)
        len(packed), packed[2]  # 3, 9000
    """

    BLOCK = 4096  # voxels per counted block (a multiple of 8)

    def __init__(self, indices: np.ndarray | torch.Tensor, size: int) -> None:
        indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).ravel()
        mask = np.zeros(int(size), dtype=bool)
        mask[indices] = True
        self.bits = np.packbits(mask)
        self.ends = np.cumsum(
            np.bincount(indices // self.BLOCK, minlength=-(-int(size) // self.BLOCK))
        )  # set bits up to each block's end
        self.size = int(size)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, k: int) -> int:
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} indices")
        block = int(np.searchsorted(self.ends, k, side="right"))
        before = int(self.ends[block - 1]) if block else 0
        bits = np.unpackbits(self.bits[block * self.BLOCK // 8 : (block + 1) * self.BLOCK // 8])
        return block * self.BLOCK + int(np.flatnonzero(bits)[k - before])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.flatnonzero(np.unpackbits(self.bits, count=self.size)).astype(dtype or np.int64)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes + self.ends.nbytes


class PackIndicesd(MapTransform):
    """Replaces the index arrays under ``keys`` (e.g. ``FgBgToIndicesd``'s ``label_fg_indices`` and
    ``label_bg_indices``) by :class:`PackedIndices` over the volume of ``ref_key``.

    Args:
        keys: keys of flat voxel index arrays.
        ref_key: key of the (C, *spatial) image or label the indices point into.
        allow_missing_keys: do not raise if a key is absent (e.g. no label crops).
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = PackedIndices(d[key], int(np.prod(d[self.ref_key].shape[1:])))
        return d
