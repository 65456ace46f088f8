"""The training skeleton is one skeleton: the same in every bundle, and the same in pre-training and fine-tuning.

The skeleton (LR schedule, handlers, resumable state, epoch seeding, checkpoints, trainer, data loaders, validation,
the `run` steps) is written in each training config because MONAI's own tools edit it at config level: `--tracking`
appends to `train#handlers` and reads `train#trainer` as a dict, MONAI Label inserts a CheckpointLoader into
`train#handlers` and overrides `train#trainer#max_epochs`, `train#dataset#data` and `validate#dataset#data`. A
Python factory could not be edited that way, and MONAI resolves `%file#id` macros from the working folder, so a
shared skeleton file cannot be included by a config that must run alone. A fix made in one bundle and not the
others fails here; the differences listed in INTENDED are the only ones meant.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from bundle_runner import config_path
from monai.bundle import ConfigParser

BUNDLES = ("btcv_seg", "brats_seg", "cxr14_cls", "msd_seg")
REFERENCE = "btcv_seg"
TRAINING = ("run", "train#lr_scheduler", "train#state", "train#seeder", "train#checkpoint_saver", "train#trainer",
            "train#iteration", "train#dataloader", "train#dataset", "train#handlers")  # fmt: skip
VALIDATION = ("validate#dataset", "validate#dataloader", "validate#handlers", "validate#evaluator", "validate#handler")
SKELETON = {"pretrain": TRAINING, "finetune": TRAINING + VALIDATION}
# (bundle, id): the keys (of a mapping) or the steps (of `run`, by a text they contain) that differ on purpose
INTENDED = {
    # chest films travel as 8-bit levels and are normalised on the device by prepare_batch, not cast by to_kwargs
    ("cxr14_cls", "train#trainer"): ("prepare_batch", "to_kwargs"),
    ("cxr14_cls", "validate#evaluator"): ("prepare_batch", "to_kwargs"),
    ("cxr14_cls", "validate#dataloader"): ("batch_size",),  # whole 2-D films: batched validation
    ("cxr14_cls", "run"): ("set_track_meta",),  # 2-D transforms on plain tensors
    ("brats_seg", "train#dataloader"): ("prefetch_factor",),  # 4-channel volumes: one batch ahead (host memory)
}
# what pre-training and fine-tuning of one bundle share (the rest is the stage's own: loss, prefix, intervals)
ACROSS_STAGES = {
    "train#lr_scheduler": (),
    "train#state": (),
    "train#seeder": ("transform",),
    "train#checkpoint_saver": ("file_prefix", "save_interval", "final_filename"),
    "train#trainer": ("loss_function", "inferer"),
    "train#iteration": ("_target_", "mask_ratio"),
}


def load(bundle: str, stage: str) -> dict:
    return yaml.safe_load(config_path(bundle, stage).read_text())


def get(config: dict, id: str):
    """The raw config under ``id`` ("train#trainer"), as MONAI addresses it, or "<absent>"."""
    return ConfigParser(config).get(id, "<absent>")


def without(value, left_out: tuple[str, ...]):
    """``value`` with the keys of a mapping, or the steps of a list that contain one of the texts, left out."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in left_out}
    if isinstance(value, list):
        return [s for s in value if not (isinstance(s, str) and any(t in s for t in left_out))]
    return value


def skeleton_differences(configs: dict[str, dict], stage: str) -> list[str]:
    """Where a bundle's skeleton differs from the reference bundle's, beyond INTENDED."""
    found = []
    for bundle, config in configs.items():
        for id in SKELETON[stage]:
            left_out = INTENDED.get((bundle, id), ())
            ours, reference = without(get(config, id), left_out), without(get(configs[REFERENCE], id), left_out)
            if ours != reference:
                found.append(f"{bundle}/{stage}.yaml {id}: {ours!r} != {REFERENCE}'s {reference!r}")
    return found


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_bundle_has_the_same_training_skeleton(stage):
    configs = {bundle: load(bundle, stage) for bundle in BUNDLES}
    assert skeleton_differences(configs, stage) == []


def test_a_drifted_skeleton_is_found():
    configs = {bundle: load(bundle, "finetune") for bundle in BUNDLES}
    drifted = copy.deepcopy(configs)
    drifted["msd_seg"]["train"]["checkpoint_saver"]["n_saved"] = 2
    drifted["cxr14_cls"]["run"].insert(1, "$print('extra step')")
    found = skeleton_differences(drifted, "finetune")
    assert [f.split(":")[0] for f in found] == [
        "cxr14_cls/finetune.yaml run",
        "msd_seg/finetune.yaml train#checkpoint_saver",
    ]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_pretraining_and_finetuning_share_their_skeleton(bundle):
    pretrain, finetune = load(bundle, "pretrain"), load(bundle, "finetune")
    for id, own in ACROSS_STAGES.items():
        left_out = own + INTENDED.get((bundle, id), ())
        assert without(get(pretrain, id), left_out) == without(get(finetune, id), left_out), f"{bundle}: {id}"
    # the handlers both stages attach, in the same order (LR schedule, console, TensorBoard; MAE adds images)
    shared = [h for h in get(pretrain, "train#handlers") if h in get(finetune, "train#handlers")]
    assert len(shared) >= 4 and shared == [h for h in get(finetune, "train#handlers") if h in shared]
    # the same run steps, up to the stage's names and its own validation step
    steps = lambda c: [s.replace("'mae'", "'{prefix}'").replace("'finetune'", "'{prefix}'").replace("'pretrain'", "'{prefix}'")  # noqa: E731
                       for s in get(c, "run") if "validate#" not in s]  # fmt: skip
    assert steps(pretrain) == steps(finetune), bundle
