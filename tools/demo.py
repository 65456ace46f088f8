"""The end-to-end demo on generated data, through the same commands a user runs on a download:

    make demo data (download layout) -> tools/prepare_*.py -> pretrain -> finetune -> evaluate -> inference

    python tools/demo.py                 # every bundle listed in DEMOS (btcv_seg, brats_seg, cxr14_cls)
    python tools/demo.py --bundles btcv_seg --workdir demo_runs

Each bundle runs with its configs/demo.yaml preset layered on the real configs (a small ViT on
small crops, so that it fits a few minutes on 2 CPU cores); the epoch counts are set below.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]

# per bundle: demo data kind and generator options, the folder the prepare tool reads, epochs of the two
# training stages, the folder inference reads, extra environment
DEMOS = {
    "btcv_seg": {"data": "btcv", "dataset": "", "prepare": "prepare_btcv.py", "pretrain_epochs": 40, "finetune_epochs": 30,
                 "val_interval": 10, "input": "RawData/Testing/img"},
    "brats_seg": {"data": "brats", "dataset": "Task01_BrainTumour", "prepare": "prepare_msd_brats.py", "pretrain_epochs": 20,
                  "finetune_epochs": 20, "val_interval": 5, "input": "imagesTs"},
    # the tiny 2D ViT runs many small operations: one thread per process is faster than two (docs/README.md)
    "cxr14_cls": {"data": "cxr14", "make_args": ["--num_images", "1200", "--image_size", "128"], "dataset": "",
                  "prepare": "prepare_cxr14.py", "pretrain_epochs": 15, "finetune_epochs": 40, "val_interval": 5,
                  "input": "images", "env": {"OMP_NUM_THREADS": "1"}},
}


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}) after {time.time() - start:.0f} s; see the log: {log}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def run_demo(bundle: str, workdir: Path) -> None:
    spec = DEMOS[bundle]
    data_root = workdir / "data" / spec["data"]
    out = workdir / bundle
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    log.write_text("")
    py = sys.executable
    print(f"\n=== {bundle}: outputs in {out}, full log in {log}", flush=True)
    env = spec.get("env")
    _run([py, "tools/make_demo_data.py", spec["data"], str(data_root), *spec.get("make_args", [])], log)
    dataset_dir = data_root / spec["dataset"]
    _run([py, f"tools/{spec['prepare']}", str(dataset_dir)], log)
    cfg = lambda name: str([f"bundles/{bundle}/configs/{name}.yaml", f"bundles/{bundle}/configs/demo.yaml"])
    common = ["--dataset_dir", str(dataset_dir), "--bundle_root", str(out)]
    bundle_run = [py, "-m", "monai.bundle", "run"]
    _run(bundle_run + ["pretrain", "--config_file", cfg("pretrain"), *common, "--max_epochs", str(spec["pretrain_epochs"])],
         log, env)
    _run(bundle_run + ["finetune", "--config_file", cfg("finetune"), *common, "--max_epochs", str(spec["finetune_epochs"]),
                       "--val_interval", str(spec["val_interval"])], log, env)
    _run(bundle_run + ["evaluate", "--config_file", cfg("evaluate"), *common], log, env)
    _run(bundle_run + ["inference", "--config_file", cfg("inference"), "--bundle_root", str(out),
                       "--input_dir", str(dataset_dir / spec["input"])], log, env)
    losses = (out / "logs" / "pretrain" / "loss.csv").read_text().splitlines()[1:]
    first, last = float(losses[0].split(",")[2]), float(losses[-1].split(",")[2])
    print(f"\nMAE pre-training loss: epoch 1 {first:.4f} -> epoch {len(losses)} {last:.4f}")
    print((out / "eval" / "summary.md").read_text())
    print(f"reconstruction image: {out / 'logs' / 'pretrain' / 'reconstruction_latest.png'}")
    for table in sorted((out / "eval").glob("*.csv")):
        print(f"evaluation table:     {table}")
    print(f"predictions:          {out / 'predictions'}")
    print(f"TensorBoard:          tensorboard --logdir {out / 'logs'}")


def main(bundles: str | tuple = tuple(DEMOS), workdir: str = "demo_runs") -> None:
    """Run the demo for the given bundles (comma-separated or a list) into ``workdir``."""
    names = bundles.split(",") if isinstance(bundles, str) else list(bundles)
    unknown = [b for b in names if b not in DEMOS]
    if unknown:
        sys.exit(f"unknown bundle(s) {unknown}; choose from {sorted(DEMOS)}")
    start = time.time()
    for bundle in names:
        run_demo(bundle, (REPO / workdir).resolve())
    print(f"\ndemo finished in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    fire.Fire(main)
