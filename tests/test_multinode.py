"""msd_seg pre-training as 2 nodes x 1 process on this machine, as a cluster runs it: two torchrun launches that meet
through a c10d rendezvous, one shared bundle_root (checkpoints, logs) and one shared ``cache: disk`` folder (the
shared filesystem of the cluster), gloo on CPU.

    run        both "nodes" fill the one disk cache (each its own part of the cases) and train
    kill       SIGKILL of both launches (torchrun and its worker) once a resumable checkpoint exists and training has
               gone on beyond it; decided on a frozen snapshot (SIGSTOP), so the kill lands there however fast it runs
    resume     two new launches (new port, new rendezvous id) with --resume True: both ranks continue from the newest
               checkpoint, finish every epoch, and read the cache without computing an entry

Linux only (the workers are found through /proc). About 20 s on 2 CPU cores: each launch spends ~7 s starting (torchrun,
rendezvous, then torch and MONAI imports in the worker, both "nodes" at once) and ~3 s stopping; training is ~1 s.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from bundle_runner import REPO, configs

from selfmedmae_components.data import msd
from selfmedmae_components.data.cache import read_entry
from selfmedmae_components.data.demo import msd as demo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")

BUNDLE = "msd_seg"
NODES = 2
MAX_EPOCHS = 10  # epochs take ~0.1 s here: enough of them that the kill lands mid-run, few enough to resume fast
KILL_AFTER = 2  # kill once the checkpoint of this epoch (or a later one) exists and the next epoch is under way
IMAGES = 5  # pre-training images of the demo dataset (3 training, 1 validation, 1 test): 3 per rank, padded
PER_RANK = -(-IMAGES // NODES)
OVERRIDES = dict(
    hidden_size=48,
    batch_size=1,
    amp=False,
    max_epochs=MAX_EPOCHS,
    save_interval=1,
    log_interval=1,
    image_interval=MAX_EPOCHS,
    num_workers=0,
    cache="disk",
)
DEADLINE_S = 300  # for each phase: start-up, rendezvous and training take ~15 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def c10d_can_bind() -> None:
    """What each launch's rendezvous does first: host a TCPStore on 127.0.0.1; skips where that is refused."""
    try:
        store = torch.distributed.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=10))
        del store
    except (RuntimeError, OSError) as e:
        pytest.skip(f"torchrun's c10d rendezvous cannot host its store on 127.0.0.1 here: {e}")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's workers: each started in its own session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Launch:
    """One "node": ``torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d ... -m monai.bundle run pretrain``, its
    output in a file. torchrun starts its worker in a session of its own, so a SIGKILL of torchrun's process group
    alone would leave the worker training: :meth:`kill` kills both."""

    def __init__(self, node_rank: int, port: int, job: str, log: Path, **overrides) -> None:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(NODES),
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node_rank),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            job,
            "-m",
            "monai.bundle",
            "run",
            "pretrain",
            "--config_file",
            configs(BUNDLE, "pretrain", "demo", "multi_gpu_pretrain"),
        ]
        for key, value in overrides.items():
            cmd += [f"--{key}", str(value)]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def kill(self) -> None:
        workers = self.workers()
        signal_group(self.proc.pid, signal.SIGKILL)
        for pid in workers:
            signal_group(pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + 30
        for pid in workers:  # reparented once torchrun died: gone, or a zombie of whoever reaps orphans
            while Path(f"/proc/{pid}").exists() and "State:\tZ" not in _status(pid) and time.time() < deadline:
                time.sleep(0.01)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "State:\tZ"


def launch_nodes(tmp: Path, phase: str, port: int, **overrides) -> list[Launch]:
    return [Launch(r, port, f"{phase}-{port}", tmp / f"{phase}_node{r}.log", **overrides) for r in range(NODES)]


def wait_all(launches: list[Launch]) -> list[str]:
    deadline = time.time() + DEADLINE_S
    try:
        for launch in launches:
            launch.proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for launch in launches:
            if launch.proc.poll() is None:
                launch.kill()
    logs = [launch.output() for launch in launches]
    for launch, log in zip(launches, logs):
        assert launch.proc.returncode == 0, f"{launch.log.name} ended with {launch.proc.returncode}:\n{log[-6000:]}"
    return logs


def checkpoint_epochs(models: Path) -> list[int]:
    return sorted(int(p.stem.split("=")[-1]) for p in models.glob("mae_checkpoint_epoch=*.pt"))


def kill_mid_run(launches: list[Launch], models: Path) -> int:
    """Poll until a checkpoint of epoch >= KILL_AFTER exists and rank 0 has logged an iteration of the next epoch;
    freeze both workers (SIGSTOP), check that again on the frozen state (no race with the training), then SIGKILL
    both launches. Returns the epoch of the newest checkpoint, the one a resumed run continues from."""
    deadline = time.time() + DEADLINE_S

    def beyond_a_checkpoint() -> int | None:
        epochs = checkpoint_epochs(models)
        newest = epochs[-1] if epochs else 0
        log = "".join(launch.output() for launch in launches)
        return newest if newest >= KILL_AFTER and f"Epoch: {newest + 1}/{MAX_EPOCHS}, Iter: " in log else None

    try:
        while True:
            for launch in launches:
                assert launch.proc.poll() is None, (
                    f"{launch.log.name} ended before the kill:\n{launch.output()[-6000:]}"
                )
            assert time.time() < deadline, "no checkpoint to resume from in time"
            assert not (models / "mae_pretrain.pt").exists(), "training finished before it could be killed mid-run"
            if beyond_a_checkpoint() is not None:
                workers = [pid for launch in launches for pid in launch.workers()]
                for pid in workers:
                    signal_group(pid, signal.SIGSTOP)
                killed_at = beyond_a_checkpoint()  # the state the kill leaves, now that nothing moves
                if killed_at is not None:
                    return killed_at
                for pid in workers:
                    signal_group(pid, signal.SIGCONT)
            time.sleep(0.02)
    finally:
        for launch in launches:
            launch.kill()


def cache_files(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of the disk cache, with (mtime_ns, inode): an entry computed again would change both."""
    return {
        str(p.relative_to(cache_dir)): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in cache_dir.rglob("*")
        if p.is_file()
    }


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.glob("*/*") if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def runs(c10d_can_bind, tmp_path_factory) -> dict:
    """Pre-train on 2 "nodes", kill both mid-run, resume on 2 new launches; what each phase left behind."""
    tmp = tmp_path_factory.mktemp("multinode")
    dataset = Path(demo.make_demo(tmp / "data", layout="ct", num_cases=6, num_test_cases=1, shape=(36, 36, 24)))
    msd.prepare_datalist(dataset, eval_fraction=0.25, num_val_cases=1)
    shared, cache_dir = tmp / "shared_bundle_root", tmp / "shared_cache"
    common = dict(dataset_dir=dataset, bundle_root=shared, cache_dir=cache_dir, **OVERRIDES)
    models = shared / "models"
    out: dict = dict(models=models, cache_dir=cache_dir, log_dir=shared / "logs" / "pretrain")

    start = time.time()
    first = launch_nodes(tmp, "first", free_port(), **common)
    out["killed_at"] = kill_mid_run(first, models)
    out["first_logs"] = [launch.output() for launch in first]
    out["after_kill"] = dict(
        checkpoints=checkpoint_epochs(models),
        final=(models / "mae_pretrain.pt").exists(),
        loss_rows=len((out["log_dir"] / "loss.csv").read_text().splitlines()) - 1,
        cache=cache_files(cache_dir),
        entries=entries(cache_dir),
    )
    out["first_s"] = time.time() - start

    start = time.time()
    resumed = launch_nodes(tmp, "resumed", free_port(), resume=True, **common)
    out["resumed_logs"] = wait_all(resumed)
    out["resumed_s"] = time.time() - start
    out["after_resume"] = dict(cache=cache_files(cache_dir), entries=entries(cache_dir))
    print(f"first run until the kill {out['first_s']:.1f} s, resumed run {out['resumed_s']:.1f} s")
    return out


def test_both_nodes_fill_one_shared_disk_cache(runs):
    found = runs["after_kill"]["entries"]
    # one entry per pre-training image: more than either rank's part of the cases, so both ranks wrote there
    assert len(found) == IMAGES > PER_RANK, found
    assert all(read_entry(folder) is not None for folder in found), "an entry is not whole"
    assert not [p for p in runs["cache_dir"].rglob(".*")], "temporary folders left in the cache"
    for log in runs["first_logs"]:  # each launch (one rank) computed its share into the shared folder
        assert "Caching dataset on disk" in log, log[-3000:]


def test_killed_mid_run_after_a_checkpoint(runs):
    state, killed_at = runs["after_kill"], runs["killed_at"]
    assert state["checkpoints"] == [killed_at] and KILL_AFTER <= killed_at < MAX_EPOCHS  # n_saved=1: the newest only
    assert not state["final"]
    assert state["loss_rows"] >= killed_at  # rank 0 logged each epoch up to the checkpoint (and maybe one more)
    # both ranks trained together: rank 0's iteration log counts each rank's 3 of the 5 images (padded), batch 1
    assert f"Epoch: {killed_at}/{MAX_EPOCHS}, Iter: {PER_RANK}/{PER_RANK}" in "".join(runs["first_logs"])


def test_resumed_on_both_nodes_and_completed(runs):
    models, killed_at = runs["models"], runs["killed_at"]
    checkpoint = models / f"mae_checkpoint_epoch={killed_at}.pt"
    for log in runs["resumed_logs"]:  # each node's rank loaded the same checkpoint from the shared bundle_root
        assert f"Resuming from {checkpoint}" in log, log[-3000:]
    log = "".join(runs["resumed_logs"])
    assert f"Epoch: {killed_at + 1}/{MAX_EPOCHS}, Iter: 1/{PER_RANK}" in log
    assert not [e for e in range(1, killed_at + 1) if f"Epoch: {e}/{MAX_EPOCHS}, Iter" in log]  # continued
    assert f"Epoch: {MAX_EPOCHS}/{MAX_EPOCHS}, Iter: {PER_RANK}/{PER_RANK}" in log
    # the same state as the interrupted run: weights, optimiser and random streams give its loss to the last digit
    line = rf"Epoch: {killed_at + 1}/{MAX_EPOCHS}, Iter: 1/{PER_RANK} -- train_loss: \S+"
    assert re.search(line, log).group() == re.search(line, "".join(runs["first_logs"])).group()

    with open(runs["log_dir"] / "loss.csv") as f:  # each epoch once: the rows after the checkpoint were dropped
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, MAX_EPOCHS + 1))
    assert all(torch.isfinite(torch.tensor(float(r[2]))) for r in rows)
    assert sorted(p.name for p in models.iterdir()) == [
        f"mae_checkpoint_epoch={MAX_EPOCHS}.pt",
        "mae_pretrain.pt",
        "pretrain_run.json",
    ]
    trainer = torch.load(models / f"mae_checkpoint_epoch={MAX_EPOCHS}.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] == MAX_EPOCHS * PER_RANK and trainer["max_epochs"] == MAX_EPOCHS


def test_resume_reads_the_cache_without_computing(runs):
    before, after = runs["after_kill"], runs["after_resume"]
    assert after["entries"] == before["entries"]
    assert after["cache"] == before["cache"]  # no entry written again: same files, times and inodes
    for log in runs["resumed_logs"]:  # neither rank found an entry missing (whichever part of the cases it got)
        assert "Caching dataset on disk" not in log, log[-3000:]
