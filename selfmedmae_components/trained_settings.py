"""Evaluate and inference build the network the weights were trained in: their settings follow the run record.

A checkpoint holds tensors only. The training run writes the settings it used beside its weights
(``models/finetune_run.json``, run_record.py); the evaluate and inference configs of every bundle call
:func:`follow` in ``run``, before anything builds the network or reads an image::

    - $selfmedmae_components.trained_settings.follow(@checkpoint)
    - $selfmedmae_components.weights.load_weights(@network, @checkpoint)

The record read is ``finetune_run.json`` in the checkpoint's folder (``<bundle_root>/models/`` by default): the
settings belong to those weights, so ``--checkpoint other_run/models/model.pt`` reads that run's record. Without a
record nothing changes. With one:

- **Weights settings** follow the record: every top-level id that the config's ``network_def`` passes as an
  argument (``hidden_size: '@hidden_size'``, ``img_size: '@roi_size'``: width, depth, heads, MLP ratio, crop or
  image size, patch size, channels in and out, UNETR's skip blocks), with the value of that argument in the
  record. Not the training-only arguments (:data:`TRAINING_ONLY_ARGS`). A different value either does not load
  (other shapes, missing blocks) or loads into a network that computes something else (other skip blocks), so a
  command-line override that contradicts the record ends the run with a one-line error naming both values.
- **Preprocessing settings** follow the record too (:data:`PREPROCESSING_SETTINGS`: voxel spacing, intensity
  window or normalisation, 2-D resize and pixel statistics, BraTS's ET label mapping). An override that
  contradicts the record wins, with a warning that names both values: the weights load and run with any spacing
  or window, and evaluating them on other preprocessing is a question a user may mean to ask (robustness to the
  spacing, a scanner with another calibration); the warning keeps its result from passing for the trained setting.
- Every other setting (``sw_batch_size``, ``sw_overlap``, ``output_dir``, ``device``, ``amp``, ...) is the
  config's or the command line's, as before.

"Config" means every file of ``--config_file``, layers included: ``demo.yaml`` or ``paper.yaml`` layered on
``evaluate.yaml`` give defaults that the record replaces (a note says which), so that a run fine-tuned with
``--hidden_size 48`` on the demo preset is evaluated with the demo preset and nothing else. "Command line" means
the ids given to ``python -m monai.bundle run`` (``--key value``, an ``--args_file``) or to ``monai.bundle.run``
/ ``run_workflow`` in a program, read from MONAI's ``run`` call; a ``ConfigWorkflow`` made directly has no
command line: the record wins there.

Tools that only parse a config (``ckpt_export``, ``verify_net_in_out``, MONAI Label, tools/export_bundle.py) do
not run ``run``: they build what the config says. ``tools/export_bundle.py --run`` writes the record's settings
into the exported configs, so MONAI Label serves the trained network without reading a record.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .run_record import _jsonable, _running_parser, read_record, record_path

__all__ = ["PREPROCESSING_SETTINGS", "SettingsError", "TRAINING_ONLY_ARGS", "command_line_ids", "follow", "recorded"]

STAGE = "finetune"  # evaluate and inference load fine-tuned weights: models/finetune_run.json
# network arguments that change training only (stochastic depth, recomputation): evaluate and inference set
# their own, whatever the training run used
TRAINING_ONLY_ARGS = ("drop_path_rate", "activation_checkpointing")
# the preprocessing the weights were trained on, by the ids the bundles give it (3-D: voxel spacing, CT window,
# msd_seg's normalisation; 2-D: resize before the crop, pixel mean and std; brats_seg: which labels make ET)
PREPROCESSING_SETTINGS = (
    "pixdim",
    "hu_min",
    "hu_max",
    "normalization",
    "resize",
    "pixel_mean",
    "pixel_std",
    "et_mapping",
)
# the arguments of MONAI's `run` / `run_workflow` that are not config ids
_RUN_ARGS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)
_REF = re.compile(r"@([A-Za-z_]\w*)")  # a value that is one reference to a top-level id: `img_size: '@roi_size'`


class SettingsError(UserError):
    """A setting given on the command line contradicts the weights' run record."""


