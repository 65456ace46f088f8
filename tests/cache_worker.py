"""A small preprocessing pipeline over NIfTI files, filled into a disk cache, for tests/test_cache.py; run as a script it
fills the cache in its own process (several at once share one folder; ``--kill_at N`` kills itself while writing the
N-th array file, as a killed run would be).

    python tests/cache_worker.py CACHE_DIR FILE [FILE ...] [--pixdim 2.0] [--slow 0.0] [--kill_at N] [--start FILE]

``--start FILE``: write FILE.<pid>.ready, then wait for FILE to exist before filling (processes started together compute each entry at the same
time); prints how many entries it computed itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfmedmae_components.data import cache  # noqa: E402


class Slowd(MapTransform):
    """Deterministic, and slow enough that two processes filling one cache overlap."""

    def __init__(self, keys, seconds: float) -> None:
        super().__init__(keys)
        self.seconds = seconds

    def __call__(self, data):
        time.sleep(self.seconds)
        return dict(data)


def pipeline(pixdim: float = 2.0, slow: float = 0.0) -> Compose:
    return Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            Spacingd("image", pixdim=[pixdim] * 3, mode="bilinear"),
            ScaleIntensityRanged("image", -100.0, 200.0, 0.0, 1.0, clip=True),
            Slowd("image", slow),
            EnsureTyped("image", track_meta=False),
            CastToTyped("image", dtype=torch.float16),
            RandSpatialCropd("image", roi_size=[8, 8, 8], random_size=False),
        ]
    )


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("cache_dir")
    args.add_argument("files", nargs="+")
    args.add_argument("--pixdim", type=float, default=2.0)
    args.add_argument("--slow", type=float, default=0.0)
    args.add_argument("--kill_at", type=int, default=0)
    args.add_argument("--start", default=None)
    a = args.parse_args()
    if a.kill_at:
        save, calls = np.save, [0]

        def save_then_die(file, array, **kwargs):
            calls[0] += 1
            if calls[0] == a.kill_at:  # half an array on disk, then the process is gone (no cleanup runs)
                Path(file).write_bytes(np.ascontiguousarray(array).tobytes()[: array.nbytes // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            save(file, array, **kwargs)

        cache.np.save = save_then_die
    from cache_worker import pipeline as imported  # its classes named as the tests import them: the same key

    computed, compute = [0], cache.DiskCacheDataset._pre_transform

    def counted(self, item):
        computed[0] += 1
        return compute(self, item)

    cache.DiskCacheDataset._pre_transform = counted
    data = [{"image": f} for f in a.files]
    dataset = cache.DiskCacheDataset(
        data, imported(a.pixdim, a.slow), a.cache_dir, num_workers=1, progress=False, fill=False
    )
    if a.start:
        Path(f"{a.start}.{os.getpid()}.ready").touch()
    while a.start and not Path(a.start).exists():
        time.sleep(0.002)
    dataset.fill()
    print(f"{len(dataset)} cached, {computed[0]} computed here", flush=True)


if __name__ == "__main__":
    main()
