"""Model-zoo conformance of every bundle, with MONAI's own bundle tools.

For each bundle (parametrised; a bundle whose files are not there yet is skipped with the reason):
metadata validated by ``monai.bundle.verify_metadata`` against ``bundles/metadata_schema.json`` (offline),
the changelog holds the version, the ids MONAI checks for train and inference workflows are present
(``ConfigWorkflow.check_properties()``), ``verify_net_in_out`` passes at the metadata's input shape,
``ckpt_export`` writes TorchScript that matches the eager network, the licence, model card, data
licence and ``large_files.yml`` are there and well-formed.

The per-bundle facts (tiny data, tiny overrides) below are shared with tests/test_export.py and
tests/test_monailabel.py.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from bundle_runner import REPO

SCHEMA = REPO / "bundles" / "metadata_schema.json"
# verify_metadata's schema: the stored file, checked against its sha256 (without a hash MONAI warns it checks nothing)
SCHEMA_FILE = {
    "filepath": str(SCHEMA),
    "hash_val": "655ffbad1711e34ce28112d00e899e0dae970908013bbcfa3415ebeca0bb4754",
    "hash_type": "sha256",
}

BUNDLES = ("btcv_seg", "brats_seg", "cxr14_cls")
CONFIGS_NEEDED = ("metadata.json", "finetune.yaml", "inference.yaml", "demo.yaml")


def _btcv(root: Path) -> tuple[Path, Path]:
    from selfmedmae_components.data import btcv
    from selfmedmae_components.data.demo import btcv as btcv_demo

    data = root / "btcv"
    btcv_demo.make_demo(data, num_test_cases=1, shape=(64, 64, 24))
    btcv.prepare_datalist(data)
    return data, data / "RawData/Testing/img"


def _brats(root: Path) -> tuple[Path, Path]:
    from selfmedmae_components.data import brats
    from selfmedmae_components.data.demo import brats as brats_demo

    data = Path(brats_demo.make_demo(root, num_cases=8, num_test_cases=1, shape=(32, 32, 24)))
    brats.prepare_datalist(data, eval_fraction=0.25, num_val_cases=1)
    return data, data / "imagesTs"


def _cxr14(root: Path) -> tuple[Path, Path]:
    from selfmedmae_components.data import cxr14
    from selfmedmae_components.data.demo import cxr14 as cxr14_demo

    data = Path(cxr14_demo.make_demo(root / "cxr14", num_images=40, image_size=64, seed=0))
    cxr14.prepare_datalist(data, num_workers=0)
    images = sorted(data.rglob("*.png"))[:2]
    inputs = root / "cxr14_inputs"
    inputs.mkdir()
    for p in images:
        (inputs / p.name).write_bytes(p.read_bytes())
    return data, inputs


@dataclass(frozen=True)
class Case:
    make_data: Callable[[Path], tuple[Path, Path]]  # root -> (dataset_dir, folder of images to infer)
    tiny: dict = field(default_factory=dict)  # overrides on top of demo.yaml: a network that runs in seconds
    input_shape: tuple[int, ...] = ()  # network input (N, C, *spatial) under ``tiny``
    segmentation: bool = True  # writes <name>_seg.nii.gz label maps (else a CSV of probabilities)


CASES = {
    "btcv_seg": Case(
        _btcv, dict(roi_size=[32, 32, 32], pixdim=[8.0, 8.0, 8.0], hidden_size=48, num_workers=0), (1, 1, 32, 32, 32)
    ),
    "brats_seg": Case(
        _brats, dict(roi_size=[32, 32, 32], pixdim=[6.0, 6.0, 6.0], hidden_size=48, num_workers=0), (1, 4, 32, 32, 32)
    ),
    "cxr14_cls": Case(_cxr14, dict(hidden_size=48, num_workers=0), (1, 3, 64, 64), segmentation=False),
}


def bundle_dir(bundle: str) -> Path:
    return REPO / "bundles" / bundle


def skip_reason(bundle: str) -> str | None:
    """Why ``bundle`` cannot be checked yet (files still missing), or None."""
    root = bundle_dir(bundle)
    missing = [f"configs/{f}" for f in CONFIGS_NEEDED if not (root / "configs" / f).is_file()]
    return f"{bundle} is not complete yet: no {', '.join(missing)}" if missing else None


def configs_of(bundle: str, *names: str) -> list[str]:
    return [str(bundle_dir(bundle) / "configs" / f"{n}.yaml") for n in names]


def meta_file(bundle: str) -> str:
    return str(bundle_dir(bundle) / "configs" / "metadata.json")


@pytest.fixture(params=BUNDLES)
def bundle(request) -> str:
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


_DATA: dict[str, tuple[Path, Path]] = {}


@pytest.fixture
def data(bundle, tmp_path_factory) -> tuple[Path, Path]:
    """(dataset_dir, inference input folder) of tiny demo data, made once per bundle and session."""
    if bundle not in _DATA:
        _DATA[bundle] = CASES[bundle].make_data(tmp_path_factory.mktemp(f"{bundle}_data"))
    return _DATA[bundle]


def tiny_network(bundle: str):
    """The inference ``network_def`` under the demo preset and the tiny overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs_of(bundle, "inference", "demo"))
    parser.read_meta(meta_file(bundle))
    parser.update(CASES[bundle].tiny)
    return parser.get_parsed_content("network_def")


