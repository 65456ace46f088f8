"""Self pre-training on the btcv demo data, honestly: fine-tune from scratch and from MAE with a few
labelled cases, several seeds each, and report the mean and spread of Dice on the 12 evaluation cases.

    python tools/demo_experiment.py --workdir demo_runs/experiment    # the documented run (~31 min, 2 CPU cores)

Steps, all through the bundle configs with the demo preset (``configs/demo.yaml``):

1. the demo data in the BTCV download layout (``tools/make_demo_data.py btcv``) and its datalist
   (``tools/prepare_btcv.py``), then a copy of the datalist with only ``--labelled`` training cases;
2. MAE pre-training once, label-free, on all 18 training volumes (``pretrain``, ``--pretrain_epochs``);
3. for every seed: ``finetune`` with ``--init_mode scratch`` and with ``--init_mode mae`` on the few
   labelled cases (``--finetune_epochs``, last checkpoint kept: no validation-based selection), then
   ``evaluate`` on the paper's 12 evaluation cases (``--eval_cases`` fewer, for reduced runs only);
4. ``<workdir>/results.md``: per-seed Dice, mean and sample standard deviation per initialisation,
   and the paired (same seed) difference MAE - scratch.

Runs already evaluated with the same commands are not repeated. ``--override`` passes config ids to
every stage (``finetune:key=value`` to one), e.g. to shrink the experiment further.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import sweep  # tools/sweep.py: the bundle runner shared by the experiment tools

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("8 organs (paper)", "13 organs")


def prepare_data(data: Path, shape: str, labelled: int, eval_cases: int = 12) -> Path:
    """Demo data + datalist through the user-facing tools; returns the few-labelled-cases datalist
    (its evaluation list cut to ``eval_cases`` only for reduced runs)."""
    if not (data / "datalist.json").is_file():
        subprocess.run([sys.executable, "tools/make_demo_data.py", "btcv", str(data), f"--shape={shape}"], cwd=REPO, check=True)
        subprocess.run([sys.executable, "tools/prepare_btcv.py", str(data)], cwd=REPO, check=True)
    datalist = json.loads((data / "datalist.json").read_text())
    if labelled > len(datalist["training"]):
        raise SystemExit(f"--labelled {labelled}: the datalist has {len(datalist['training'])} training cases")
    few = dict(datalist, training=datalist["training"][:labelled], evaluation=datalist["evaluation"][:eval_cases])
    path = data / f"datalist_{labelled}_labelled_{eval_cases}_eval.json"
    path.write_text(json.dumps(few, indent=1))
    return path


def mean_sd(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def experiment(workdir: str, labelled: int, seeds: list[int], pretrain_epochs: int, finetune_epochs: int,
               shape: str, presets: list[str], overrides: list[str], command: str, eval_cases: int = 12) -> Path:  # fmt: skip
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = work / "data" / "btcv"
    few = prepare_data(data, shape, labelled, eval_cases)
    per_stage = sweep.parse_overrides(overrides)
    common = {"dataset_dir": data}

    # MAE pre-training: once, on every training volume (no labels used)
    mae_root = work / "pretrain"
    pre = {"pretrain": {**common, **per_stage["pretrain"], "max_epochs": pretrain_epochs}}
    cmd = sweep.bundle_command("btcv_seg", "pretrain", presets, {"bundle_root": mae_root, **pre["pretrain"]})
    checkpoint = mae_root / "models" / "mae_pretrain.pt"
    plan = mae_root / "commands.json"
    if not (checkpoint.is_file() and plan.is_file() and plan.read_text() == json.dumps(cmd[1:])):
        mae_root.mkdir(parents=True, exist_ok=True)
        checkpoint.unlink(missing_ok=True)
        print("MAE pre-training ...", end=" ", flush=True)
        seconds = sweep.run_logged(cmd, mae_root / "pretrain.log")
        plan.write_text(json.dumps(cmd[1:]))
        print(f"{seconds:.0f} s", flush=True)
    loss = (mae_root / "logs/pretrain/loss.csv").read_text().splitlines()[1:]
    mae_loss = (float(loss[0].split(",")[2]), float(loss[-1].split(",")[2]))

    results: dict[str, dict[int, dict]] = {"scratch": {}, "mae": {}}
    for seed in seeds:
        for init in ("scratch", "mae"):
            settings = {
                "finetune": {**common, "datalist_file": few, "seed": seed, "init_mode": init, "pretrained_checkpoint": checkpoint,
                             "max_epochs": finetune_epochs, "validation_mode": "none", **per_stage["finetune"]},
                "evaluate": {**common, "datalist_file": few, **per_stage["evaluate"]},
            }  # fmt: skip
            results[init][seed] = sweep.run_pipeline(work / f"{init}_seed{seed}", "btcv_seg", presets, settings,
                                                     label=f"seed {seed}, {init}")  # fmt: skip

    dice = {i: {s: {g: r["groups"][g]["dice"] for g in GROUPS} for s, r in runs.items()} for i, runs in results.items()}
    lines = [
        f"Demo experiment: btcv_seg demo preset, {labelled} labelled training cases, MAE pre-trained {pretrain_epochs} "
        f"epochs on all 18 training volumes (loss {mae_loss[0]:.3f} -> {mae_loss[1]:.3f}), fine-tuned {finetune_epochs} "
        f"epochs, evaluated on {eval_cases} of the 12 evaluation cases; seeds {', '.join(map(str, seeds))}; demo data shape {shape}.",
        f"Overrides: {' '.join(overrides) or '-'}. Wall time of this call {time.time() - start:.0f} s (stages reused from an earlier call not counted; see the logs).",
        "",
        "| initialisation | Dice 8 organs (%) mean ± sd | Dice 13 organs (%) mean ± sd | per seed (8 organs) |",
        "|---|---|---|---|",
    ]
    for init, name in (("scratch", "scratch (random init)"), ("mae", "MAE self pre-training")):
        per_seed = ", ".join(f"{100 * dice[init][s][GROUPS[0]]:.2f}" for s in seeds)
        lines.append(f"| {name} | {mean_sd([dice[init][s][GROUPS[0]] for s in seeds])} | "
                     f"{mean_sd([dice[init][s][GROUPS[1]] for s in seeds])} | {per_seed} |")  # fmt: skip
    diffs = [dice["mae"][s][GROUPS[0]] - dice["scratch"][s][GROUPS[0]] for s in seeds]
    lines.append(f"| MAE - scratch (paired by seed) | {mean_sd(diffs)} | "
                 f"{mean_sd([dice['mae'][s][GROUPS[1]] - dice['scratch'][s][GROUPS[1]] for s in seeds])} | "
                 f"{', '.join(f'{100 * d:+.2f}' for d in diffs)} |")  # fmt: skip
    lines += ["", f"Command: `{command}`", ""]
    out = work / "results.md"
    out.write_text("\n".join(lines))
    print("\n" + out.read_text())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_experiment")
    p.add_argument("--labelled", type=int, default=4, help="labelled training cases used for fine-tuning")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    p.add_argument("--pretrain_epochs", type=int, default=200)
    p.add_argument("--finetune_epochs", type=int, default=120)
    p.add_argument("--eval_cases", type=int, default=12, help="evaluation cases used (12 = all; fewer only to save time)")
    p.add_argument("--shape", default="128,128,48", help="voxels per demo case (make_demo_data --shape)")
    p.add_argument("--preset", action="append", default=None, help="configs layered on every stage (default: demo)")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="[STAGE:]KEY=VALUE")
    a = p.parse_args(argv)
    command = "python tools/demo_experiment.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    experiment(a.workdir, a.labelled, [int(s) for s in a.seeds.split(",")], a.pretrain_epochs, a.finetune_epochs,
               a.shape, a.preset or ["demo"], a.override, command, a.eval_cases)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
