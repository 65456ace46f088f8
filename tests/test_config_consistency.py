"""Each bundle config is standalone (single-file commands must work, and MONAI resolves `%file` macros
relative to the working directory), so the values the configs share are checked here instead."""

from pathlib import Path

import pytest
import yaml

BUNDLES = sorted(
    p.parent.parent for p in (Path(__file__).resolve().parents[1] / "bundles").glob("*/configs/finetune.yaml")
)
STAGES = ("pretrain", "finetune", "evaluate", "inference")
SHARED = (
    "in_channels",
    "out_channels",
    "roi_size",
    "img_size",
    "resize",
    "pixdim",
    "hu_min",
    "hu_max",
    "patch_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "mlp_ratio",
    "feature_size",
    "skip_hidden_states",
    "sw_batch_size",
    "sw_overlap",
    "class_names",
    "et_mapping",
    "dataset_dir",
)


def load(bundle, stage):
    with open(bundle / "configs" / f"{stage}.yaml") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_shared_hyper_parameters_agree(bundle):
    configs = {stage: load(bundle, stage) for stage in STAGES}
    for key in SHARED:
        values = {stage: c[key] for stage, c in configs.items() if key in c}
        assert len({repr(v) for v in values.values()}) <= 1, f"{bundle.name}: '{key}' differs between configs: {values}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_every_config_runs_by_name_and_plainly(bundle):
    for stage in STAGES:
        config = load(bundle, stage)
        assert "run" in config and config.get(stage) == "@run", (
            f"{bundle.name}/{stage}.yaml needs `run` and `{stage}: '@run'`"
        )
        assert "bundle_root" in config and "network_def" in config


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_yaml_floats_are_numbers(bundle):
    """MONAI reads YAML with safe_load, where `1e-3` is a string: write `1.0e-3`."""
    for cfg in (bundle / "configs").glob("*.yaml"):

        def walk(node, path, cfg=cfg):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{path}[{i}]")
            elif isinstance(node, str):
                try:
                    float(node)
                except ValueError:
                    return
                pytest.fail(f"{cfg.name}{path} = {node!r} is a string that looks like a number")

        walk(yaml.safe_load(cfg.read_text()), "")


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_runs_set_up_the_device_in_one_place(bundle):
    """Seeding through engines.setup_run (cuDNN autotuning unless `deterministic`, TF32 on CUDA),
    never MONAI's set_determinism (deterministic cuDNN, no autotuning); training logs every `log_interval`
    iterations; the memory switches reach the step and the network; fine-tuning validation under the same
    autocast as evaluate.yaml."""
    for cfg in (bundle / "configs").glob("*.yaml"):
        assert "monai.utils.set_determinism" not in cfg.read_text(), cfg.name
    for stage in STAGES:
        config = load(bundle, stage)
        assert config["deterministic"] is False
        # first the short form of a user error (errors.py: importing the package installs nothing), then seeds
        assert config["run"][0] == "$selfmedmae_components.errors.install()"
        assert (
            config["run"][1].startswith("$selfmedmae_components.engines.setup_run(")
            and "@deterministic)" in config["run"][1]
        )
    for stage in ("pretrain", "finetune"):
        config = load(bundle, stage)
        assert config["train"]["seeder"]["deterministic"] == "@deterministic"
        assert config["train"]["iteration"]["micro_batch_size"] == "@micro_batch_size"
        assert config["network_def"]["activation_checkpointing"] == "@activation_checkpointing"
        assert config["activation_checkpointing"] is False
        loggers = [
            h for h in config["train"]["handlers"] if h["_target_"] in ("StatsHandler", "TensorBoardStatsHandler")
        ]
        assert len(loggers) == 2 and all("log_every(@log_interval)" in h["iteration_log"] for h in loggers)
    inferer = load(bundle, "finetune")["validate"]["inferer"]
    assert inferer["_target_"] == "selfmedmae_components.engines.AutocastInferer" and inferer["amp"] == "@amp"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_the_training_step_owns_the_mask_ratio(bundle):
    """The pre-training step passes `mask_ratio` to the network at every step; the network's own ratio is only
    the default of direct calls, so the config does not set it there (a value that would never act)."""
    config = load(bundle, "pretrain")
    assert config["train"]["iteration"]["_target_"] == "selfmedmae_components.engines.MAETrainingStep"
    assert config["train"]["iteration"]["mask_ratio"] == "@mask_ratio"
    assert "mask_ratio" not in config["network_def"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_unetr_bundles_have_no_patch_size_to_ignore(bundle):
    """UNETR fixes its patch size (16): a `patch_size` id in the UNETR configs would be read by nothing, so
    `--patch_size 8` would be silently ignored. Pre-training must use UNETR's, or the transfer cannot fit."""
    from selfmedmae_components.networks import UNETR

    if load(bundle, "finetune")["network_def"]["_target_"] != "selfmedmae_components.networks.UNETR":
        pytest.skip("not a UNETR bundle")
    for stage in ("finetune", "evaluate", "inference"):
        assert "patch_size" not in load(bundle, stage), f"{bundle.name}/{stage}.yaml"
    assert load(bundle, "pretrain")["patch_size"] == UNETR.patch_size
