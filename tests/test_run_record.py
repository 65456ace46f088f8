"""The run record on a small config written here, its expected content spelled out: which top-level ids are settings
(plain data, or expressions of plain ids only), which are left out (sections, components, cycles), how
values become JSON, and the network's resolved arguments."""

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

import selfmedmae_components.run_record
from selfmedmae_components.run_record import read_record, record_run, top_level_refs

GLOBALS = {"numpy": np, "selfmedmae_components": selfmedmae_components}

CONFIG = {
    "imports": ["$import numpy"],
    "_meta_": {"version": "0.1"},
    "ckpt_dir": None,  # set per test
    "width": 8,
    "depth": 2,
    "name": "tiny",
    "flag": True,
    "nothing": None,
    "sizes": [32, 32, 16],
    "double": "$@width * 2",  # an expression of plain ids: recorded resolved
    "alias": "@width",  # a reference to one: recorded resolved
    "first_size": "$@sizes#0 + 0",  # an item of a plain list: recorded resolved
    "scalar": "$numpy.float32(0.5)",  # not a Python number: left out
    "array": "$numpy.zeros(2)",  # no flat value: left out
    "nested": [[1, 2], [3]],  # not flat: left out
    "from_section": "$len(@train#data)",  # depends on a section: left out
    "loop_a": "$@loop_b + 1",  # a cycle: left out
    "loop_b": "$@loop_a + 1",
    "unknown": "$@missing + 1",  # refers to an id the config lacks: left out
    "train": {"data": [1, 2, 3]},
    "network_def": {
        "_target_": "torch.nn.Linear",
        "in_features": "@width",
        "out_features": "$@double + @depth",
        "bias": "$numpy.bool_(True)",
        "device": "$torch.device('cpu')",
        "_disabled_": False,
    },
    "record": "$selfmedmae_components.run_record.record_run(@ckpt_dir, 'finetune', True)",
}


def record_of(tmp_path, **changes) -> dict:
    parser = ConfigParser({**CONFIG, "ckpt_dir": str(tmp_path), **changes}, globals=GLOBALS)
    path = parser.get_parsed_content("record")
    assert path == tmp_path / "finetune_run.json"
    return read_record(path)


def test_the_record_holds_plain_and_derived_settings_and_the_resolved_network(tmp_path):
    assert record_of(tmp_path) == {
        "stage": "finetune",
        "configs": None,  # a bare ConfigParser: no config folder
        # resolved; numpy scalars as numbers, other objects as their repr
        "network": {
            "_target_": "torch.nn.Linear",
            "in_features": 8,
            "out_features": 18,
            "bias": True,
            "device": "device(type='cpu')",
        },
        "settings": {
            "ckpt_dir": str(tmp_path),
            "width": 8,
            "depth": 2,
            "name": "tiny",
            "flag": True,
            "nothing": None,
            "sizes": [32, 32, 16],
            "double": 16,
            "alias": 8,
            "first_size": 32,
            "record": None,
        },  # the call itself, met again while the settings resolve
    }


def test_other_ranks_record_nothing_and_a_config_without_a_network_is_named(tmp_path):
    parser = ConfigParser(
        {
            **CONFIG,
            "ckpt_dir": str(tmp_path),
            "record": "$selfmedmae_components.run_record.record_run(@ckpt_dir, 'finetune', False)",
        },
        globals=GLOBALS,
    )
    assert parser.get_parsed_content("record") is None and not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError) as err:  # ConfigParser wraps what the expression raised
        record_of(tmp_path, network_def=None)
    assert str(err.value.__cause__) == "record_run: the config has no component `network_def` to record."
    with pytest.raises(RuntimeError) as err:
        record_run(tmp_path, "finetune")
    assert str(err.value) == "record_run() reads the config being run: call it from a bundle config's `run` list."


def test_a_record_is_checked_when_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="No run record at"):
        read_record(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"network": {}, "settings": []}))
    with pytest.raises(ValueError, match="is not a run record: expected the sections 'network' and 'settings'"):
        read_record(tmp_path / "bad.json")


def test_top_level_refs_at_any_depth_but_not_section_items():
    value = {"a": "$@width * @depth", "b": ["@name", {"c": "$len(@train#data) + @sizes[0]"}], "d": 3}
    assert top_level_refs(value) == {"width", "depth", "name", "sizes"}
    assert top_level_refs(np.float32(1)) == set() and top_level_refs(torch.zeros(1)) == set()


def test_tensor_arguments_of_the_network_are_recorded_as_numbers_or_their_repr(tmp_path):
    network = {"_target_": "torch.nn.Identity", "scale": "$torch.tensor(0.5)", "weights": "$torch.tensor([2.0])"}
    assert record_of(tmp_path, network_def=network)["network"] == {
        "_target_": "torch.nn.Identity",
        "scale": 0.5,
        "weights": "tensor([2.])",
    }


def test_a_bundle_run_records_its_config_folder(tmp_path, monkeypatch):
    """Under ``monai.bundle run`` (a ConfigWorkflow) the record names the folder of the configs, which the export
    reads the configs from."""
    from monai.bundle import ConfigWorkflow

    configs = tmp_path / "configs"
    configs.mkdir()
    config = {k: v for k, v in CONFIG.items() if k != "record"} | {
        "imports": ["$import numpy", "$import selfmedmae_components"],
        "ckpt_dir": str(tmp_path / "models"),
        "initialize": [],
        "finalize": [],
        "run": ["$selfmedmae_components.run_record.record_run(@ckpt_dir, 'pretrain', True)"],
    }
    (configs / "pretrain.json").write_text(json.dumps(config))
    (configs / "metadata.json").write_text(json.dumps({"version": "0.1"}))
    monkeypatch.chdir(tmp_path)  # a folder of its own: the record must come from the workflow, not the working one
    workflow = ConfigWorkflow(
        config_file=str(configs / "pretrain.json"), meta_file=str(configs / "metadata.json"), workflow_type=None
    )
    workflow.initialize()
    workflow.run()
    record = read_record(tmp_path / "models" / "pretrain_run.json")
    assert record["configs"] == str(configs.resolve()) and record["settings"]["alias"] == 8
