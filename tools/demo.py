"""The end-to-end demo on generated data, through the same commands a user runs on a download:

    make demo data (download layout) -> tools/prepare.py -> pretrain -> finetune -> evaluate -> inference

    python tools/demo.py                 # the registry's default bundles (btcv_seg, brats_seg, cxr14_cls)
    python tools/demo.py --bundles msd_seg   # opt-in: any MSD-format dataset (a generated 2-channel MR)
    python tools/demo.py --bundles scans     # opt-in: a generated hospital archive (DICOM, NIfTI, NRRD) into msd_seg
    python tools/demo.py --bundles btcv_seg --workdir demo_runs     # (or the dataset's name: btcv)
    python tools/demo.py --amp False     # float32, as on a CPU without native bf16 (default: the configs' amp)

Each bundle runs with its configs/demo.yaml preset layered on the real configs (a small ViT on
small crops, so that it fits a few minutes on 2 CPU cores); the epoch counts, the generator's options
and the folders are the entry's ``demo_run`` in selfmedmae_components/registry.py.
The console shows each training stage's epoch, loss and an estimated time left (read from the stage's
log, where MONAI's StatsHandler writes every iteration); the full log stays in <workdir>/<bundle>/demo.log.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selfmedmae_components import errors, registry  # noqa: E402
from selfmedmae_components.config_helpers import as_bool  # noqa: E402

# MONAI StatsHandler's iteration line, e.g. "Epoch: 3/40, Iter: 5/10 -- train_loss: 0.8123 ", and the
# progress bar of MONAI's CacheDataset (tqdm), e.g. "Loading dataset:  45%|####5     | 9/20 [00:01<00:02]"
ITERATION = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+) -- \w+: (\S+)")
CACHING = re.compile(r"Loading dataset:.*?\| *(\d+)/(\d+)")


def duration(seconds: float) -> str:
    """``65`` -> ``1m05s``: short enough for a status line."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class StageProgress:
    """A bundle stage's progress as its log tells it: epoch / total, the epoch's mean loss and an ETA.

    ``feed`` takes new log text with the time it was read; the ETA extrapolates the rate since the
    first iteration line, so the minutes of start-up and caching before it do not count as training.
    """

    def __init__(self, label: str, start: float) -> None:
        self.label, self.start = label, start
        self.epoch = self.epochs = self.completed = 0
        self.fraction = 0.0  # of all iterations
        self.losses: list[float] = []  # this epoch's, so far
        self.epoch_loss: float | None = None  # the last completed epoch's mean
        self.first: tuple[float, float] | None = None  # (time, fraction) at the first iteration line
        self.now = start
        self.caching: str | None = None
        self.partial = ""

    def feed(self, text: str, now: float) -> None:
        self.now = now
        # tqdm ends its updates with \r; a line still being written waits for the next call
        *lines, self.partial = re.split(r"[\r\n]", self.partial + text)
        for line in lines:
            if m := CACHING.search(line):
                self.caching = f"{m[1]}/{m[2]}"
            if not (m := ITERATION.search(line)):
                continue
            epoch, epochs, it, its = map(int, m.groups()[:4])
            if epoch != self.epoch:
                self.losses = []
            self.epoch, self.epochs = epoch, epochs
            self.losses.append(float(m[5]))
            self.fraction = (epoch - 1 + it / its) / epochs
            self.first = self.first or (now, self.fraction)
            if it == its:
                self.completed, self.epoch_loss = epoch, sum(self.losses) / len(self.losses)

    def eta(self) -> float | None:
        if self.first is None or self.fraction <= self.first[1]:
            return None
        t0, f0 = self.first
        return (self.now - t0) / (self.fraction - f0) * (1 - self.fraction)

    def status(self, settled: bool = False) -> str:
        """One line; ``settled``: the last completed epoch and its mean loss, else the running epoch."""
        if not self.epochs:
            what = f"caching {self.caching}" if self.caching else "running"
            return f"{self.label}  {what}  {duration(self.now - self.start)}"
        epoch, loss = (
            (self.completed, self.epoch_loss) if settled else (self.epoch, sum(self.losses) / len(self.losses))
        )
        eta = self.eta()
        return (
            f"{self.label}  epoch {epoch}/{self.epochs}  loss {loss:.4f}  ETA {'--' if eta is None else duration(eta)}"
        )

    def report_due(self, last_reported: int) -> bool:
        """For a log that is not a terminal: a line every tenth of the epochs (and at the last one)."""
        every = max(1, round(self.epochs / 10))
        return self.completed > last_reported and (self.completed % every == 0 or self.completed == self.epochs)


