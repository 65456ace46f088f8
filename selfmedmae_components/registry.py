"""The datasets and their bundles, in one place: every tool reads this table instead of keeping its own.

One entry per public dataset, named once (``btcv``, ``brats``, ``cxr14``). An entry holds

    bundle      the bundle folder under bundles/ (its configs/ has pretrain, finetune, evaluate,
                inference and demo .yaml)
    prepare     the function that checks a download and writes its datalist ("module:function"); its
                keyword arguments are the options of ``tools/prepare.py <dataset> <folder> [options]``
    demo        the module that writes synthetic data in the download layout (data/demo/: make_demo,
                write_case, network_input); make_demo's keyword arguments are the options of
                ``tools/make_demo_data.py <dataset> <folder> [options]``
    geometry    what the benchmarks need to know of the real data (grid, channels, sizes, label kind)
    demo_run    the settings of ``tools/demo.py`` for the bundle (generator options, epochs, folders)
    benchmark   the preset of ``tools/benchmark.py`` (volume for sliding-window inference, ...)

The tools accept the entry's name and its bundle folder (``brats`` or ``brats_seg``; an entry that shares another's
bundle, its name only). This module imports nothing of the package at import time (functions are named by import
path and loaded when asked for): a tool can read the table cheaply, and tools/data_benchmark.py can read it beside
an older checkout's package.

Adding a bundle: README.md, "Adding a bundle".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

__all__ = ["Geometry", "DemoRun", "BenchmarkPreset", "Dataset", "DATASETS", "STAGES", "get", "find", "names"]

# the configs every bundle has: the four stages, and the CPU preset tools/demo.py layers on each
STAGES = ("pretrain", "finetune", "evaluate", "inference")
DEMO_PRESET = "demo"


@dataclass(frozen=True)
class Geometry:
    """The real data as the tools need to know it.

    Attributes:
        spatial_dims: 2 (images) or 3 (volumes).
        channels: image channels as stored (the bundle may replicate them, as cxr14 does to 3).
        shape: a typical case's grid in voxels (pixels) as downloaded.
        spacing: its voxel size in mm (None: none stored, as for PNG).
        labels: what a target is: ``"classes"`` (one label map of class indices), ``"regions"`` (one
            binary channel per output, overlapping) or ``"multilabel"`` (a vector of 0/1 per image).
        cases: per training config, (train, validation) cases the bundle caches at full size, from the
            datalist the prepare function writes (tools/data_benchmark.py extrapolates to these).
        pretrain_keys: the datalist keys pre-training reads (labels too where it can crop around them).
    """

    spatial_dims: int
    channels: int
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    labels: str
    cases: dict[str, tuple[int, int]]
    pretrain_keys: tuple[str, ...] = ("image", "label")


@dataclass(frozen=True)
class DemoRun:
    """How tools/demo.py runs the bundle on generated data.

    Attributes:
        make_args: options of the demo generator (tools/make_demo_data.py) beyond its defaults.
        dataset: folder inside the generator's output that is the dataset folder ("" = the output itself).
        source: folder inside the generator's output that tools/prepare.py reads ("" = the dataset folder; an
            archive is prepared into another folder).
        prepare_args: options of tools/prepare.py; ``{data}`` and ``{dataset}`` stand for the generator's output
            and the dataset folder.
        input: folder inside the dataset folder that inference reads.
        pretrain_epochs, finetune_epochs, val_interval: the two training stages' lengths.
        env: extra environment of the bundle stages.
        tiny: generator options for a set written in seconds (tests/test_registry.py).
        default: run by ``tools/demo.py`` without ``--bundles`` (False: only when named, to keep the demo short).
    """

    make_args: tuple[str, ...]
    dataset: str
    input: str
    pretrain_epochs: int
    finetune_epochs: int
    val_interval: int
    env: dict[str, str] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    default: bool = True
    source: str = ""
    prepare_args: tuple[str, ...] = ()

    def prepare_command(self, name: str, data_root: Any) -> list[str]:
        """``tools/prepare.py`` arguments of the demo: the dataset name, the folder it reads, its options."""
        dataset_dir = f"{data_root}/{self.dataset}" if self.dataset else str(data_root)
        folder = f"{data_root}/{self.source}" if self.source else dataset_dir
        return [name, folder, *(a.format(data=data_root, dataset=dataset_dir) for a in self.prepare_args)]


@dataclass(frozen=True)
class BenchmarkPreset:
    """tools/benchmark.py's preset.

    Attributes:
        sw_size: the volume (after the bundle's resampling) sliding-window inference runs on; None: no
            sliding window (2-D classification).
        data_shape: the synthetic cases of its data part, in voxels (pixels).
    """

    sw_size: tuple[int, ...] | None
    data_shape: tuple[int, ...]


@dataclass(frozen=True)
class Dataset:
    """One public dataset and its bundle (see the module docstring)."""

    name: str
    title: str
    bundle: str
    prepare: str
    prepare_usage: str
    demo: str
    geometry: Geometry
    demo_run: DemoRun
    benchmark: BenchmarkPreset
    data_benchmark_cases: int = 3
    shares_bundle: bool = False  # another entry's bundle (a data source): its folder name does not name this entry

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the tools accept for this entry: its name and its bundle folder (unless shared)."""
        return (self.name, *(() if self.shares_bundle else (self.bundle,)))

    def prepare_function(self) -> Callable[..., dict]:
        """The function that checks a download and writes its datalist."""
        module, _, function = self.prepare.partition(":")
        return getattr(importlib.import_module(module), function)

    def demo_module(self) -> ModuleType:
        """The demo generator module (make_demo, write_case, network_input)."""
        return importlib.import_module(self.demo)

    def prepare_module(self) -> ModuleType:
        return importlib.import_module(self.prepare.partition(":")[0])


DATASETS: tuple[Dataset, ...] = (
    Dataset(
        name="btcv",
        title="BTCV abdominal CT, 13 organs (Synapse multi-atlas)",
        bundle="btcv_seg",
        prepare="selfmedmae_components.data.btcv:prepare_datalist",
        prepare_usage="/data/btcv [--output PATH] [--num_val_cases 2] [--seed 0] [--check_files False]",
        demo="selfmedmae_components.data.demo.btcv",
        geometry=Geometry(
            # img0001; the 30 labelled CTs have 85-198 slices of 2.5-5 mm
            spatial_dims=3,
            channels=1,
            shape=(512, 512, 147),
            spacing=(0.76, 0.76, 3.0),
            labels="classes",
            cases={"pretrain": (18, 0), "finetune": (16, 2)},
        ),
        demo_run=DemoRun(
            make_args=(),
            dataset="",
            input="RawData/Testing/img",
            pretrain_epochs=40,
            finetune_epochs=30,
            val_interval=10,
            tiny={"num_test_cases": 1, "shape": (32, 32, 12)},
        ),
        # real BTCV: 512 x 512 in-plane, ~0.8 mm; ~100 slices of 2.5-5 mm (half resolution in-plane in the data part)
        benchmark=BenchmarkPreset(sw_size=(256, 256, 160), data_shape=(256, 256, 64)),
    ),
    Dataset(
        name="brats",
        title="MSD Task01_BrainTumour (BraTS), 4-channel brain MRI, tumour regions",
        bundle="brats_seg",
        prepare="selfmedmae_components.data.brats:prepare_datalist",
        prepare_usage="/data/Task01_BrainTumour [--output PATH] [--eval_fraction 0.2] [--num_val_cases N] "
        "[--seed 12345] [--check_files False]",
        demo="selfmedmae_components.data.demo.brats",
        geometry=Geometry(
            spatial_dims=3,
            channels=4,
            shape=(240, 240, 155),
            spacing=(1.0, 1.0, 1.0),
            labels="regions",
            cases={"pretrain": (387, 0), "finetune": (348, 39)},  # 484 labelled, 97 held out for evaluation
        ),
        demo_run=DemoRun(
            make_args=(),
            dataset="Task01_BrainTumour",
            input="imagesTs",
            pretrain_epochs=20,
            finetune_epochs=20,
            val_interval=5,
            tiny={"num_cases": 5, "num_test_cases": 1, "shape": (24, 24, 16)},
        ),
        benchmark=BenchmarkPreset(sw_size=(240, 240, 155), data_shape=(192, 192, 144)),  # 1 mm, as in MSD
    ),
    Dataset(
        name="cxr14",
        title="NIH ChestX-ray14, 14 findings",
        bundle="cxr14_cls",
        prepare="selfmedmae_components.data.cxr14:prepare_datalist",
        prepare_usage="/data/cxr14 [--output PATH] [--val_fraction 0.1] [--seed 0] "
        "[--check_images False]   # False: existence only, fast on 112k images",
        demo="selfmedmae_components.data.demo.cxr14",
        geometry=Geometry(
            spatial_dims=2,
            channels=1,
            shape=(1024, 1024),
            spacing=None,
            labels="multilabel",  # 8-bit PNG
            cases={"pretrain": (86524, 0), "finetune": (77872, 8652)},  # official train_val, 10 % validation
            pretrain_keys=("image",),
        ),
        demo_run=DemoRun(
            make_args=("--num_images", "1200", "--image_size", "128"),
            dataset="",
            input="images",
            pretrain_epochs=15,
            finetune_epochs=40,
            val_interval=5,
            # the tiny 2D ViT runs many small operations: one thread per process is faster than two (docs/README.md)
            env={"OMP_NUM_THREADS": "1"},
            tiny={"num_images": 40, "image_size": 32},
        ),
        benchmark=BenchmarkPreset(sw_size=None, data_shape=(1024, 1024)),
        data_benchmark_cases=500,
    ),
    Dataset(
        name="msd",
        title="any Medical Segmentation Decathlon-format dataset (channels, labels from its dataset.json)",
        bundle="msd_seg",
        prepare="selfmedmae_components.data.msd:prepare_datalist",
        prepare_usage="/data/Task09_Spleen [--output PATH] [--eval_fraction 0.2] [--num_val_cases N] [--seed 0] "
        "[--check_files False] [--normalization window|zscore] [--hu_window [-100,240]] [--pixdim [1.5,1.5,2.0]] "
        "[--roi_size [96,96,96]]",
        demo="selfmedmae_components.data.demo.msd",
        geometry=Geometry(
            # Task09_Spleen as the example: 41 labelled CTs of 512 x 512 x 31-168 slices, ~0.8 x 0.8 x 5 mm, 20 test CTs;
            # the default split: 8 evaluation, 3 validation, 30 training; MAE reads training + validation + test
            spatial_dims=3,
            channels=1,
            shape=(512, 512, 90),
            spacing=(0.79, 0.79, 5.0),
            labels="classes",
            cases={"pretrain": (53, 0), "finetune": (30, 3)},
            pretrain_keys=("image",),
        ),
        demo_run=DemoRun(
            make_args=(),
            dataset="Task90_DemoProstateMR",
            input="imagesTs",
            pretrain_epochs=20,
            finetune_epochs=30,
            val_interval=10,
            tiny={"num_cases": 6, "num_test_cases": 1, "shape": (24, 24, 12)},
            default=False,
        ),
        benchmark=BenchmarkPreset(sw_size=(256, 256, 128), data_shape=(256, 256, 64)),
    ),
    Dataset(
        name="scans",
        title="a hospital's own archive: any folder tree of DICOM, NIfTI, NRRD, MHA files, or a PACS over DICOMweb",
        bundle="msd_seg",
        prepare="selfmedmae_components.data.scans:prepare_datalist",
        prepare_usage="/data/export --out /data/scans [--labels /data/labels] [--modality CT|MR] [--workers N] "
        "[--label_names [liver,spleen]] [--cache disk] [--pretrain_steps N]   (or http://pacs:8042/dicom-web "
        "[--query Modality=CT])",
        demo="selfmedmae_components.data.demo.archive",
        geometry=Geometry(
            # a hospital CT archive as the example: thousands of series of ~512 x 512 x 300 at ~0.7 x 0.7 x 1.25 mm,
            # a handful labelled; MAE reads every series but the held-out evaluation cases
            spatial_dims=3,
            channels=1,
            shape=(512, 512, 300),
            spacing=(0.7, 0.7, 1.25),
            labels="classes",
            cases={"pretrain": (2000, 0), "finetune": (12, 2)},
            pretrain_keys=("image",),
        ),
        demo_run=DemoRun(
            make_args=(),
            dataset="prepared",
            input="../new_scans",
            pretrain_epochs=20,
            finetune_epochs=30,
            val_interval=10,
            tiny={"shape": (24, 24, 16), "extra": 0, "extra_labelled": 0},
            default=False,
            source="archive",
            prepare_args=("--out", "{dataset}", "--labels", "{data}/labels"),
        ),
        benchmark=BenchmarkPreset(sw_size=(256, 256, 160), data_shape=(256, 256, 64)),
        shares_bundle=True,
    ),
)


def names() -> list[str]:
    """The dataset names, in the table's order."""
    return [d.name for d in DATASETS]


def find(name: str) -> Dataset | None:
    """The entry called ``name`` (its name or bundle folder), or None."""
    for d in DATASETS:
        if name in d.names:
            return d
    return None


def get(name: str) -> Dataset:
    """The entry called ``name`` (its name or bundle folder).

    Raises:
        ValueError: no such entry; the message lists the names the tools accept.
    """
    entry = find(str(name).strip())
    if entry is None:
        known = "; ".join(f"{d.name} (or {', '.join(d.names[1:])})" if d.names[1:] else d.name for d in DATASETS)
        raise ValueError(f"unknown dataset or bundle {name!r}; choose from: {known}")
    return entry
