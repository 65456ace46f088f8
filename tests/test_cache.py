"""The training cache switch (``cache: ram | disk | none``, data/cache.py): the disk cache gives exactly what the RAM
cache gives, is keyed by the preprocessing settings and the files, never unpickles, and survives kills and several
processes filling one folder. Its speed and memory are shown by ``tools/data_benchmark.py --caches ram,disk``."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_runner import REPO
from cache_worker import pipeline
from monai.data import CacheDataset, Dataset
from monai.data.utils import set_rnd

from selfmedmae_components.data import cache, msd
from selfmedmae_components.data.demo import msd as demo
from selfmedmae_components.transforms.indices import PackedIndices

WORKER = Path(__file__).with_name("cache_worker.py")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        path = folder / f"ct{i}.nii.gz"
        nib.save(
            nib.Nifti1Image(rng.integers(-200, 300, (20, 18, 16)).astype(np.int16), np.diag([1.5, 1.5, 2.0, 1])), path
        )
        files.append(str(path))
    return files


def draws(dataset, seed: int = 3) -> list:
    set_rnd(dataset, seed)
    return [dataset[i] for i in range(len(dataset))]


def assert_same(a, b) -> None:
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], (np.ndarray, PackedIndices)):
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
        else:
            assert a[k] == b[k], k


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in Path(cache_dir).glob("*/*") if not p.name.startswith("."))


def test_disk_gives_what_ram_gives(volumes, tmp_path):
    data = [{"image": f} for f in volumes]
    ram = CacheDataset(data, pipeline(), progress=False)
    disk = cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False)
    assert len(entries(tmp_path)) == len(volumes)  # filled at construction
    assert_same(draws(ram), draws(disk))
    reopened = cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False)
    assert_same(draws(ram), draws(reopened))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_bundle_pipelines_read_the_same_from_disk(stage, tmp_path):
    """msd_seg's own training (and validation) datasets: every cached kind (float16 image, uint8 label, crop-centre
    bit masks, foreground coordinates) comes back from disk as it was, and the crops drawn are the same."""
    from monai.bundle import ConfigParser

    dataset = demo.make_demo(tmp_path / "data", layout="ct", num_cases=4, num_test_cases=0, shape=(24, 24, 12))
    msd.prepare_datalist(dataset, eval_fraction=0.0, num_val_cases=1, check_files=False, hu_window=[-100, 200])
    built = {}
    for mode in ("ram", "disk", "none"):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "msd_seg" / "configs" / f"{stage}.yaml"))
        parser.update({"dataset_dir": dataset, "cache": mode, "cache_dir": str(tmp_path / "cache"), "num_workers": 1})
        keys = ["train#dataset"] + (["validate#dataset"] if stage == "finetune" else [])
        built[mode] = [parser.get_parsed_content(k) for k in keys]
    assert isinstance(built["ram"][0], CacheDataset) and isinstance(built["disk"][0], cache.DiskCacheDataset)
    assert type(built["none"][0]) is Dataset
    for ram, disk, none in zip(built["ram"], built["disk"], built["none"]):
        assert_same(draws(ram), draws(disk))
        assert_same(draws(ram), draws(none))


def test_entries_are_keyed_by_settings_and_files(volumes, tmp_path, monkeypatch):
    data = [{"image": f} for f in volumes[:2]]
    first = draws(cache.DiskCacheDataset(data, pipeline(pixdim=2.0), tmp_path, progress=False))
    assert len(entries(tmp_path)) == 2
    with monkeypatch.context() as m:  # the same settings: read back, nothing computed
        m.setattr(cache.DiskCacheDataset, "_pre_transform", lambda *a: pytest.fail("computed again"))
        assert_same(first, draws(cache.DiskCacheDataset(data, pipeline(pixdim=2.0), tmp_path, progress=False)))
    other = cache.DiskCacheDataset(data, pipeline(pixdim=3.0), tmp_path, progress=False)
    assert len(entries(tmp_path)) == 4  # another spacing never reads the first entries
    assert [float(x["image"].float().mean()) for x in draws(other)] != [float(x["image"].float().mean()) for x in first]

    # an image re-written in place (same path) is a new item
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(Path(volumes[0]).read_bytes())
    cache.DiskCacheDataset([{"image": str(copy)}], pipeline(pixdim=3.0), tmp_path, progress=False)
    assert len(entries(tmp_path)) == 5
    img = nib.load(copy)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), copy)
    cache.DiskCacheDataset([{"image": str(copy)}], pipeline(pixdim=3.0), tmp_path, progress=False)
    assert len(entries(tmp_path)) == 6


def test_a_changed_window_changes_the_key():
    from monai.transforms import Compose, ScaleIntensityRanged

    key = lambda lo: cache.transform_fingerprint(Compose([ScaleIntensityRanged("image", lo, 250.0, 0.0, 1.0)]))
    assert key(-175.0) == key(-175.0) and key(-175.0) != key(-160.0)


def test_nothing_is_unpickled(volumes, tmp_path):
    """An entry planted with a pickle that would run code (an object array) is not loaded: the item is computed
    again and the code never runs."""
    data = [{"image": volumes[0]}]
    dataset = cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False)
    (entry,) = entries(tmp_path)
    expected = draws(dataset)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = np.empty(1, dtype=object)
    planted[0] = Payload()
    image_file = entry / "v0.npy"
    with open(image_file, "wb") as f:
        np.lib.format.write_array(f, planted, allow_pickle=True)
    meta = json.loads((entry / "meta.json").read_text())
    meta["files"]["v0.npy"] = image_file.stat().st_size  # the plant passes the size check
    (entry / "meta.json").write_text(json.dumps(meta))
    pickle.loads(pickle.dumps(Payload()))  # the payload is a real one: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    again = cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False)
    assert_same(expected, draws(again))
    assert not marker.exists()


def test_a_damaged_entry_is_computed_again(volumes, tmp_path):
    data = [{"image": f} for f in volumes[:2]]
    expected = draws(cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False))
    damaged = entries(tmp_path)[0] / "v0.npy"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # a truncated file (a disk or copy gone wrong)
    assert_same(expected, draws(cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False)))
    assert all(cache.read_entry(e) is not None for e in entries(tmp_path))


def test_a_run_killed_while_caching_resumes_without_a_torn_entry(volumes, tmp_path):
    """The filling process is killed (SIGKILL) half-way through writing an array; the next run fills what is
    missing and reads only whole entries."""
    cmd = [sys.executable, str(WORKER), str(tmp_path), *volumes, "--kill_at", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(entries(tmp_path)) == 3  # three whole entries; the fourth's half-written folder is hidden
    assert list(tmp_path.glob("*/.tmp-*"))
    data = [{"image": f} for f in volumes]
    resumed = cache.DiskCacheDataset(data, pipeline(), tmp_path, progress=False)
    assert len(entries(tmp_path)) == len(volumes)
    assert all(cache.read_entry(e) is not None for e in entries(tmp_path))
    assert_same(draws(Dataset(data, pipeline())), draws(resumed))


def test_two_processes_fill_one_cache(volumes, tmp_path):
    """Two processes (as two ranks or nodes on a shared filesystem) fill the same folder at the same time, each
    computing every entry: both finish, every entry is whole and right, and no temporary folder is left."""
    start = tmp_path / "start"
    cmd = [sys.executable, str(WORKER), str(tmp_path / "cache"), *volumes, "--slow", "0.1", "--start", str(start)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("start.*.ready"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    start.touch()  # both ready: they fill together
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    computed = sum(int(o[0].split(", ")[1].split()[0]) for o in outs)
    assert computed > len(volumes), outs  # some entries were computed by both at once: they raced
    cache_dir = tmp_path / "cache"
    assert len(entries(cache_dir)) == len(volumes) and not list(cache_dir.glob("*/.tmp-*"))
    data = [{"image": f} for f in volumes]
    assert_same(draws(Dataset(data, pipeline())), draws(cache.DiskCacheDataset(data, pipeline(), cache_dir)))


def test_a_value_the_disk_cache_cannot_hold_is_named(volumes, tmp_path):
    from monai.transforms import Compose, Lambdad, LoadImaged

    transform = Compose([LoadImaged("image", image_only=True), Lambdad("image", lambda x: {1, 2})])
    with pytest.raises(cache.CacheFormatError, match=r"'image' is a set.*cache: ram"):
        cache.DiskCacheDataset([{"image": volumes[0]}], transform, tmp_path, progress=False)


def test_the_switch_names_its_choices(tmp_path):
    with pytest.raises(ValueError, match=r"cache must be one of \('ram', 'disk', 'none'\), got 'ssd'"):
        cache.cached_dataset([], None, cache="ssd")
    with pytest.raises(ValueError, match="needs a cache_dir"):
        cache.cached_dataset([], None, cache="disk", cache_dir=None)


def test_the_first_writer_of_an_entry_wins(tmp_path):
    folder = tmp_path / "ab" / "abcdef"
    assert cache.write_entry({"image": torch.ones(2, 3)}, folder) is True
    assert cache.write_entry({"image": torch.zeros(2, 3)}, folder) is False  # a second rank, later
    assert torch.equal(cache.read_entry(folder)["image"], torch.ones(2, 3))
    assert not list(folder.parent.glob(".tmp-*"))
