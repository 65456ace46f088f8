"""The training data pipelines, built from the bundle configs as a run builds them:
compact caches give the float32 tensors within the rounding their dtype allows, the BTCV crops from cached
crop centres are the crops drawn before, nothing writes into the cache (which is not copied per item),
persistent loader workers replay an epoch exactly, and under torchrun each rank caches only its part.

Memory and speed are shown by tools/data_benchmark.py, not tested here.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from bundle_runner import config_path
from monai.bundle import ConfigParser
from monai.data import CacheDataset, MetaTensor, list_data_collate
from monai.transforms import Compose, NormalizeIntensityd, RandCropByPosNegLabeld, RandomizableTrait, RepeatChanneld
from PIL import Image

from selfmedmae_components.data.demo.brats import synthetic_brain
from selfmedmae_components.data.demo.btcv import synthetic_ct
from selfmedmae_components.data.demo.shapes import save_nifti
from selfmedmae_components.data.loader import EpochSeededDataLoader
from selfmedmae_components.transforms.cxr import IMAGENET_MEAN, IMAGENET_STD, PrepareChestXRayBatch
from selfmedmae_components.transforms.indices import PackedIndices

SMALL = {  # small crops of small volumes: the pipelines' logic, not their size
    "btcv_seg": dict(roi_size=[16, 16, 16], pixdim=[6.0, 6.0, 6.0], num_samples=2),
    "brats_seg": dict(roi_size=[16, 16, 16], pixdim=[3.0, 3.0, 3.0]),
    "cxr14_cls": dict(resize=48, img_size=32),
}
FP16_UNIT = 2.0**-11  # float16 keeps 11 significant bits: relative rounding at most 2^-11 (2^-12 on [0.5, 1))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, list[dict]]:
    """Two synthetic cases per bundle, in the downloaded form."""
    folder = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(0)
    out = {"btcv_seg": [], "brats_seg": [], "cxr14_cls": []}
    for i in range(2):
        for bundle, make in (("btcv_seg", synthetic_ct), ("brats_seg", synthetic_brain)):
            image, label, affine = make(rng, (48, 48, 24))
            paths = {k: folder / f"{bundle}_{k}{i}.nii.gz" for k in ("image", "label")}
            save_nifti(image, affine, paths["image"])
            save_nifti(label, affine, paths["label"])
            out[bundle].append({k: str(v) for k, v in paths.items()})
        png = folder / f"cxr{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(png)
        out["cxr14_cls"].append({"image": str(png), "label": [float(i), 0.0] * 7})
    return out


def parser(bundle: str, config: str, *more: str, **overrides) -> ConfigParser:
    p = ConfigParser()
    p.read_config([str(config_path(bundle, name)) for name in (config, *more)])
    p.update({**SMALL[bundle], **overrides})
    return p


def split_at_cache(transform: Compose) -> tuple[Compose, Compose]:
    """(what CacheDataset caches, what runs at every draw): the split at the first random transform."""
    first = next(i for i, t in enumerate(transform.transforms) if isinstance(t, RandomizableTrait))
    return Compose(transform.transforms[:first]), Compose(transform.transforms[first:])


def training_chain(bundle: str, config: str, **overrides) -> Compose:
    p = parser(bundle, config, **overrides)
    return p.get_parsed_content("train#transforms" if config == "pretrain" else "train#preprocessing")


def without_casts(chain: Compose) -> Compose:
    """The chain as it was before the compact cache: no CastToTyped, ToUInt8d or PackIndicesd."""
    return Compose([t for t in chain.transforms if type(t).__name__ not in ("CastToTyped", "ToUInt8d", "PackIndicesd")])


def plain(x) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


# ------------------------------------------------------------------------------------ compact cache
@pytest.mark.parametrize(
    "bundle,config",
    [("btcv_seg", "pretrain"), ("btcv_seg", "finetune"), ("brats_seg", "pretrain"), ("brats_seg", "finetune")],
)
def test_compact_cache_holds_the_float32_values_within_float16_rounding(cases, bundle, config):
    cached, _ = split_at_cache(training_chain(bundle, config, mae_crops="label"))
    for item in cases[bundle]:
        compact, reference = cached(dict(item)), without_casts(cached)(dict(item))
        assert compact["image"].dtype == torch.float16 and compact["label"].dtype == torch.uint8
        image, ref = plain(compact["image"]).float(), plain(reference["image"]).float()
        # BTCV: [0, 1] HU window, at most 2^-12 (0.1 HU) off; BraTS: z-scores, relative rounding at most 2^-11
        bound = FP16_UNIT / 2 if bundle == "btcv_seg" else FP16_UNIT * ref.abs()
        assert ((image - ref).abs() <= bound + 1e-7).all() and not torch.equal(image, ref)  # rounded, not kept
        assert torch.equal(plain(compact["label"]).float(), plain(reference["label"]).float())  # labels exact
        for key in ("label_fg_indices", "label_bg_indices"):  # crop centres as bit masks: the same indices
            assert isinstance(compact[key], PackedIndices) and len(compact[key]) == len(reference[key])
            np.testing.assert_array_equal(np.asarray(compact[key]), plain(reference[key]).numpy())


@pytest.mark.parametrize("config", ["pretrain", "finetune"])
def test_cxr_8bit_cache_and_device_normalisation(cases, config):
    from monai.data import set_track_meta

    chain = training_chain("cxr14_cls", config)
    cached, _ = split_at_cache(chain)
    for item in cases["cxr14_cls"]:
        levels = cached({k: item[k] for k in (["image"] if config == "pretrain" else ["image", "label"])})["image"]
        reference = without_casts(cached)({"image": item["image"], "label": item["label"]})["image"]
        assert levels.dtype == torch.uint8 and levels.shape == (1, 48, 48)
        assert (levels.float() / 255 - plain(reference)).abs().max() <= 0.5 / 255 + 1e-6  # half a grey level

    # the device half gives what RepeatChanneld + NormalizeIntensityd gave in the workers, on the same levels
    set_track_meta(False)
    try:
        batch = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
        image, label = PrepareChestXRayBatch(IMAGENET_MEAN, IMAGENET_STD)({"image": batch}, torch.device("cpu"))
        workers = Compose(
            [
                RepeatChanneld("image", 3),
                NormalizeIntensityd("image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
            ]
        )
        expected = torch.stack([plain(workers({"image": x.float() / 255})["image"]) for x in batch])
    finally:
        set_track_meta(True)
    assert label is None and image.dtype == torch.float32
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="8-bit single-channel"):
        PrepareChestXRayBatch(IMAGENET_MEAN, IMAGENET_STD)({"image": batch.float()}, torch.device("cpu"))


# ------------------------------------------------------------------------------------ crop centres
@pytest.mark.parametrize("config", ["finetune", "pretrain"])
def test_btcv_crops_from_cached_centres_are_the_crops_drawn_before(cases, config):
    """The centres RandCropByPosNegLabeld computed at every call (label > 0, or [0, 1] image > 0), cached:
    with the same seed the same crops, the label exact, the image within float16 rounding (the cache's, and
    the intensity augmentations', which compute in float16 before the device makes the crops float32)."""
    chain = training_chain("btcv_seg", config, mae_crops="label")
    cached, random = split_at_cache(chain)
    crop = random.transforms[0]
    before_crop = RandCropByPosNegLabeld(  # the crop as the configs had it before
        keys=["image", "label"],
        label_key="label",
        spatial_size=crop.cropper.spatial_size,
        pos=1,
        neg=1,
        num_samples=crop.cropper.num_samples,
        image_key="image",
        image_threshold=0,
    )
    before_cached = Compose([t for t in without_casts(cached).transforms if type(t).__name__ != "FgBgToIndicesd"])
    before_random = Compose([before_crop, *without_casts(random).transforms[1:]])
    for item in cases["btcv_seg"]:
        data, before_data = cached(dict(item)), before_cached(dict(item))
        assert "label_fg_indices" in data and "label_fg_indices" not in before_data
        for seed in range(4):
            now, was = random.set_random_state(seed)(data), before_random.set_random_state(seed)(before_data)
            assert len(now) == len(was) == crop.cropper.num_samples
            for a, b in zip(now, was):
                assert a["image"].dtype == torch.float16 and a["label"].dtype == torch.uint8
                assert torch.equal(plain(a["label"]).float(), plain(b["label"]))  # the same crops
                torch.testing.assert_close(
                    plain(a["image"]).float(), plain(b["image"]), rtol=3 * FP16_UNIT, atol=FP16_UNIT / 2
                )


# ------------------------------------------------------------------------------------ the cache is not copied
@pytest.mark.parametrize("bundle", ["btcv_seg", "brats_seg", "cxr14_cls"])
@pytest.mark.parametrize("config", ["pretrain", "finetune"])
def test_random_transforms_never_write_into_the_cache(cases, bundle, config):
    """copy_cache: false hands the cached tensors to the random transforms without a copy; with every
    random transform forced on, drawing each case repeatedly leaves the cache as it was."""
    p = parser(bundle, config, **({"mae_crops": "label"} if bundle != "cxr14_cls" else {}))
    data = (
        cases[bundle]
        if config == "finetune" or bundle != "cxr14_cls"
        else [{"image": c["image"]} for c in cases[bundle]]
    )
    p.update({"train#data": data, "train#dataset#num_workers": 0, "train#dataset#progress": False})
    dataset = p.get_parsed_content("train#dataset")
    assert isinstance(dataset, CacheDataset) and dataset.copy_cache is False
    snapshot = copy.deepcopy(dataset._cache)
    dataset.transform.set_random_state(0)
    for forced in (False, True):  # the configured probabilities, then every random transform on
        for t in dataset.transform.transforms:
            if forced and isinstance(t, RandomizableTrait) and hasattr(t, "prob"):
                t.prob = 1.0
        for _ in range(3):
            for i in range(len(dataset)):
                out = dataset[i]
                # an unflipped crop is a view of the cache; the collated batch, all a consumer sees, is not
                list_data_collate(out if isinstance(out, list) else [out])["image"].add_(1)
    for now, was in zip(dataset._cache, snapshot):
        assert now.keys() == was.keys()
        for key in was:
            if isinstance(was[key], torch.Tensor):
                assert torch.equal(plain(now[key]), plain(was[key])), key


# ------------------------------------------------------------------------------------ persistent workers
def epochs(loader, seeds: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each epoch as a run has it: the main RNG seeded from the epoch (EpochSeeder), the epoch's batches,
    then one draw of the main RNG (the MAE masks come from it)."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append((torch.cat([b["image"] for b in loader]), torch.rand(3)))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_workers_replay_an_epoch_as_a_resumed_run_draws_it(workers):
    from monai.transforms import EnsureTyped, RandFlipd, RandSpatialCropSamplesd

    data = [{"image": torch.arange(4096.0).reshape(1, 16, 16, 16) + 1e4 * i} for i in range(6)]
    transform = Compose(
        [
            EnsureTyped("image", track_meta=False),
            RandSpatialCropSamplesd("image", (4, 4, 4), num_samples=2, random_size=False),
            RandFlipd("image", prob=0.5, spatial_axis=0),
        ]
    )
    dataset = CacheDataset(data, transform, progress=False, copy_cache=False)

    def loader() -> EpochSeededDataLoader:
        return EpochSeededDataLoader(
            dataset, batch_size=2, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )

    straight = epochs(loader(), [1, 2, 3])  # one loader, its workers kept over the three epochs
    resumed = epochs(loader(), [3])  # a run resumed at the third epoch: new workers
    assert torch.equal(straight[2][0], resumed[0][0]) and torch.equal(straight[2][1], resumed[0][1])
    assert not torch.equal(straight[1][0], straight[2][0])  # and the epochs differ


def test_bundle_training_loaders_keep_their_workers_and_pin_memory_for_cuda():
    for bundle in ("btcv_seg", "brats_seg", "cxr14_cls"):
        for config in ("pretrain", "finetune"):
            p = parser(bundle, config, num_workers=4)
            loader = p["train"]["dataloader"]
            assert loader["_target_"].endswith("EpochSeededDataLoader")
            assert p.get_parsed_content("train#dataloader#persistent_workers") is True
            assert p.get_parsed_content("train#dataloader#pin_memory") == torch.cuda.is_available()
            assert p.get_parsed_content("train#trainer#non_blocking") is True
            if bundle == "cxr14_cls":  # one 8-bit channel to the device, normalised there
                assert isinstance(p.get_parsed_content("train#trainer#prepare_batch"), PrepareChestXRayBatch)
            else:  # compact crops to the device, float32 there
                assert p.get_parsed_content("train#trainer#to_kwargs") == {"dtype": torch.float32}
            p["num_workers"] = 0  # PyTorch refuses persistent workers without workers
            assert p.get_parsed_content("train#dataloader#persistent_workers") is False


# ------------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize("bundle", ["btcv_seg", "cxr14_cls"])
def test_multi_gpu_ranks_cache_only_their_part(monkeypatch, bundle):
    """Each rank's CacheDataset gets its own part of the training list (padded to equal parts, as
    DistributedSampler padded), and no DistributedSampler splits it again."""
    import torch.distributed as dist

    items = [{"image": f"case{i}.nii.gz", "label": f"label{i}.nii.gz"} for i in range(7)]
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        p = parser(bundle, "pretrain", "multi_gpu_pretrain", **{"train#data": items})
        p.get_parsed_content("initialize")  # imports dist; the process group "exists"
        parts.append(p.get_parsed_content("train#dataset#data"))
        assert p.get("train#dataloader#sampler") is None and p.get_parsed_content("train#dataloader#shuffle") is True
    assert len(parts[0]) == len(parts[1]) == 4  # ceil(7 / 2), one case repeated
    names = [d["image"] for d in parts[0] + parts[1]]
    assert sorted(set(names)) == sorted(d["image"] for d in items) and len(names) == 8


FAULTS_OF_A_BATCH = """
import resource, sys
import torch
from selfmedmae_components.data.loader import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
for step in range(6):  # 40 MB batches built and freed, as a worker builds them; the last 3 once the heap has settled
    if step == 3:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batch = torch.ones(40 << 20, dtype=torch.uint8)
    del batch
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_loader_workers_build_each_batch_in_memory_they_already_hold():
    """EpochSeededDataLoader's workers keep freed memory (data/loader.py retain_freed_memory): glibc would unmap a
    freed batch and fault every page of the next one in again (about 10 000 faults for 40 MB)."""
    from selfmedmae_components.data.loader import EpochSeededDataLoader, _worker_init

    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_OF_A_BATCH, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "retain")
    }
    assert faults["default"] > 9000 and faults["retain"] < 500, faults
    assert EpochSeededDataLoader([1, 2], num_workers=1).worker_init_fn is _worker_init
