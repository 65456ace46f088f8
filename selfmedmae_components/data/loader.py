"""A training DataLoader whose workers persist across epochs and still replay each epoch exactly."""

from __future__ import annotations

import ctypes
import random
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from monai.data.utils import worker_init_fn as monai_worker_init
from torch.utils.data import Dataset, RandomSampler, get_worker_info

__all__ = ["EpochSeededDataLoader", "retain_freed_memory"]

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory(mmap_threshold_mb: int = 64, trim_threshold_mb: int = 256) -> bool:
    """Keep this process's freed memory for its next allocations (glibc only; False elsewhere).

    glibc serves each allocation from 128 KiB up (a crop, a 40 MB batch) with a fresh mmap and unmaps it when freed,
    so every batch a data-loader worker builds first takes a page fault per 4 KiB page. Served from the heap instead
    (up to ``mmap_threshold_mb``), and with up to ``trim_threshold_mb`` of freed heap kept, the next batch reuses the
    pages: msd_seg's pre-training crops per second per worker rose by a third from the RAM cache and by 3/4 from the
    disk cache (tools/data_benchmark.py --caches; 2-core VM, where faults are dear), for up to ``trim_threshold_mb``
    more resident memory per worker."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20)
        )
    except (OSError, AttributeError):
        return False


def _worker_init(worker_id: int) -> None:
    retain_freed_memory()
    monai_worker_init(worker_id)


class _EpochSeeded(Dataset):
    """``dataset`` whose random transforms are re-seeded from (epoch seed, worker id) before the first
    item each worker draws in an epoch; the epoch seed comes through shared memory."""

    def __init__(self, dataset: Any, epoch_seed: torch.Tensor) -> None:
        self.dataset, self.epoch_seed = dataset, epoch_seed
        self._seeded_epoch = -1  # per process: each worker holds its own copy

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        epoch, seed = self.epoch_seed.tolist()
        if epoch != self._seeded_epoch:
            info = get_worker_info()
            if info is not None:  # a worker's own global RNGs too, for any transform that draws from them
                seed += info.id
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
                random.seed(seed)
            set_rnd(self.dataset, seed)  # the transforms' RandomStates, as MONAI's worker_init_fn seeds them
            self._seeded_epoch = epoch
        return self.dataset[index]


class EpochSeededDataLoader(DataLoader):
    """MONAI's DataLoader for training with ``persistent_workers=True``: each epoch's shuffle and
    augmentation depend only on the main process's torch RNG state when the epoch starts, as with
    re-forked workers, without forking the workers at every epoch.

    handlers.EpochSeeder seeds the main process from (seed, epoch) before each epoch, so that a run
    resumed at epoch k replays the epochs an uninterrupted run had. Re-forked workers (PyTorch's default)
    are seeded from that state at each epoch; persistent workers are seeded once and would carry their
    random streams on, and PyTorch draws the workers' base seed from the main RNG only when the workers
    start, which shifts everything drawn after it. Here each ``iter(loader)`` (one per epoch) draws one
    epoch seed from the main torch RNG and nothing else: the shuffle comes from a generator seeded with
    it, and each worker re-seeds the dataset's random transforms from (epoch seed, worker id) before its
    first item of the epoch, reading the seed from shared memory. Which worker loads which batch is fixed
    (round robin from worker 0 at each epoch). With ``num_workers=0`` the main process re-seeds the same
    way.

    Args:
        dataset: the dataset (``loader.dataset`` is a thin wrapper around it).
        shuffle: reshuffle at each epoch (with the loader's own generator; a ``sampler`` overrides it).
        kwargs: as ``monai.data.DataLoader`` (``num_workers``, ``persistent_workers``, ``pin_memory``, ...).

    Example::

        loader = EpochSeededDataLoader(CacheDataset(data, transform), batch_size=6, shuffle=True,
                                       num_workers=4, persistent_workers=True)
    """

    def __init__(self, dataset: Any, shuffle: bool = False, **kwargs: Any) -> None:
        self.epoch_seed = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epochs started, seed)
        self._shuffle = torch.Generator()
        wrapped = _EpochSeeded(dataset, self.epoch_seed)
        if shuffle and kwargs.get("sampler") is None:
            kwargs["sampler"] = RandomSampler(wrapped, generator=self._shuffle)
        # PyTorch draws its worker base seed from `generator`: a private one leaves the main RNG alone
        kwargs.setdefault("generator", torch.Generator())
        kwargs.setdefault("worker_init_fn", _worker_init)  # MONAI's, after retain_freed_memory
        super().__init__(wrapped, **kwargs)

    def __iter__(self):
        # the workers are idle here: ignite takes all of an epoch's batches before the next iter()
        seed = int(torch.randint(2**62, ()).item())
        self._shuffle.manual_seed(seed)
        self.epoch_seed.copy_(torch.tensor([int(self.epoch_seed[0]) + 1, seed]))
        return super().__iter__()