def _run(cmd: list[str], log: Path, env: dict | None = None, label: str = "") -> None:
    """Run ``cmd`` with its output appended to ``log``; meanwhile the console shows its progress, in place
    on a terminal, else a line every few epochs."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    tty = sys.stdout.isatty()
    # UTF-8 whatever the locale (the progress bar draws with block characters); a stray byte must not stop the demo
    with open(log, "a") as f, open(log, encoding="utf-8", errors="replace") as tail:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        tail.seek(0, os.SEEK_END)
        progress, shown, reported = StageProgress(label, start), "", 0
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        while True:
            try:
                proc.wait(timeout=1)  # returns as soon as the stage ends
            except subprocess.TimeoutExpired:
                pass
            progress.feed(tail.read(), time.time())
            if tty:
                line = "  " + progress.status()
                print("\r" + line.ljust(len(shown)), end="", flush=True)
                shown = line
            elif progress.report_due(reported):
                print("  " + progress.status(settled=True), flush=True)
                reported = progress.completed
            if proc.returncode is not None:
                break
        if shown:
            print()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}) after {time.time() - start:.0f} s; see the log: {log}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def stages(bundle: str, workdir: Path, amp: bool | str | None = None) -> list[tuple[str, list[str], dict]]:
    """The demo's commands for ``bundle``, in order, as (label, command, extra environment)."""
    entry = registry.get(bundle)
    spec, bundle = entry.demo_run, entry.bundle
    data_root, out, py = workdir / "data" / entry.name, workdir / run_folder(entry.name), sys.executable
    dataset_dir = data_root / spec.dataset
    # the caching progress bar (tqdm) goes to the log file: an update a second, not ten
    env = {"TQDM_MININTERVAL": "1", **spec.env}
    cfg = lambda name: str([f"bundles/{bundle}/configs/{name}.yaml", f"bundles/{bundle}/configs/demo.yaml"])
    common = ["--dataset_dir", str(dataset_dir), "--bundle_root", str(out)]
    # every stage's config has the `amp` switch; "False"/"True", as fire (MONAI's CLI) reads those as bools
    amp_arg = [] if amp is None else ["--amp", str(as_bool(amp))]
    bundle_run = [py, "-m", "monai.bundle", "run"]
    return [
        ("data", [py, "tools/make_demo_data.py", entry.name, str(data_root), *spec.make_args], {}),
        ("prepare", [py, "tools/prepare.py", *spec.prepare_command(entry.name, data_root)], {}),
        (
            "pretrain",
            bundle_run
            + [
                "pretrain",
                "--config_file",
                cfg("pretrain"),
                *common,
                *amp_arg,
                "--max_epochs",
                str(spec.pretrain_epochs),
            ],
            env,
        ),
        (
            "finetune",
            bundle_run
            + [
                "finetune",
                "--config_file",
                cfg("finetune"),
                *common,
                *amp_arg,
                "--max_epochs",
                str(spec.finetune_epochs),
                "--val_interval",
                str(spec.val_interval),
            ],
            env,
        ),
        ("evaluate", bundle_run + ["evaluate", "--config_file", cfg("evaluate"), *common, *amp_arg], env),
        (
            "inference",
            bundle_run
            + [
                "inference",
                "--config_file",
                cfg("inference"),
                *common,
                *amp_arg,
                "--input_dir",
                str(dataset_dir / spec.input),
            ],
            env,
        ),
    ]


def run_folder(name: str) -> str:
    """The demo's output folder of a dataset: its bundle's name (demo_runs/btcv_seg), or the dataset's own for a
    source that shares another's bundle (demo_runs/scans)."""
    entry = registry.get(name)
    return entry.name if entry.shares_bundle else entry.bundle


def run_demo(bundle: str, workdir: Path, amp: bool | str | None = None) -> None:
    out = workdir / run_folder(bundle)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    print(f"\n=== {bundle}: outputs in {out}, full log in {log}", flush=True)
    for label, cmd, env in stages(bundle, workdir, amp):
        _run(cmd, log, env, f"{bundle} {label}")
    losses = (out / "logs" / "pretrain" / "loss.csv").read_text().splitlines()[1:]
    first, last = float(losses[0].split(",")[2]), float(losses[-1].split(",")[2])
    print(f"\nMAE pre-training loss: epoch 1 {first:.4f} -> epoch {len(losses)} {last:.4f}")
    print((out / "eval" / "summary.md").read_text())
    print(f"reconstruction image: {out / 'logs' / 'pretrain' / 'reconstruction_latest.png'}")
    for table in sorted((out / "eval").glob("*.csv")):
        print(f"evaluation table:     {table}")
    print(f"predictions:          {out / 'predictions'}")
    print(f"TensorBoard:          tensorboard --logdir {out / 'logs'}")


def main(
    bundles: str | tuple = tuple(d.bundle for d in registry.DATASETS if d.demo_run.default),
    workdir: str = "demo_runs",
    amp: bool | str | None = None,
) -> None:
    """Run the demo for the given bundles (comma-separated or a list; bundle folders or dataset names) into
    ``workdir``; ``amp`` overrides the configs' mixed-precision switch (``--amp False``: float32 throughout)."""
    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    names = bundles.split(",") if isinstance(bundles, str) else list(bundles)
    unknown = [b for b in names if registry.find(b) is None]
    if unknown:
        sys.exit(
            f"unknown bundle(s) {unknown}; choose from {[d.name if d.shares_bundle else d.bundle for d in registry.DATASETS]}"
        )
    names = [registry.get(b).name for b in names]
    start = time.time()
    for bundle in names:
        run_demo(bundle, (REPO / workdir).resolve(), amp)
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    fire.Fire(main)
