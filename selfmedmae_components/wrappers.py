"""The network inside the wrappers that training puts around it."""

from __future__ import annotations

import torch.nn as nn


def unwrap(network: nn.Module) -> nn.Module:
    """The module a wrapper holds: DistributedDataParallel / DataParallel's ``.module`` and the
    ``._orig_mod`` of a ``torch.compile(network)`` result, however nested; the network itself otherwise.

    The bundles compile in place (``engines.maybe_compile`` calls ``module.compile()``), which adds no
    wrapper; ``torch.compile(network)`` (tools/benchmark.py --compile) returns one. The wrappers are told
    by their type: a network with a submodule that happens to be called ``module`` is not unwrapped.
    """
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch._dynamo's OptimizedModule
            network = network._orig_mod
        else:
            return network
