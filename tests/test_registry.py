"""selfmedmae_components/registry.py: every entry is complete and consistent with its bundle, and the tools
dispatch through it (tools/prepare.py, make_demo_data.py, demo.py).

Tiny demo sets (each entry's ``demo_run.tiny``), no training: a few seconds per dataset.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_runner import REPO
from monai.bundle import ConfigParser

from selfmedmae_components import registry

LABEL_KINDS = {"classes", "regions", "multilabel"}


def tool(name: str):
    """A module of tools/ loaded from its file (tools/ is no package)."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))  # as when a tool runs from its file
    spec = importlib.util.spec_from_file_location(f"registry_test_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENTRIES = {d.name: d for d in registry.DATASETS}


def test_every_name_finds_exactly_its_entry():
    all_names = [n for d in registry.DATASETS for n in d.names]
    assert len(all_names) == len(set(all_names)), all_names
    for d in registry.DATASETS:
        for name in d.names:
            assert registry.get(name) is d
    # one name per dataset, and its bundle folder: the aliases the tools once took are gone (docs/CHANGELOG.md)
    assert {d.name: d.names for d in registry.DATASETS}["brats"] == ("brats", "brats_seg")
    assert registry.find("scans").names == ("scans",)  # msd_seg names the msd entry
    for old in ("msd_brats", "cxr", "decathlon", "archive", "dicom", "pacs"):
        assert registry.find(old) is None, old
    with pytest.raises(ValueError, match="unknown dataset or bundle 'nope'.*btcv"):
        registry.get("nope")


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_is_complete(name):
    d = ENTRIES[name]
    configs = REPO / "bundles" / d.bundle / "configs"
    for stage in (*registry.STAGES, registry.DEMO_PRESET):
        assert (configs / f"{stage}.yaml").is_file(), (d.bundle, stage)

    prepare = d.prepare_function()
    assert callable(prepare) and prepare.__module__ == d.prepare.partition(":")[0]
    # tools/prepare.py DATASET FOLDER: the dataset folder, or the source a data source prepares into --out
    assert list(inspect.signature(prepare).parameters)[0] == ("src" if d.demo_run.source else "dataset_dir")
    demo = d.demo_module()
    make_demo = inspect.signature(demo.make_demo).parameters
    assert list(make_demo)[0] == "out_dir"
    assert set(d.demo_run.tiny) <= set(make_demo), d.demo_run.tiny
    flags = [a[2:] for a in d.demo_run.make_args if a.startswith("--")]
    assert set(flags) <= set(make_demo), flags
    assert callable(demo.write_case)

    g = d.geometry
    assert g.spatial_dims in (2, 3) and len(g.shape) == g.spatial_dims and len(d.benchmark.data_shape) == g.spatial_dims
    assert g.spacing is None or len(g.spacing) == g.spatial_dims
    assert g.labels in LABEL_KINDS and set(g.cases) == {"pretrain", "finetune"} and "image" in g.pretrain_keys
    if g.spatial_dims == 3:  # sliding-window inference over whole volumes
        assert len(d.benchmark.sw_size) == 3 and callable(demo.network_input)
    else:
        assert d.benchmark.sw_size is None
    assert d.demo_run.pretrain_epochs > 0 and d.demo_run.finetune_epochs > 0 and d.demo_run.val_interval > 0


@pytest.fixture(scope="module", params=list(ENTRIES))
def demo_set(request, tmp_path_factory):
    """(entry, dataset folder with its datalist.json): the tiny demo set, prepared."""
    d = ENTRIES[request.param]
    out = tmp_path_factory.mktemp(d.name)
    written = Path(d.demo_module().make_demo(out, **d.demo_run.tiny))
    assert written == out / (d.demo_run.source or d.demo_run.dataset)  # where tools/demo.py looks for it
    tool("prepare").main(d.demo_run.prepare_command(d.name, out))  # as tools/demo.py prepares it
    return d, out / d.demo_run.dataset


def datalist_ids(node, path: str = "") -> list[str]:
    """Ids of the config whose expression reads the datalist (load_datalist), wherever the config puts them."""
    if isinstance(node, dict):
        return [i for k, v in node.items() for i in datalist_ids(v, f"{path}#{k}" if path else str(k))]
    if isinstance(node, list):
        return [i for k, v in enumerate(node) for i in datalist_ids(v, f"{path}#{k}")]
    return [path] if isinstance(node, str) and node.startswith("$") and "load_datalist(" in node else []


def test_demo_and_prepare_give_a_datalist_every_stage_reads(demo_set):
    d, dataset_dir = demo_set
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    assert datalist["training"] and datalist["validation"] and datalist["evaluation"]
    for stage in ("pretrain", "finetune", "evaluate"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / d.bundle / "configs" / f"{stage}.yaml"))
        parser["dataset_dir"] = str(dataset_dir)
        ids = datalist_ids(parser.get())
        assert ids, f"{d.bundle} {stage}: no expression reads the datalist"
        for i in ids:
            items = parser.get_parsed_content(i)
            assert items, (d.bundle, stage, i)
            for item in items:
                assert Path(item["image"]).is_file(), (d.bundle, stage, i, item)
                if stage == "pretrain":
                    assert set(d.geometry.pretrain_keys) <= set(item), (item, d.geometry.pretrain_keys)
    assert any((dataset_dir / d.demo_run.input).iterdir())  # what the demo's inference stage reads


