"""Settings follow the weights (selfmedmae_components/trained_settings.py), on a config small enough to read whole:
a Linear network whose weights were trained as Linear(4, 3), run through ``monai.bundle.run`` in this process
as the command line runs it. Without a record the config decides; with one the network and preprocessing
settings are the record's; a command-line override wins unless it contradicts the weights; a ConfigWorkflow
made directly has no command line. The bundles' own evaluate and inference: tests/test_bundle_settings.py
(every bundle) and tests/test_bundle_btcv.py (a trained run)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow
from monai.bundle import run as bundle_run

from selfmedmae_components import errors
from selfmedmae_components.trained_settings import (
    PREPROCESSING_SETTINGS,
    TRAINING_ONLY_ARGS,
    SettingsError,
    command_line_ids,
    recorded,
)
from selfmedmae_components.weights import CheckpointError, load_weights

CONFIG = {
    "imports": [
        "$import json",
        "$import pathlib",
        "$import selfmedmae_components",
        "$import selfmedmae_components.config_imports",
    ],
    "width": 8,
    "depth": 2,
    "pixdim": [1.0, 1.0],
    "sw_overlap": 0.5,
    "network_def": {"_target_": "torch.nn.Linear", "in_features": "@width", "out_features": "@depth"},
    "network": "$@network_def",
    "run": [
        "$selfmedmae_components.trained_settings.follow(@checkpoint)",
        "$selfmedmae_components.weights.load_weights(@network, @checkpoint)",
        "$pathlib.Path(@out).write_text(json.dumps(dict(width=@width, depth=@depth, pixdim=@pixdim, "
        "sw_overlap=@sw_overlap, net=list(@network.weight.shape))))",
    ],
    "evaluate": "@run",  # as in the bundles: `run evaluate` resolves the whole list as one item
}
# MONAI warns on every config it parses (configs are code); these are this file's own
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")


@pytest.fixture(autouse=True)
def own_hook(monkeypatch):
    """A bundle run installs the short error form (errors.install): this process gets its hook back."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    stats = logging.getLogger("monai.handlers.StatsHandler")
    monkeypatch.setattr(stats, "filters", list(stats.filters))


RECORD = {
    "stage": "finetune",
    "configs": None,
    "network": {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3},
    "settings": {"width": 4, "depth": 3, "pixdim": [2.0, 2.0], "sw_overlap": 0.25},
}


