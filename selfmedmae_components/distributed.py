"""Validation over several ranks when there may be fewer cases than ranks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ValidationSampler", "validation_partition"]


class ValidationSampler(Sampler[int]):
    """Gives every rank at least one validation case and every case equally often, so the metrics that
    MONAI gathers over the ranks are the plain means over the cases.

    MONAI's ``DistributedSampler(even_divisible=False)`` gives each case once but raises when there are
    fewer cases than ranks (BTCV's 2 validation cases on 3 or more GPUs); ``even_divisible=True`` pads
    with the first cases, which then weigh twice in the mean. Here the case list is repeated as often as
    needed to give each rank one (2 cases on 3 ranks: each case twice, ranks get 2, 1 and 1): a mean, or
    an AUC, over equally repeated cases is the one over the cases. With at least as many cases as ranks
    this is ``even_divisible=False``: rank r gets cases r, r + world_size, ...

    Args:
        dataset: the validation dataset (only its length is used).
        num_replicas: the number of ranks; default: the process group's.
        rank: this process's rank; default: the process group's.

    Example::

        sampler = ValidationSampler(range(2), num_replicas=3, rank=0)
        list(sampler)  # [0, 1]; rank 1: [1], rank 2: [0]
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        num_replicas = dist.get_world_size() if num_replicas is None else int(num_replicas)
        rank = dist.get_rank() if rank is None else int(rank)
        n = len(dataset)
        if n == 0:
            raise ValueError("ValidationSampler: the validation dataset is empty.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ValidationSampler: rank {rank} is not in 0..{num_replicas - 1}.")
        copies = -(-num_replicas // n)  # ceil: enough cases for every rank
        self.indices = (list(range(n)) * copies)[rank::num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def validation_partition(data: Sequence[Any], num_replicas: int | None = None, rank: int | None = None) -> list[Any]:
    """This rank's validation cases, chosen as :class:`ValidationSampler` chooses them.

    The multi-GPU configs build the validation CacheDataset from this list, so that each process caches
    only the cases it validates (BraTS: about 97 volumes; cached on every rank they would take the host
    memory of all of them times the number of processes).
    """
    return [data[i] for i in ValidationSampler(data, num_replicas=num_replicas, rank=rank)]
