"""Scale out and survive: torchrun DDP on CPU (gloo), kill -9 and resume, determinism.

The runs use the btcv_seg (and, for torchrun, cxr14_cls) pretrain/finetune configs with the demo preset made tiny.
"""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from bundle_runner import REPO, configs, read_losses, run_bundle

from selfmedmae_components.data import btcv
from selfmedmae_components.data.demo import btcv as btcv_demo
from selfmedmae_components.weights import load_state_dict

TINY = dict(
    roi_size="[32,32,32]", pixdim="[8.0,8.0,8.0]", hidden_size=48, decoder_hidden_size=48, num_workers=0, amp=False
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("btcv_small") / "btcv"
    btcv_demo.make_demo(data, num_test_cases=0, shape=(64, 64, 24))
    btcv.prepare_datalist(data)
    return data


KILL_RUN = dict(max_epochs=6, save_interval=1, **TINY)  # the runs the kill tests interrupt and compare


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """An uninterrupted pre-training, the reference for the resumed ones."""
    out = tmp_path_factory.mktemp("straight")
    run_bundle("pretrain", configs("btcv_seg", "pretrain", "demo"), dataset_dir=dataset, bundle_root=out, **KILL_RUN)
    return out


def bundle_cmd(run_id, config_file, **overrides):
    cmd = ["-m", "monai.bundle", "run", run_id, "--config_file", config_file]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def assert_loadable(folder):
    for f in folder.glob("*.pt"):
        torch.load(f, weights_only=True)  # a truncated file would raise


def assert_same_run(straight, resumed):
    """The resumed run ends with the uninterrupted run's weights and logged each epoch once, with its loss."""
    reference = load_state_dict(straight / "models" / "mae_pretrain.pt")
    weights = load_state_dict(resumed / "models" / "mae_pretrain.pt")
    assert weights.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-6, atol=1e-6, msg=key)
    with open(resumed / "logs/pretrain/loss.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, KILL_RUN["max_epochs"] + 1))
    assert read_losses(resumed / "logs/pretrain/loss.csv") == read_losses(straight / "logs/pretrain/loss.csv")


def test_kill_and_resume_reaches_the_uninterrupted_result(dataset, straight, tmp_path):
    cfg = configs("btcv_seg", "pretrain", "demo")
    common = dict(dataset_dir=dataset, **KILL_RUN)

    # stopped just before the 4th checkpoint write (tests/stall_save.py), so the kill lands between two complete
    # checkpoints however fast the machine trains (polling for a file raced with its n_saved=1 removal)
    crashed, marker = tmp_path / "crashed", tmp_path / "before_epoch_4"
    cmd = [sys.executable, str(REPO / "tests" / "stall_save.py"), "4:before", str(marker)]
    proc = subprocess.Popen(
        cmd + bundle_cmd("pretrain", cfg, bundle_root=crashed, **common)[1:],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its fourth checkpoint"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(int(p.stem.split("=")[-1]) for p in (crashed / "models").glob("mae_checkpoint_epoch=*.pt"))
    assert killed_at == 3 and not (crashed / "models" / "mae_pretrain.pt").exists()
    assert_loadable(crashed / "models")
    saved = torch.load(crashed / "models" / f"mae_checkpoint_epoch={killed_at}.pt", weights_only=True)
    # 18 volumes, batch 2: 9 iterations per epoch; the AdamW moments are saved too
    assert saved["trainer"]["iteration"] == 9 * killed_at and saved["optimizer"]["state"]

    log = run_bundle("pretrain", cfg, bundle_root=crashed, resume=True, **common).stdout
    assert f"Resuming from {crashed / 'models' / f'mae_checkpoint_epoch={killed_at}.pt'}" in log
    assert f"Epoch: {killed_at + 1}/6" in log and "Epoch: 1/6" not in log  # continued, not restarted

    # the same seed gives the same weights and loss curve, across the interruption too
    assert_same_run(straight, crashed)
    assert sorted(p.name for p in (crashed / "models").iterdir()) == [
        "mae_checkpoint_epoch=6.pt",
        "mae_pretrain.pt",
        "pretrain_run.json",
    ]
    assert_loadable(crashed / "models")


def test_kill_while_a_checkpoint_is_written(dataset, straight, tmp_path):
    """SIGKILL while the epoch-3 checkpoint is half written (tests/stall_save.py stops the third
    torch.save there); a complete checkpoint must exist at that instant, and resuming must reach the
    uninterrupted run's weights with n_saved and the loss log intact."""
    cfg = configs("btcv_seg", "pretrain", "demo")
    common = dict(dataset_dir=dataset, **KILL_RUN)
    crashed, marker, models = tmp_path / "crashed", tmp_path / "stalled_write", tmp_path / "crashed" / "models"
    cmd = [sys.executable, str(REPO / "tests" / "stall_save.py"), "3", str(marker)]
    proc = subprocess.Popen(
        cmd + bundle_cmd("pretrain", cfg, bundle_root=crashed, **common)[1:],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before its third checkpoint write"
            time.sleep(0.05)
        # mid-write: the previous checkpoint is still there, complete
        assert [p.name for p in models.glob("mae_checkpoint_epoch=*.pt")] == ["mae_checkpoint_epoch=2.pt"]
        assert_loadable(models)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    half_written = list(models.glob(".mae_checkpoint_epoch=3.pt.*.tmp"))
    assert len(half_written) == 1 and half_written[0].stat().st_size > 0  # killed inside the write

    log = run_bundle("pretrain", cfg, bundle_root=crashed, resume=True, **common).stdout
    assert f"Resuming from {models / 'mae_checkpoint_epoch=2.pt'}" in log
    # stale temp file gone, the epoch-2 checkpoint removed once epoch 3 was complete: n_saved=1 holds
    assert sorted(p.name for p in models.iterdir()) == [
        "mae_checkpoint_epoch=6.pt",
        "mae_pretrain.pt",
        "pretrain_run.json",
    ]
    assert_same_run(straight, crashed)


def test_resume_without_checkpoint_is_an_error(dataset, tmp_path):
    from bundle_runner import run_bundle_expect_error

    msg = run_bundle_expect_error(
        "pretrain",
        configs("btcv_seg", "pretrain", "demo"),
        dataset_dir=dataset,
        bundle_root=tmp_path,
        resume=True,
        max_epochs=1,
        **TINY,
    )
    assert "no 'mae_checkpoint_epoch=N.pt'" in msg


def torchrun(nproc, run_id, config_file, **overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd += bundle_cmd(run_id, config_file, **overrides)  # torchrun ... -m monai.bundle run ...
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def test_torchrun_two_processes_pretrain_and_finetune(dataset, tmp_path):
    out = tmp_path / "ddp"
    common = dict(dataset_dir=dataset, bundle_root=out, **TINY)
    log = torchrun(
        2,
        "pretrain",
        configs("btcv_seg", "pretrain", "multi_gpu_pretrain", "demo"),
        max_epochs=4,
        batch_size=1,
        image_interval=2,
        **common,
    )
    losses = read_losses(out / "logs/pretrain/loss.csv")
    assert losses[-1] < losses[0]
    assert len(list((out / "logs/pretrain").glob("events.out.tfevents.*"))) >= 1
    # one process writes: one checkpoint per kind, one loss log with one row per epoch
    assert sorted(p.name for p in (out / "models").glob("*.pt")) == [
        "mae_checkpoint_epoch=4.pt",
        "mae_pretrain.pt",
    ] or sorted(p.name for p in (out / "models").glob("*.pt")) == ["mae_pretrain.pt"]
    assert len(losses) == 4
    # both ranks ran: 18 volumes / 2 ranks / batch 1 = 9 iterations per epoch on each
    assert "Epoch: 4/4, Iter: 9/9" in log

    # the global batch (2 ranks x 1 volume) sets the effective learning rate, as 1 process x 2 volumes does
    single = tmp_path / "single"
    run_bundle(
        "pretrain",
        configs("btcv_seg", "pretrain", "demo"),
        max_epochs=4,
        batch_size=2,
        **dict(common, bundle_root=single),
    )
    single_losses = read_losses(single / "logs/pretrain/loss.csv")
    assert losses == pytest.approx(single_losses, rel=0.15)  # same data and schedule; crops/masks differ by rank

    torchrun(
        2,
        "finetune",
        configs("btcv_seg", "finetune", "multi_gpu_finetune", "demo"),
        max_epochs=2,
        val_interval=1,
        batch_size=1,
        **common,
    )
    ft = read_losses(out / "logs/finetune/loss.csv")
    assert len(ft) == 2 and ft[-1] < ft[0]
    assert (out / "models" / "model.pt").is_file()  # best validation model, saved by rank 0


def test_torchrun_two_processes_cxr14(tmp_path):
    """The cxr14_cls multi-GPU configs: the same layering on the 2D bundle, validation AUC gathered over ranks."""
    from selfmedmae_components.data import cxr14
    from selfmedmae_components.data.demo import cxr14 as cxr14_demo

    data = cxr14_demo.make_demo(tmp_path / "cxr14", num_images=120, image_size=64, seed=0)
    datalist = cxr14.prepare_datalist(data, num_workers=0)
    out = tmp_path / "ddp"
    common = dict(dataset_dir=data, bundle_root=out, hidden_size=48, num_workers=0, amp=False, batch_size=8)
    cfg = lambda name: configs("cxr14_cls", name, f"multi_gpu_{name}", "demo")  # noqa: E731
    log = torchrun(2, "pretrain", cfg("pretrain"), max_epochs=2, **common)
    assert len(read_losses(out / "logs/pretrain/loss.csv")) == 2  # rank 0 alone writes the log
    # both ranks ran: each gets half of the train_val images, 8 per step
    per_rank = -(-(len(datalist["training"]) + len(datalist["validation"])) // 2)  # padded to divide evenly
    steps = -(-per_rank // 8)
    assert f"Epoch: 2/2, Iter: {steps}/{steps}" in log
    torchrun(2, "finetune", cfg("finetune"), max_epochs=2, val_interval=1, **common)
    assert len(read_losses(out / "logs/finetune/loss.csv")) == 2
    assert (out / "models" / "model.pt").is_file()  # best validation AUC, saved by rank 0


def test_torchrun_three_processes_finetune_with_fewer_validation_cases_than_ranks(dataset, tmp_path):
    """2 validation cases on 3 ranks (MONAI's DistributedSampler raised there). The metric gathered
    over the ranks must be the mean over the 2 cases (padding would count one twice): with a learning rate of 0
    both runs validate their common initial weights, and one process must find the same Dice. The step runs
    in micro-batches of 1 crop, so DDP's no_sync path runs too."""
    common = dict(
        dataset_dir=dataset, init_mode="scratch", learning_rate=0.0, max_epochs=1, val_interval=1, batch_size=1, **TINY
    )
    log = torchrun(
        3,
        "finetune",
        configs("btcv_seg", "finetune", "multi_gpu_finetune", "demo"),
        micro_batch_size=1,
        bundle_root=tmp_path / "ddp3",
        **common,
    )
    assert "Epoch: 1/1, Iter: 6/6" in log  # 16 volumes on 3 ranks: 6 each (padded), 1 per step
    assert (tmp_path / "ddp3" / "models" / "model.pt").is_file()
    single = run_bundle(
        "finetune", configs("btcv_seg", "finetune", "demo"), bundle_root=tmp_path / "single", **common
    ).stdout
    dice = [float(re.search(r"Got new best metric of val_mean_dice: (\S+)", out).group(1)) for out in (log, single)]
    assert dice[0] == pytest.approx(dice[1], rel=1e-5)
