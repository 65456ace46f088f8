"""Reading checkpoints: tensors only, with a clear error for a missing, damaged or unsafe file.

Checkpoints are read with ``weights_only=True``: bundles are shared, and a pickle can run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import UserError

TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save writes a zip archive, or a pickle (legacy format)


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used: the message names the file and what was expected."""


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a model state dict from a checkpoint file (raw, or under "model"/"network"/"state_dict").

    A DistributedDataParallel ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Check the path, or run the stage that writes it first.")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(TORCH_SAVE_MAGIC):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: expected a file written by torch.save, found {_describe(head)}."
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refusing to load {path}: it needs pickled Python objects, which can run code. Only tensor "
            f"checkpoints (weights_only=True) are accepted. Details: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError ... for a damaged file
        raise CheckpointError(
            f"Cannot read checkpoint {path} (truncated or damaged PyTorch file): {type(e).__name__}: {e}"
        ) from e
    if isinstance(ckpt, dict):
        for key in ("model", "network", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} holds no model state dict (expected a dict of tensors, or one under 'model').")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def load_weights(network: torch.nn.Module, path: str | Path, shown: int = 3) -> torch.nn.Module:
    """Load the checkpoint ``path`` into ``network`` strictly; weights that do not fit are a one-line
    :class:`CheckpointError` naming the file and the first ``shown`` misfits of each kind, not PyTorch's list of
    every tensor. Returns ``network``."""
    state = load_state_dict(path)
    expected = network.state_dict()
    shapes = [
        f"{k} {_shape(state[k])} in the file, {_shape(v)} in the network"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misfits = [
        f"{len(found)} {what} ({'; '.join(found[:shown])}{', ...' if len(found) > shown else ''})"
        for what, found in (("of another shape", shapes), ("missing", missing), ("unexpected", unexpected))
        if found
    ]
    if misfits:
        raise CheckpointError(
            f"{path} does not fit the network this config builds: tensors {', '.join(misfits)}. Build the network the "
            "weights were trained in: keep the training run's record (finetune_run.json) beside them, or give its "
            "settings (--hidden_size, --roi_size, ...) as the training run had them."
        )
    network.load_state_dict(state, strict=True)
    return network


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in tensor.shape) + "]"


def _describe(head: bytes) -> str:
    """What the first bytes of a file look like, for an error message."""
    if not head:
        return "an empty file"
    text = head.decode("utf-8", "ignore")
    if text and all(c.isprintable() or c.isspace() for c in text):
        return f"text starting {text.lstrip().split(chr(10), 1)[0][:40]!r}"
    return f"binary data starting {head[:8]!r}"