@pytest.fixture
def trained(tmp_path) -> Path:
    """A config folder and a run folder: weights of Linear(4, 3) in models/model.pt, no record yet."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    config = {**CONFIG, "checkpoint": str(tmp_path / "models" / "model.pt"), "out": str(tmp_path / "seen.json")}
    (tmp_path / "configs" / "evaluate.yaml").write_text(yaml.safe_dump(config))
    torch.save(torch.nn.Linear(4, 3).state_dict(), tmp_path / "models" / "model.pt")
    return tmp_path


def write_record(root: Path, record: dict = RECORD) -> Path:
    path = root / "models" / "finetune_run.json"
    path.write_text(json.dumps(record))
    return path


def evaluate(root: Path, **overrides) -> dict:
    """``python -m monai.bundle run --config_file configs/evaluate.yaml --key value ...``, in this process."""
    bundle_run("evaluate", config_file=str(root / "configs" / "evaluate.yaml"), logging_file=False, **overrides)
    return json.loads((root / "seen.json").read_text())


def user_error(root: Path, **overrides) -> BaseException:
    """The user error a run ends with (the one line the bundle runner prints)."""
    with pytest.raises(RuntimeError) as err:
        evaluate(root, **overrides)
    found = errors.find_user_error(err.value)
    assert found is not None, err.value
    return found


def test_without_a_record_the_config_decides(trained):
    with pytest.raises(RuntimeError):  # the weights of Linear(4, 3) do not fit the config's Linear(8, 2)
        evaluate(trained)
    assert evaluate(trained, width=4, depth=3) == dict(width=4, depth=3, pixdim=[1.0, 1.0], sw_overlap=0.5, net=[3, 4])


def test_the_record_gives_the_network_and_preprocessing_settings(trained, capsys):
    record = write_record(trained)
    seen = evaluate(trained)
    # sw_overlap is no setting of the weights: the config's, though the training run had another
    assert seen == dict(width=4, depth=3, pixdim=[2.0, 2.0], sw_overlap=0.5, net=[3, 4])
    checkpoint = trained / "models" / "model.pt"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Settings of the run that trained {checkpoint} ({record}): width 4 (config: 8), depth 3 (config: 2), "
        "pixdim [2.0,2.0] (config: [1.0,1.0])"
    )


def test_a_command_line_override_wins_unless_it_contradicts_the_weights(trained, capsys):
    record = write_record(trained)
    checkpoint = trained / "models" / "model.pt"
    # agreeing with the record, or a setting that is not the weights': as given
    assert evaluate(trained, width=4, depth=3, sw_overlap=0.1)["sw_overlap"] == 0.1
    # preprocessing: the override wins, with a warning naming both values
    capsys.readouterr()
    assert evaluate(trained, pixdim=[3.0, 3.0])["pixdim"] == [3.0, 3.0]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: --pixdim [3.0,3.0] differs from {record} (pixdim [2.0,2.0], the preprocessing the weights in "
        f"{checkpoint} were trained with): using [3.0,3.0], as given."
    )
    # a weights setting that contradicts the record: one line naming both values
    error = user_error(trained, width=16)
    assert isinstance(error, SettingsError) and str(error) == (
        f"--width 16 contradicts {record} (width 4, the weights in {checkpoint} were trained with it): leave "
        "--width out, or give a --checkpoint trained with width 16."
    )
    # the same from an --args_file (MONAI's other way to give overrides)
    (trained / "args.json").write_text(json.dumps({"depth": 5}))
    assert str(user_error(trained, args_file=str(trained / "args.json"))).startswith("--depth 5 contradicts")


def test_the_record_beside_the_checkpoint_is_read(trained):
    """--checkpoint other_run/models/model.pt: that run's record, not the bundle_root's."""
    write_record(trained)
    other = trained / "other" / "models"
    other.mkdir(parents=True)
    torch.save(torch.nn.Linear(6, 5).state_dict(), other / "model.pt")
    write_record(trained / "other", {**RECORD, "network": {"in_features": 6, "out_features": 5}, "settings": {}})
    seen = evaluate(trained, checkpoint=str(other / "model.pt"))
    assert seen["net"] == [5, 6] and seen["pixdim"] == [1.0, 1.0]  # that record has no pixdim: the config's


def test_a_workflow_made_directly_has_no_command_line(trained):
    write_record(trained)
    config = str(trained / "configs" / "evaluate.yaml")
    workflow = ConfigWorkflow(config_file=config, logging_file=False, run_id="evaluate", width=16)
    workflow.initialize()
    workflow.run()
    assert json.loads((trained / "seen.json").read_text())["width"] == 4


def test_a_damaged_record_is_named(trained):
    write_record(trained).write_text("{")
    error = user_error(trained)
    assert isinstance(error, SettingsError) and "finetune_run.json is not a run record" in str(error)


def test_recorded_maps_network_arguments_to_the_ids_that_feed_them():
    config = {
        "roi_size": [96] * 3,
        "hidden_size": 768,
        "dpr": 0.1,
        "pixdim": [1.5] * 3,
        "hu_min": -175,
        "keys": ["image"],
        "network_def": {
            "_target_": "UNETR",
            "img_size": "@roi_size",
            "hidden_size": "@hidden_size",
            "drop_path_rate": "@dpr",
            "num_layers": 12,
            "feature_size": "$@hidden_size // 48",
        },
    }
    record = {
        "network": {"img_size": [32] * 3, "hidden_size": 48, "drop_path_rate": 0.2, "num_layers": 4, "feature_size": 1},
        "settings": {"roi_size": [48] * 3, "pixdim": [8.0] * 3, "hu_max": 250, "keys": ["label"]},
    }
    weights, preprocessing = recorded(config, record)
    # the network argument's value, not the top-level setting of the same name; training-only arguments, literal
    # arguments and expressions are not ids to set
    assert weights == {"roi_size": [32] * 3, "hidden_size": 48}
    # preprocessing: the ids the config has and the record holds (hu_max: not in the config; keys: no preprocessing)
    assert preprocessing == {"pixdim": [8.0] * 3}
    assert "drop_path_rate" in TRAINING_ONLY_ARGS and "keys" not in PREPROCESSING_SETTINGS


def test_outside_a_bundle_run_nothing_is_given_on_the_command_line():
    assert command_line_ids() == set()


def test_weights_that_do_not_fit_are_named_in_one_line(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(torch.nn.Sequential(torch.nn.Linear(8, 3)), path)
    assert str(err.value).startswith(
        f"{path} does not fit the network this config builds: tensors 1 of another shape (0.weight [3, 4] in the "
        "file, [3, 8] in the network), 2 unexpected (1.weight; 1.bias). Build the network the weights were trained "
        "in: keep the training run's record (finetune_run.json) beside them"
    )
    assert "\n" not in str(err.value)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert load_weights(net, path) is net


def test_weights_that_do_not_fit_show_the_first_three_of_each_kind(tmp_path):
    linears = lambda n: torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n)])  # noqa: E731
    torch.save({"model": linears(3).state_dict()}, tmp_path / "three.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(linears(1), tmp_path / "three.pt")
    assert str(err.value) == (
        f"{tmp_path / 'three.pt'} does not fit the network this config builds: tensors 4 unexpected (1.weight; 1.bias; "
        "2.weight, ...). Build the network the weights were trained in: keep the training run's record "
        "(finetune_run.json) beside them, or give its settings (--hidden_size, --roi_size, ...) as the training run "
        "had them."
    )
    torch.save({"model": linears(1).state_dict()}, tmp_path / "one.pt")
    with pytest.raises(CheckpointError, match=r"tensors 4 missing \(1\.weight; 1\.bias; 2\.weight, \.\.\.\)\. Build"):
        load_weights(linears(3), tmp_path / "one.pt")
    torch.save({"model": linears(2).state_dict()}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"tensors 2 missing \(2\.weight; 2\.bias\)\. Build"):
        load_weights(linears(3), tmp_path / "two.pt")
    extra = {**linears(1).state_dict(), "x": torch.zeros(1), "y": torch.zeros(1), "z": torch.zeros(1)}
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"tensors 3 unexpected \(x; y; z\)\. Build"):  # three: all shown
        load_weights(linears(1), tmp_path / "extra.pt")