@pytest.fixture
def checkpoint(bundle, tmp_path) -> Path:
    """A checkpoint in the layout fine-tuning writes ({"model": state_dict}), random weights."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save({"model": tiny_network(bundle).state_dict()}, path)
    return path


# ---- metadata


def test_metadata_matches_the_schema(bundle):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=meta_file(bundle), **SCHEMA_FILE)  # an existing filepath: nothing downloaded
    meta = json.loads(Path(meta_file(bundle)).read_text())
    assert meta["version"] in meta["changelog"], f"changelog of {bundle} has no entry for version {meta['version']}"


def test_schema_rejects_incomplete_metadata(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((REPO / "bundles/btcv_seg/configs/metadata.json").read_text())
    broken = copy.deepcopy(meta)
    del broken["network_data_format"]["outputs"]["pred"]["channel_def"]
    (tmp_path / "no_channel_def.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(tmp_path / "no_channel_def.json"), **SCHEMA_FILE)
    broken = {k: v for k, v in meta.items() if k != "required_packages_version"}
    (tmp_path / "no_packages.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="required_packages_version"):
        verify_metadata(meta_file=str(tmp_path / "no_packages.json"), **SCHEMA_FILE)


# ---- files of a shared bundle


def test_licence_model_card_and_data_licence(bundle):
    root = bundle_dir(bundle)
    for name in ("LICENSE", "docs/README.md", "docs/data_license.txt"):
        assert (root / name).is_file() and (root / name).read_text().strip(), f"{bundle}/{name} missing or empty"
    card = (root / "docs/README.md").read_text()
    headings = " ".join(line.lower() for line in card.splitlines() if line.startswith("#"))
    for topic in ("data", "command", "training", "input", "reference"):
        assert topic in headings, f"{bundle}/docs/README.md has no section on {topic!r}"
    assert "python -m monai.bundle run" in card
    assert re.search(r"^\|.*\|\s*$", card, re.M), f"{bundle}/docs/README.md has no metrics table"


def test_large_files_lists_the_weights_in_model_zoo_format(bundle):
    path = bundle_dir(bundle) / "large_files.yml"
    assert path.is_file(), f"{bundle} has no large_files.yml"
    entries = yaml.safe_load(path.read_text())["large_files"]
    assert isinstance(entries, list) and entries
    hex_len = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
    for e in entries:
        assert set(e) == {"path", "url", "hash_val", "hash_type"}, e
        assert not Path(e["path"]).is_absolute() and ".." not in Path(e["path"]).parts
        assert e["hash_type"] in hex_len, e
        # no release yet: url and hash both empty; once released, an https url with a hash of the right length
        assert e["url"] == e["hash_val"] == "" or (
            e["url"].startswith("https://") and re.fullmatch(f"[0-9a-f]{{{hex_len[e['hash_type']]}}}", e["hash_val"])
        ), e
    assert "models/model.pt" in [e["path"] for e in entries]


# ---- configs: MONAI's workflow properties, network shape, TorchScript


@pytest.mark.parametrize("workflow_type, config", [("train", "finetune"), ("infer", "inference")])
def test_workflow_has_the_properties_monai_checks(bundle, data, checkpoint, tmp_path, workflow_type, config):
    from monai.bundle import ConfigWorkflow
    from monai.utils import BundleProperty, BundlePropertyConfig

    dataset_dir, inputs = data
    overrides = dict(CASES[bundle].tiny, bundle_root=str(tmp_path))
    if workflow_type == "train":
        overrides.update(dataset_dir=str(dataset_dir), init_mode="scratch", cache_rate=0.0)
    else:
        overrides.update(input_dir=str(inputs), checkpoint=str(checkpoint))
    wf = ConfigWorkflow(config_file=configs_of(bundle, config, "demo"), workflow_type=workflow_type, **overrides)
    # MONAI's check_properties raises KeyError at the first missing required id: list them all first
    absent = [
        f"{name} (id {p[BundlePropertyConfig.ID]})"
        for name, p in wf.properties.items()
        if p.get(BundleProperty.REQUIRED) and p[BundlePropertyConfig.ID] not in wf.parser
    ]
    assert not absent, (
        f"{bundle} {config}.yaml lacks the ids MONAI requires of a workflow of type {workflow_type!r}: {absent}"
    )
    wf.initialize()
    assert wf.check_properties() == []  # also: optional properties, where referenced, use MONAI's ids


def test_no_config_resolves_anything_before_run(bundle):
    """An exported bundle imports its own selfmedmae_components from the bundle root, which MONAI puts
    on the import path when ``run`` starts: an ``initialize`` step would import the package earlier."""
    from monai.bundle import ConfigParser

    for config in sorted((bundle_dir(bundle) / "configs").glob("*.yaml")):
        if config.name.startswith("multi_gpu_"):
            continue  # torchrun's process group must exist first; documented: run from the bundle folder
        assert not ConfigParser.load_config_file(str(config)).get("initialize"), (
            f"{config.relative_to(REPO)}: move the `initialize` steps to the start of `run`"
        )


def test_network_takes_the_metadata_input_shape(bundle):
    from monai.bundle import verify_net_in_out

    # the metadata's own input shape and channels; a narrow ViT (hidden_size) keeps it quick on a CPU
    verify_net_in_out(
        net_id="network_def",
        meta_file=meta_file(bundle),
        config_file=configs_of(bundle, "inference"),
        device="cpu",
        hidden_size=48,
    )


def test_ckpt_export_gives_torchscript_equal_to_the_eager_network(bundle, checkpoint, tmp_path):
    from monai.bundle import ckpt_export
    from monai.data import load_net_with_metadata

    case = CASES[bundle]
    ts_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(checkpoint),
        meta_file=meta_file(bundle),
        config_file=configs_of(bundle, "inference", "demo"),
        key_in_ckpt="model",
        use_trace=True,
        input_shape=list(case.input_shape),
        **case.tiny,
    )
    scripted, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=("inference.json",))
    assert meta["version"] == json.loads(Path(meta_file(bundle)).read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])  # the config travels inside the TorchScript file

    eager = tiny_network(bundle)
    eager.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    eager.eval()
    x = torch.rand(case.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-4, atol=1e-5)