def test_prepare_tool_by_name_and_bundle_folder_writes_the_same_datalist(demo_set, tmp_path):
    d, dataset_dir = demo_set
    if d.demo_run.source:  # a source prepared into a folder of its own: the same datalist in another folder
        for name in d.names:  # (the fixture ran tools/prepare.py's main in-process; this is the command line)
            command = d.demo_run.prepare_command(name, dataset_dir.parent)
            command[command.index("--out") + 1] = str(tmp_path / name)
            proc = subprocess.run(
                [sys.executable, str(REPO / "tools" / "prepare.py"), *command],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, (name, proc.stderr[-2000:])
            assert json.loads((tmp_path / name / "datalist.json").read_text()) == json.loads(
                (dataset_dir / "datalist.json").read_text()
            )
        return
    runs = {f"prepare.py {name}": [REPO / "tools" / "prepare.py", name, dataset_dir] for name in d.names}
    assert len(runs) == 2  # the entry's name and its bundle folder
    written = {}
    for label, cmd in runs.items():
        out = tmp_path / f"{label.replace(' ', '_')}.json"
        proc = subprocess.run(
            [sys.executable, *map(str, cmd), "--output", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (label, proc.stderr[-2000:])
        written[label] = json.loads(out.read_text())
    for label in runs:  # the same datalist as the registry's prepare function wrote (fixture)
        assert written[label] == json.loads((dataset_dir / "datalist.json").read_text()), label


def test_prepare_is_the_only_prepare_tool():
    assert sorted(p.name for p in (REPO / "tools").glob("prepare*.py")) == ["prepare.py"]


def test_make_demo_data_dispatches_through_the_registry(tmp_path, capsys):
    make_demo_data = tool("make_demo_data")
    make_demo_data.main(
        ["brats_seg", str(tmp_path), "--num_cases", "2", "--num_test_cases", "0", "--shape", "[16,16,8]"]
    )
    assert len(json.loads((tmp_path / "Task01_BrainTumour" / "dataset.json").read_text())["training"]) == 2
    make_demo_data.main([])
    usage = capsys.readouterr().out
    assert all(d.name in usage for d in registry.DATASETS)


@pytest.mark.parametrize("name", ENTRIES)
def test_demo_stages_use_the_registry_tools_and_configs(name, tmp_path):
    d = ENTRIES[name]
    demo = tool("demo")
    stages = demo.stages(d.name, tmp_path)  # a dataset name is as good as the bundle folder
    assert stages == demo.stages(d.names[-1], tmp_path)  # its bundle folder (scans: msd_seg names the msd entry)
    commands = dict((label, cmd) for label, cmd, _ in stages)
    assert commands["data"][1:4] == ["tools/make_demo_data.py", d.name, str(tmp_path / "data" / d.name)]
    assert commands["prepare"][1:3] == ["tools/prepare.py", d.name]
    dataset_dir = str(tmp_path / "data" / d.name / d.demo_run.dataset)
    assert commands["pretrain"][commands["pretrain"].index("--dataset_dir") + 1] == dataset_dir.rstrip("/")
    if d.demo_run.source:  # the archive is read, the dataset written elsewhere
        assert commands["prepare"][3:6] == [str(tmp_path / "data" / d.name / d.demo_run.source), "--out", dataset_dir]
    for label, cmd, _ in stages:
        for arg in cmd:
            if arg.startswith("tools/"):
                assert (REPO / arg).is_file(), (label, arg)
            if arg.startswith("['bundles/"):
                assert all((REPO / f).is_file() for f in ast.literal_eval(arg)), (label, arg)
    assert str(d.demo_run.pretrain_epochs) in commands["pretrain"]


def test_benchmark_presets_accept_every_name():
    benchmark = tool("benchmark")
    for d in registry.DATASETS:
        assert benchmark.bundle_parser(d.names[-1], "pretrain").get("roi_size", None) == benchmark.bundle_parser(
            d.name, "pretrain"
        ).get("roi_size", None)
