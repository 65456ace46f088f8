"""The record a training run leaves beside its weights: the settings its network was built with.

A checkpoint holds tensors only; which network they fit (width, depth, heads, crop size) and which
preprocessing they expect (voxel spacing, intensity window) lies in the configs and command-line
overrides of the run. The training configs call :func:`record_run` at the start of ``run``; it writes
``<ckpt_dir>/<stage>_run.json``::

    {"stage": "finetune", "configs": "/path/to/bundles/btcv_seg/configs",
     "network": {"_target_": "selfmedmae_components.networks.UNETR", "hidden_size": 96, ...},
     "settings": {"roi_size": [48, 48, 48], "pixdim": [4.0, 4.0, 5.0], "hidden_size": 96, ...}}

``network`` holds the resolved arguments of the config's ``network_def`` (what the weights were trained
in), ``settings`` the value of every top-level id that is plain data (numbers, strings, flat lists) or an
expression computed from such ids only (e.g. ``pixel_mean: $[0.5] * @in_channels``), after the config files
were layered and the command-line overrides applied. ``tools/export_bundle.py --run``
reads it to export a bundle whose configs build exactly that network; the evaluate and inference configs read
the record beside their checkpoint to build it too (trained_settings.py).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

from .io import write_json_atomic

__all__ = ["RECORD_SUFFIX", "read_record", "record_path", "record_run", "top_level_refs"]

RECORD_SUFFIX = "_run.json"


def record_path(ckpt_dir: str | os.PathLike, stage: str) -> Path:
    """``<ckpt_dir>/<stage>_run.json``."""
    return Path(ckpt_dir) / f"{stage}{RECORD_SUFFIX}"


def read_record(path: str | os.PathLike) -> dict:
    """A run record written by :func:`record_run`, checked for its two sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No run record at {path}: it is written by the training configs (run with this version)."
        )
    record = json.loads(path.read_text())
    if not isinstance(record.get("network"), dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"{path} is not a run record: expected the sections 'network' and 'settings'.")
    return record


def _running_parser():
    """(ConfigParser, config folder or None) of the bundle config being run, found on the call stack as
    config_helpers.default_bundle_root finds its workflow."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    frame, parser = inspect.currentframe(), None
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate.parser, str(Path(candidate.config_root_path).resolve())
        if parser is None and isinstance(candidate, ConfigParser):
            parser = candidate
        frame = frame.f_back
    if parser is not None:
        return parser, None
    raise RuntimeError("record_run() reads the config being run: call it from a bundle config's `run` list.")


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float)) or value is None:
        return True
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


# a reference to a top-level id (also inside `$` expressions); `@train#data` (an item of a section, as written in a
# config file) is not one. Once MONAI has parsed a config its values use the separator `::`: `@train::data` reads as
# a reference to `train`, which is what _derived needs (a section is never a setting, so neither is what uses it)
TOP_LEVEL_REF = re.compile(r"@([A-Za-z_]\w*)(?![\w#])")


def top_level_refs(value: Any) -> set[str]:
    """The top-level ids a config value refers to (``@id``, also inside expressions), at any depth."""
    if isinstance(value, str):
        return set(TOP_LEVEL_REF.findall(value))
    if isinstance(value, dict):
        return set().union(*(top_level_refs(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(top_level_refs(v) for v in value))
    return set()


def _derived(config: dict, key: str, seen: set[str]) -> bool:
    """Whether top-level ``key`` is plain data or an expression computed from such ids only (no sections,
    no components): safe to resolve, e.g. ``pixel_mean: $[0.5] * @in_channels``."""
    value = config.get(key)
    if _plain(value):
        return True
    if not isinstance(value, str) or not value.startswith(("$", "@")) or key in seen:
        return False
    seen = seen | {key}
    return all(ref in config and _derived(config, ref, seen) for ref in top_level_refs(value))


def _flat(value: Any) -> bool:
    """A number, string, bool or None, or a flat list of those."""
    scalar = (bool, int, float, str, type(None))
    return isinstance(value, scalar) or isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    return repr(value)


def record_run(
    ckpt_dir: str | os.PathLike, stage: str, is_main_process: bool = True, network_id: str = "network_def"
) -> Path | None:
    """Write ``<ckpt_dir>/<stage>_run.json`` for the config being run (rank 0 only); returns its path.

    Call it from the config's ``run`` list, before the trainer runs::

        - $selfmedmae_components.run_record.record_run(@ckpt_dir, 'finetune', @is_main_process)
    """
    global _recording
    if not is_main_process or _recording:  # (resolving the settings may evaluate the id that called us)
        return None
    _recording = True
    try:
        return _record(ckpt_dir, stage, network_id)
    finally:
        _recording = False


_recording = False


def _record(ckpt_dir: str | os.PathLike, stage: str, network_id: str) -> Path:
    parser, configs = _running_parser()
    config = parser.get()
    settings = {}
    for key, value in config.items():
        if not _derived(config, key, set()):  # `_meta_` and `imports` (a dict, a list of imports) are not
            continue
        resolved = value if _plain(value) else parser.get_parsed_content(key)
        if _flat(resolved):
            settings[key] = _jsonable(resolved)
    net_cfg = parser.get(network_id)
    if not isinstance(net_cfg, dict) or "_target_" not in net_cfg:
        raise ValueError(f"record_run: the config has no component `{network_id}` to record.")
    network = {"_target_": net_cfg["_target_"]}
    for key in net_cfg:
        if not key.startswith("_"):
            network[key] = _jsonable(parser.get_parsed_content(f"{network_id}#{key}"))
    record = {"stage": stage, "configs": configs, "network": network, "settings": settings}
    return write_json_atomic(record, record_path(ckpt_dir, stage))
