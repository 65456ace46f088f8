"""Host memory and loader speed of each bundle's training data, measured on synthetic cases in the public
datasets' real geometry and extrapolated to their full size.

    python tools/data_benchmark.py                                        # every fixed-geometry bundle (not msd_seg)
    python tools/data_benchmark.py --baseline 32f0b94 --out data.json     # and the bundles of a git commit
    python tools/data_benchmark.py --bundles btcv_seg --cases 2 --batches 3

For each bundle and training config (pretrain, finetune) the config's own ``train#dataset`` (and
``validate#dataset``) is built with monai.bundle.ConfigParser on ``--cases`` synthetic cases written in
the downloaded layout and geometry (the registry's ``geometry``), and measured (``--baseline REF``: first the
configs and code of git commit REF, extracted to a temporary folder and measured there by this tool in a subprocess,
on the same cases):

  cache/case   what the CacheDataset holds per case: the bytes of its tensors (storages counted once), and
               the rise of this process's resident set (VmRSS after caching minus before, over the cases)
  transient    the working memory of caching one case: the resident-set peak while caching (VmHWM, reset
               before; one caching thread) above the resident set after it
  crops/s      per data-loader worker: ``dataset[i]`` for a batch then the loader's collate function, on one
               thread as PyTorch runs its workers, over ``--batches`` batches (after one untimed batch)
  batch MB     what a worker sends per batch (the host-to-GPU copy)
  worker MB    private memory (USS) of each of 2 real loader workers after 2 batches

and extrapolated to the public dataset (``geometry.cases``): the cache at full size (from the bytes held per case;
the resident-set rise agrees within the allocator's noise, several MB at a few cases), plus per process the
workers' private memory, the batches in flight (num_workers x prefetch_factor prefetched + 2 being pinned
or copied) and this process's own resident set before any data (Python, torch, MONAI; a CUDA context adds
~1-2 GiB, not counted here). While caching, CacheDataset's num_workers threads each add one case's
transient memory. Under torchrun each rank caches only its partition of the training cases
(multi_gpu_*.yaml), and the whole validation list.

The crops/s a GPU consumes is estimated from the FLOPs of one training step of the bundle's paper-sized
network (torch.utils.flop_counter on the meta device) at ``--gpu_tflops`` achieved (default 400 TFLOP/s:
40 % of an H100 SXM's 989 dense bf16 TFLOP/s): the workers needed are that over the crops/s per worker.

The bundles are the datasets of selfmedmae_components/registry.py (``--bundles`` takes bundle folders or dataset
names): each entry's ``geometry`` is the real data's grid, its demo generator (data/demo/) writes the cases.

``--caches ram,disk`` measures instead how the training cache scales with the dataset (msd_seg's pretrain config, on
generated MSD-format CT of ``--shape`` voxels, prepared by tools/prepare.py msd):

    python tools/data_benchmark.py --caches ram,disk,none --cases 50,500,2000 --shape 128,128,80

For each size and cache, in a fresh process: the time to fill the cache (``num_workers`` threads), the resident set
(VmRSS) after building the dataset and after drawing, and crops/s per data-loader worker (one thread, with the
worker's memory setting, data/loader.py retain_freed_memory; the best of 3 rounds of ``--batches`` batches); ram's
figures are its own baseline, measured in the same run.

``--decode 512,512,200`` measures what an epoch without any cache would pay per series of a hospital archive, and why
tools/prepare.py scans decodes each DICOM series once into a NIfTI file: one CT series of that many voxels written as
DICOM slices, then read by data/dicom.py (headers and pixels), by MONAI's ITKReader (GDCM) and, once written, as
NIfTI (.nii.gz, nibabel), each timed over ``--batches`` repetitions.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from monai.data.utils import list_data_collate

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _load_registry():
    """selfmedmae_components/registry.py of this tool's own tree, loaded on its own: with ``--repo`` (``--baseline``)
    the package imported is another checkout's, which may predate the registry; the registry imports none of it."""
    path = Path(__file__).resolve().parents[1] / "selfmedmae_components" / "registry.py"
    spec = importlib.util.spec_from_file_location("_data_benchmark_registry", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


registry = _load_registry()
HOST_GIB = 16


# ------------------------------------------------------------------------------------ synthetic cases
def write_cases(bundle: str, folder: Path, n: int) -> list[dict]:
    """``n`` cases in the public dataset's geometry (grid and voxel size), written by the dataset's demo generator;
    the synthetic anatomy is scaled to that grid."""
    entry = registry.get(bundle)
    rng = np.random.default_rng(0)
    geo = entry.geometry
    return [entry.demo_module().write_case(folder, i, rng, geo.shape, geo.spacing) for i in range(n)]


# ------------------------------------------------------------------------------------ measuring
def _status_kb(key: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _settle() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the resident set is what is held
    except OSError:
        pass


def uss_mb(pid: int) -> float:
    """Private (unshared) memory of a process: what a forked worker adds to the host."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith(("Private_Clean", "Private_Dirty"))) / 1024


def held_bytes(obj: Any, seen: set) -> int:
    """Bytes of the tensors and arrays in ``obj`` (dicts, lists), each storage counted once."""
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes if obj.base is None else 0
    return int(getattr(obj, "nbytes", 0))  # e.g. transforms.indices.PackedIndices


def cached_dtypes(item: dict) -> dict:
    """The cached item's arrays and their dtypes (bit masks of crop centres: "bits")."""
    return {
        k: str(getattr(v, "dtype", "bits")).replace("torch.", "")
        for k, v in item.items()
        if held_bytes(v, set()) > 2**10
    }


def build_cached(parser, key: str) -> tuple[Any, dict]:
    """Parse and cache ``key`` (a CacheDataset); memory per cached case."""
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    dataset = parser.get_parsed_content(key)
    peak = _status_kb("VmHWM")
    _settle()
    after, n = _status_kb("VmRSS"), len(dataset)
    held = held_bytes(dataset._cache, set())
    return dataset, dict(
        cases=n,
        held_mb=held / n / 2**20,
        rss_mb=(after - before) / n / 1024,
        transient_mb=(peak - after) / 1024,
        dtypes=cached_dtypes(dataset._cache[0]),
    )


def batch_mb(batch: Any) -> float:
    return held_bytes(batch, set()) / 2**20


def crops_per_s(dataset, collate, batch_size: int, batches: int) -> dict:
    """One data-loader worker's output: ``batches`` batches on one thread, after an untimed one."""
    from monai.data.utils import set_rnd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PyTorch runs each worker on one thread
    set_rnd(dataset, 0)
    n = len(dataset)
    try:
        batch = collate([dataset[i % n] for i in range(batch_size)])
        t, crops = time.perf_counter(), 0
        for b in range(batches):
            batch = collate([dataset[(b * batch_size + i) % n] for i in range(batch_size)])
            crops += len(batch["image"])
        seconds = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    image = batch["image"]
    return dict(
        crops_per_s=crops / seconds,
        s_per_batch=seconds / batches,
        batch_mb=batch_mb(batch),
        image=f"{tuple(image.shape)} {str(image.dtype).replace('torch.', '')}",
    )


def worker_uss(parser) -> float:
    """Mean private memory of 2 real loader workers (forked from this process) after 2 batches."""
    loader = parser.get_parsed_content("train#dataloader")
    it = iter(loader)
    for _ in zip(range(2), it):
        pass
    mb = float(np.mean([uss_mb(w.pid) for w in it._workers]))
    it._shutdown_workers()  # persistent workers would live as long as the parser holds the loader
    _settle()
    return mb


def step_gflops(parser) -> float:
    """Training FLOPs per crop of the config's network at its paper size (meta device: nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = parser.get_parsed_content("network_def", lazy=False).to("meta")
    size = parser.get_parsed_content("roi_size") if "roi_size" in parser else parser.get_parsed_content("img_size")
    size = [int(size)] * 2 if np.ndim(size) == 0 else [int(s) for s in size]
    x = torch.empty(2, int(parser.get_parsed_content("in_channels")), *size, device="meta")
    # the MAE step passes the config's mask_ratio (the network's own is the default of direct calls only)
    args = (float(parser.get_parsed_content("mask_ratio")),) if "mask_ratio" in parser else ()
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, *args)
        (out[0] if isinstance(out, tuple) else out.float().mean()).backward()
    return counter.get_total_flops() / 2 / 1e9


# ------------------------------------------------------------------------------------ one config
def config_parser(bundle: str, config: str, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / f"{config}.yaml"))
    for k, v in overrides.items():
        parser[k] = v
    return parser


def measure(bundle: str, config: str, items: list[dict], batches: int, log) -> dict:
    from monai.data import set_track_meta

    keys = list(registry.get(bundle).geometry.pretrain_keys) if config == "pretrain" else list(items[0])
    data = [{k: d[k] for k in keys} for d in items]
    over = {"train#data": data, "num_workers": 2, "train#dataset#num_workers": 1, "train#dataset#progress": False}
    if config == "finetune":
        over.update({"validate#data": data, "validate#dataset#num_workers": 1, "validate#dataset#progress": False})
    parser = config_parser(bundle, config, over)
    # as the bundle's `run` does before the data loader starts (cxr14: plain tensors, no MetaTensor)
    set_track_meta(not any("set_track_meta(False)" in str(x) for x in parser.get("run", [])))
    dataset, row = build_cached(parser, "train#dataset")
    batch_size = int(parser.get_parsed_content("train#dataloader#batch_size"))
    row.update(crops_per_s(dataset, list_data_collate, batch_size, batches))  # MONAI DataLoader's collate_fn
    parser["train#dataloader#batch_size"] = max(1, min(batch_size, len(dataset) // 4))  # batches left after 2
    row["worker_uss_mb"] = worker_uss(parser)
    defaults = config_parser(bundle, config, {})
    row["num_workers"] = int(defaults.get_parsed_content("num_workers"))
    row["prefetch_factor"] = defaults.get_parsed_content("train#dataloader#prefetch_factor", default=None) or 2
    del dataset
    if config == "finetune":
        val, vrow = build_cached(parser, "validate#dataset")
        row["val"] = vrow
        del val
    row["gflops_per_crop"] = step_gflops(config_parser(bundle, config, {}))
    set_track_meta(True)
    _settle()
    log(
        f"  {bundle} {config} ({REPO}): "
        + json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})
    )
    return row


def full_size(bundle: str, config: str, row: dict, base_mb: float, ranks: int = 1) -> dict:
    """Host memory (GiB) at the public dataset's size, per process with ``ranks`` processes."""
    train, val = registry.get(bundle).geometry.cases[config]
    per_case = row["held_mb"]
    val_case = row["val"]["held_mb"] if "val" in row else 0.0
    cache = per_case * math.ceil(train / ranks) + val_case * val
    workers = row["num_workers"] * row["worker_uss_mb"]
    in_flight = (row["num_workers"] * row.get("prefetch_factor", 2) + 2) * row["batch_mb"]
    caching = base_mb + cache + row["num_workers"] * row["transient_mb"]  # num_workers caching threads
    total = base_mb + cache + workers + in_flight
    return dict(
        cache_gb=cache / 1024,
        workers_gb=workers / 1024,
        in_flight_gb=in_flight / 1024,
        caching_peak_gb=caching / 1024,
        total_gb=total / 1024,
    )


# ------------------------------------------------------------------------------------ report
def report(results: dict, base_mb: float, gpu_tflops: float) -> str:
    lines = [
        f"Host memory at full dataset size (GiB; process without data {base_mb / 1024:.2f} GiB included, CUDA context not):",
        "",
        "| bundle | config | configs | cached dtypes | cache MB/case (RSS) | transient MB | train + val cases "
        "| cache GiB | workers GiB | in flight GiB | caching peak GiB | training GiB, 1 GPU | per rank, 8 GPUs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    speed = [
        f"Loader speed per worker (one thread) and the GPU's need at {gpu_tflops:.0f} TFLOP/s achieved:",
        "",
        "| bundle | config | configs | batch to GPU | MB/batch | crops/s per worker | GFLOP/crop | GPU needs crops/s "
        "| workers needed | num_workers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (bundle, config, label), row in results.items():
        one, eight = full_size(bundle, config, row, base_mb), full_size(bundle, config, row, base_mb, ranks=8)
        train, val = registry.get(bundle).geometry.cases[config]
        dtypes = ", ".join(f"{k} {v}" for k, v in row["dtypes"].items())
        fits = "" if max(one["total_gb"], one["caching_peak_gb"]) <= HOST_GIB else f" (over {HOST_GIB})"
        lines.append(
            f"| {bundle} | {config} | {label} | {dtypes} | {row['held_mb']:.2f} ({row['rss_mb']:.2f}) "
            f"| {row['transient_mb']:.0f} | {train} + {val} | {one['cache_gb']:.1f} | {one['workers_gb']:.2f} "
            f"| {one['in_flight_gb']:.2f} | {one['caching_peak_gb']:.1f} | **{one['total_gb']:.1f}**{fits} "
            f"| {eight['total_gb']:.1f} |"
        )
        need = gpu_tflops * 1e3 / row["gflops_per_crop"]
        speed.append(
            f"| {bundle} | {config} | {label} | {row['image']} | {row['batch_mb']:.0f} | {row['crops_per_s']:.0f} "
            f"| {row['gflops_per_crop']:.0f} | {need:.0f} | {math.ceil(need / row['crops_per_s'])} | {row['num_workers']} |"
        )
    return "\n".join(lines + [""] + speed)


def measure_commit(ref: str, bundles: list, configs: list, items: dict, batches: int) -> dict:
    """The rows of git commit ``ref``: its tree extracted (git archive) and measured there by this tool, on the
    same synthetic cases (``items``: bundle -> datalist items) as the current tree."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        out, items_file = Path(tree) / "rows.json", Path(tree) / "items.json"
        items_file.write_text(json.dumps(items))
        cmd = [
            sys.executable,
            __file__,
            "--repo",
            tree,
            "--bundles",
            ",".join(bundles),
            "--configs",
            ",".join(configs),
            "--batches",
            str(batches),
            "--out",
            str(out),
            "--items_file",
            str(items_file),
        ]
        subprocess.run(cmd, check=True)
        rows = json.loads(out.read_text())["rows"]
    return {(*key.split()[:2], f"@{ref}"): row for key, row in rows.items()}


def derives_from_datalist(bundle: str) -> bool:
    """A bundle whose settings (channels, ROI, spacing, ...) come from its prepared datalist (msd_seg) has no fixed
    full-size geometry to measure here."""
    import yaml

    return "properties" in yaml.safe_load((REPO / "bundles" / bundle / "configs" / "pretrain.yaml").read_text())


# ------------------------------------------------------------------------------------ cache scaling (--caches)
def scaling_dataset(folder: Path, n: int, shape: tuple[int, ...]) -> Path:
    """``n`` generated CT cases of ``shape`` voxels in the MSD layout, prepared (a fixed window: no data read)."""
    from selfmedmae_components.data import msd
    from selfmedmae_components.data.demo import msd as demo

    dataset = Path(demo.make_demo(folder, layout="ct", num_cases=n, num_test_cases=0, shape=tuple(shape)))
    msd.prepare_datalist(dataset, eval_fraction=0.0, num_val_cases=1, check_files=False, hu_window=[-175, 250])
    return dataset


def measure_cache_row(dataset: str, cache: str, cache_dir: str, batches: int, workers: int) -> dict:
    """One size and cache, in this (fresh) process: fill time, resident set, crops/s per worker."""
    parser = config_parser(
        "msd_seg",
        "pretrain",
        {
            "dataset_dir": dataset,
            "cache": cache,
            "cache_dir": cache_dir,
            "num_workers": workers,
            "train#dataset#progress": False,
        },
    )
    _settle()
    base = _status_kb("VmRSS") / 1024
    t = time.perf_counter()
    built = parser.get_parsed_content("train#dataset")
    fill_s = time.perf_counter() - t
    os.sync()  # the cache just written goes to disk now, not while the draws are timed (2 cores: writeback competes)
    _settle()
    after_build = _status_kb("VmRSS") / 1024
    batch_size = int(parser.get_parsed_content("train#dataloader#batch_size"))
    from selfmedmae_components.data.loader import retain_freed_memory

    retain_freed_memory()  # as EpochSeededDataLoader's workers do
    # the best of 3 rounds: a round is a few seconds, and another process on the machine slows one, not three
    row = max(
        (crops_per_s(built, list_data_collate, batch_size, batches) for _ in range(3)), key=lambda r: r["crops_per_s"]
    )
    _settle()
    row.update(
        cases=len(built),
        fill_s=fill_s,
        base_mb=base,
        rss_built_mb=after_build - base,
        rss_drawn_mb=_status_kb("VmRSS") / 1024 - base,
    )
    return row


def cache_scaling(caches: list[str], sizes: list[int], shape: tuple[int, ...], batches: int, workers: int, log) -> str:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            dataset = scaling_dataset(Path(tmp) / f"n{n}", n, shape)
            log(f"{n} cases of {tuple(shape)} voxels written and prepared")
            for cache in caches:
                for fill in ("fill", "reuse") if cache == "disk" else ("fill",):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--measure_cache",
                        json.dumps([str(dataset), cache, str(Path(tmp) / f"cache{n}"), batches, workers]),
                    ]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    rows[(n, cache, fill)] = json.loads(out.strip().splitlines()[-1])
                    log(
                        f"  {n} {cache} ({fill}): "
                        + json.dumps(
                            {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[(n, cache, fill)].items()}
                        )
                    )
            shutil.rmtree(Path(tmp) / f"n{n}", ignore_errors=True)
            shutil.rmtree(Path(tmp) / f"cache{n}", ignore_errors=True)
    lines = [
        f"msd_seg pretrain, generated CT of {tuple(shape)} voxels; {workers} filling threads; crops/s on one thread "
        f"(a data-loader worker), best of 3 rounds of {batches} batches; resident set above the process before the "
        "dataset (MB):",
        "",
        "| cases | cache | fill s | RSS after build MB | RSS after drawing MB | crops/s per worker | vs ram |",
        "|---|---|---|---|---|---|---|",
    ]
    for (n, cache, fill), row in rows.items():
        ram = rows.get((n, "ram", "fill"))
        ratio = f"{row['crops_per_s'] / ram['crops_per_s']:.2f}" if ram else "-"
        label = cache if cache != "disk" else f"disk ({'filled' if fill == 'fill' else 'reused'})"
        lines.append(
            f"| {n} | {label} | {row['fill_s']:.1f} | {row['rss_built_mb']:.0f} | {row['rss_drawn_mb']:.0f} "
            f"| {row['crops_per_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ DICOM decoding (--decode)
def decode_times(shape: tuple[int, ...], repeats: int, log) -> str:
    from monai.transforms import LoadImage

    from selfmedmae_components.data import dicom, volumes
    from selfmedmae_components.data.demo import archive, msd

    image, _, affine = msd.synthetic_ct(np.random.default_rng(0), tuple(shape))
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        study = {"uid": "1.2.3.4", "id": "1"}
        datasets = archive.ct_slices(image, affine, study, "1.2.3.4.5", "1.2.3.4.6", 2, "CT")
        for k, ds in enumerate(datasets):
            folder.mkdir(exist_ok=True)
            ds.save_as(folder / f"IM{k:04d}", enforce_file_format=True)
        files = sorted(str(p) for p in folder.iterdir())

        def timed(label: str, fn) -> None:
            fn()  # untimed: the page cache warm, libraries loaded
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[label] = (time.perf_counter() - t) / repeats
            log(f"  {label}: {times[label]:.3f} s")

        nifti = Path(tmp) / "series.nii.gz"
        timed("DICOM: data/dicom.py (headers, then pixels)", lambda: dicom.load_volume(dicom.scan_files(files)[0][0]))
        timed("DICOM: MONAI ITKReader (GDCM)", lambda: LoadImage(reader="ITKReader", image_only=True)(str(folder)))
        timed("NIfTI write (.nii.gz, nibabel)", lambda: volumes.write_nifti(image, affine, nifti))
        timed("NIfTI read (.nii.gz, nibabel)", lambda: np.asanyarray(nib_load(nifti).dataobj))
        mb = image.nbytes / 2**20
    base = times["NIfTI read (.nii.gz, nibabel)"]
    lines = [
        f"One CT series of {tuple(shape)} voxels ({len(files)} slices, {mb:.0f} MB as int16), per read, "
        f"{repeats} repetitions, warm page cache, one process:",
        "",
        "| read | s per series | vs NIfTI read |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {t:.3f} | {t / base:.1f} |" for label, t in times.items()]
    return "\n".join(lines)


def nib_load(path):
    import nibabel

    return nibabel.load(str(path))


def main(
    bundles: str | tuple | list | None = None,
    configs: str | tuple | list = "pretrain,finetune",
    cases: int | None = None,
    batches: int = 5,
    baseline: str | None = None,
    gpu_tflops: float = 400.0,
    out: str | None = None,
    repo: str | None = None,
    items_file: str | None = None,
    caches: str | tuple | list | None = None,
    shape: str | tuple | list = (128, 128, 80),
    workers: int = 2,
    measure_cache: str | None = None,
    decode: str | tuple | list | None = None,
) -> None:
    """See the module docstring. ``--cases`` defaults to the registry's ``data_benchmark_cases``: 3 volumes
    (btcv, brats) or 500 images (cxr14). ``--repo`` measures another checkout's bundles and components on the
    cases listed in ``--items_file`` (JSON: bundle -> datalist items); ``--baseline`` uses both."""
    global REPO
    from selfmedmae_components import errors

    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    if measure_cache:  # one row of --caches, in its own process
        args = json.loads(measure_cache) if isinstance(measure_cache, str) else measure_cache  # fire may parse it
        print(json.dumps(measure_cache_row(*args)))
        return
    if decode:
        t0 = time.perf_counter()
        shape = [int(x) for x in (decode.split(",") if isinstance(decode, str) else decode)]
        table = decode_times(tuple(shape), batches, lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}"))
        print("\n" + table)
        if out:
            Path(out).write_text(table + "\n")
        return
    if caches:
        t0 = time.perf_counter()
        log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)
        as_list = lambda v, f: [f(x) for x in (v.split(",") if isinstance(v, str) else ([v] if np.ndim(v) == 0 else v))]
        table = cache_scaling(
            as_list(caches, str),
            as_list(cases or "50,500,2000", int),
            tuple(as_list(shape, int)),
            batches,
            workers,
            log,
        )
        print("\n" + table)
        if out:
            Path(out).write_text(table + "\n")
        return
    if repo:  # its selfmedmae_components first on the path: nothing of it is imported yet
        REPO = Path(repo).resolve()
        sys.path.insert(0, str(REPO))
    import selfmedmae_components

    if not Path(selfmedmae_components.__file__).resolve().is_relative_to(REPO):
        raise RuntimeError(f"selfmedmae_components imported from {selfmedmae_components.__file__}, not {REPO}")
    if bundles is None:  # every registry bundle with a fixed geometry
        bundles = [d.bundle for d in registry.DATASETS if not derives_from_datalist(d.bundle)]
    bundles = [registry.get(b).bundle for b in (bundles.split(",") if isinstance(bundles, str) else list(bundles))]
    for bundle in bundles:
        if derives_from_datalist(bundle):
            raise SystemExit(
                f"error: {bundle} takes its geometry from a prepared datalist (tools/prepare.py); "
                "tools/data_benchmark.py measures the bundles of a fixed dataset geometry only"
            )
    configs = configs.split(",") if isinstance(configs, str) else list(configs)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    _settle()
    base_mb = _status_kb("VmRSS") / 1024  # Python, torch, MONAI and this tool, before any data
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if items_file:  # --baseline's run in another checkout: the cases the current tree wrote
            items_of = json.loads(Path(items_file).read_text())
        else:
            items_of = {}
            for bundle in bundles:
                (tmp / bundle).mkdir()
                n = cases or registry.get(bundle).data_benchmark_cases
                items_of[bundle] = write_cases(bundle, tmp / bundle, n)
                geo = registry.get(bundle).geometry
                mm = f", {geo.spacing} mm" if geo.spacing else ""
                log(f"{bundle}: wrote {n} synthetic cases of {geo.shape} voxels{mm}")
        if baseline:
            results.update(measure_commit(baseline, bundles, configs, items_of, batches))
        for bundle in bundles:
            items = items_of[bundle]
            # untimed warm-up: the first case loads readers and libraries, which would count as cache
            build_cached(
                config_parser(bundle, configs[0], {"train#data": items[:1], "train#dataset#progress": False}),
                "train#dataset",
            )
            for config in configs:
                results[(bundle, config, "now")] = measure(bundle, config, items, batches, log)
    results = dict(
        sorted(results.items(), key=lambda kv: (bundles.index(kv[0][0]), configs.index(kv[0][1]), kv[0][2] == "now"))
    )
    table = report(results, base_mb, gpu_tflops)
    print("\n" + table)
    if out:
        Path(out).write_text(
            json.dumps(
                {
                    "base_mb": base_mb,
                    "gpu_tflops": gpu_tflops,
                    "table": table,
                    "rows": {" ".join(k): v for k, v in results.items()},
                },
                indent=1,
            )
        )
        log(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire(main)