def recorded(config: dict, record: dict) -> tuple[dict, dict]:
    """({id: value} of the weights settings, {id: value} of the preprocessing settings) that ``record`` gives the
    top-level ids of ``config`` (see the module docstring)."""
    weights = {}
    network = config.get("network_def")
    for arg, raw in network.items() if isinstance(network, dict) else ():
        m = _REF.fullmatch(raw) if isinstance(raw, str) else None
        if m and not arg.startswith("_") and arg not in TRAINING_ONLY_ARGS and arg in record["network"]:
            weights.setdefault(m.group(1), record["network"][arg])
    preprocessing = {
        k: record["settings"][k]
        for k in PREPROCESSING_SETTINGS
        if k in config and k in record["settings"] and k not in weights
    }
    return weights, preprocessing


def command_line_ids() -> set[str]:
    """The config ids given on the command line of the running ``monai.bundle`` ``run`` (or ``run_workflow``):
    its keyword overrides and those of its ``args_file``; empty when the config is not run through them."""
    from monai.bundle import ConfigParser, scripts

    calls = {scripts.run.__code__: "override", scripts.run_workflow.__code__: "kwargs"}
    frame = inspect.currentframe()
    while frame is not None:
        name = calls.get(frame.f_code)
        if name is not None:
            given = set(frame.f_locals.get(name) or {})
            args_file = frame.f_locals.get("args_file")
            if isinstance(args_file, str):
                given |= set(ConfigParser.load_config_file(args_file))
            return given - _RUN_ARGS
        frame = frame.f_back
    return set()


def _shown(value: Any) -> str:
    """A value as it is written on the command line: ``48``, ``[32,32,32]``, ``dataset``."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def follow(checkpoint: str | Path, stage: str = STAGE) -> dict:
    """Set the network and preprocessing settings of the config being run to those of the run that trained
    ``checkpoint`` (its record beside it), unless given on the command line; returns the settings taken from
    the record ({} without a record). Call it from ``run``, before the network or the data are built."""
    checkpoint = Path(checkpoint)
    path = record_path(checkpoint.parent, stage)
    if not path.is_file():
        return {}
    try:
        record = read_record(path)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{path} is not a run record ({e}): delete it to use the config's settings.") from e
    parser, _ = _running_parser()
    weights, preprocessing = recorded(parser.get(), record)
    given = command_line_ids()
    taken, notes = {}, []
    for key, value in {**weights, **preprocessing}.items():
        if key in given:
            value_given = _jsonable(parser.get_parsed_content(key))
            if value_given == value:
                continue
            if key in weights:
                raise SettingsError(
                    f"--{key} {_shown(value_given)} contradicts {path} ({key} {_shown(value)}, the weights in "
                    f"{checkpoint} were trained with it): leave --{key} out, or give a --checkpoint trained with "
                    f"{key} {_shown(value_given)}."
                )
            print(
                f"warning: --{key} {_shown(value_given)} differs from {path} ({key} {_shown(value)}, the "
                f"preprocessing the weights in {checkpoint} were trained with): using {_shown(value_given)}, "
                "as given.",
                file=sys.stderr,
                flush=True,
            )
            continue
        raw = parser.get(key)
        if _jsonable(raw) != value:
            _replace(parser, key, value)
            notes.append(f"{key} {_shown(value)}" + (f" (config: {_shown(raw)})" if _plain(raw) else ""))
        taken[key] = value
    if notes:
        print(f"Settings of the run that trained {checkpoint} ({path}): {', '.join(notes)}", flush=True)
    return taken


def _replace(parser, key: str, value: Any) -> None:
    """Set the top-level ``key`` of a config being resolved to ``value``: its items in MONAI's resolver are
    replaced. Not ``parser[key] = value``, which empties the resolver: ``python -m monai.bundle run evaluate``
    resolves ``evaluate: '@run'``, the whole ``run`` list as one item, and would find the items after this
    call gone."""
    from monai.bundle.utils import ID_SEP_KEY

    parser.config[key] = value
    resolver = parser.ref_resolver
    for item in [i for i in resolver.items if i == key or i.startswith(key + ID_SEP_KEY)]:
        del resolver.items[item]
        resolver.resolved_content.pop(item, None)
    parser._do_parse(config=value, id=key)  # as ConfigParser.parse adds every item


def _plain(value: Any) -> bool:
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float)) or value is None
