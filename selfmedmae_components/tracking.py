"""MONAI's experiment tracking switch (``python -m monai.bundle run ... --tracking mlflow``) on our trainers.

``--tracking mlflow`` appends MONAI's ``MLFlowHandler`` to ``train#handlers`` (and ``validate#handlers``),
reading the loss with ``from_engine(['loss'], first=True)``: that expects the decollated output of MONAI's
default trainer (a list of dicts). Our trainers keep the batch whole (``decollate: false``, a dict), where
that transform gives a 1-tuple and MLflow fails to log it (``float() argument must be ... not 'tuple'``).
:func:`fit_tracking_handlers`, called from the training configs' ``run`` list, gives those handlers the
loss of either form; without ``--tracking`` it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["loss_of", "fit_tracking_handlers"]


def loss_of(output: Any) -> Any:
    """The loss of a trainer's output: ``output['loss']`` of a whole batch (dict) or of the first decollated item."""
    if isinstance(output, dict):
        return output["loss"]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        return output[0]["loss"]
    return output


def fit_tracking_handlers(handlers: Iterable[Any]) -> int:
    """Give every MLFlowHandler among ``handlers`` :func:`loss_of` as its output transform; returns how many."""
    from monai.handlers import MLFlowHandler

    count = 0
    for handler in handlers or ():
        if isinstance(handler, MLFlowHandler):
            handler.output_transform = loss_of
            count += 1
    return count
