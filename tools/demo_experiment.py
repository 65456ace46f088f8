"""Does self pre-training pay on the demo data? Fine-tune from scratch and from MAE with very few labelled
cases, over paired seeds, and test the paired difference.

    python tools/demo_experiment.py --bundle btcv_seg  --workdir demo_runs/experiment   # the documented runs
    python tools/demo_experiment.py --bundle brats_seg --workdir demo_runs/experiment

Steps, all through the bundle configs with the demo preset (``configs/demo.yaml``), as a user runs them:

1. the demo data in the dataset's download layout (``tools/make_demo_data.py``) with many unlabelled
   volumes, and its datalist (the bundle's prepare tool);
2. MAE pre-training once, label-free, on every image outside the evaluation cases: the training and
   validation cases and the unlabelled test volumes (``--pretrain_epochs``);
3. for every seed: ``finetune`` with ``--init_mode scratch`` and with ``--init_mode mae`` on the first
   ``--labelled`` training cases only (``--finetune_epochs``, last checkpoint kept: no validation-based
   selection), then ``evaluate`` on the evaluation cases. A seed fixes the decoder initialisation, the
   crops and the data order, the same for both initialisations: the pairs differ only in the encoder;
4. ``<workdir>/<bundle>/results.md``: per-seed Dice, mean and sample standard deviation per initialisation,
   the paired difference MAE - scratch with a paired t-test and a Wilcoxon signed-rank test.

Runs already evaluated with the same commands are not repeated. ``--override`` passes config ids to
every stage (``finetune:key=value`` to one).
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
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selfmedmae_components import registry  # noqa: E402

# per bundle: the demo generator's flags for many unlabelled volumes, and the Dice groups of the evaluation
# summary (the first is reported); the generator, its dataset folder and the prepare tool come from the registry
BUNDLES = {
    "btcv_seg": dict(make=["--num_test_cases=20"], groups=("8 organs (paper)", "13 organs")),
    "brats_seg": dict(make=["--num_cases=30", "--num_test_cases=20"], groups=("mean (WT, TC, ET)",)),
}


def prepare_data(bundle: str, data_root: Path, labelled: int) -> tuple[Path, Path, Path]:
    """Demo data + datalist through the user-facing tools; returns (dataset_dir, MAE datalist, few-labels datalist)."""
    entry = registry.get(bundle)
    data = data_root / entry.demo_run.dataset
    if not (data / "datalist.json").is_file():
        make = BUNDLES[entry.bundle]["make"]
        subprocess.run(
            [sys.executable, "tools/make_demo_data.py", entry.name, str(data_root), *make], cwd=REPO, check=True
        )
        subprocess.run([sys.executable, "tools/prepare.py", entry.name, str(data)], cwd=REPO, check=True)
    datalist = json.loads((data / "datalist.json").read_text())
    if labelled > len(datalist["training"]):
        raise SystemExit(f"--labelled {labelled}: the datalist has {len(datalist['training'])} training cases")
    images = [{"image": c["image"]} for c in datalist["training"] + datalist["validation"] + datalist.get("test", [])]
    mae = dict(datalist, training=images, validation=[])  # labels left out: MAE never sees them
    few = dict(
        datalist, training=datalist["training"][:labelled], validation=[]
    )  # validation_mode none trains on both lists
    paths = data / "datalist_mae_all_unlabelled.json", data / f"datalist_{labelled}_labelled.json"
    for path, content in zip(paths, (mae, few)):
        path.write_text(json.dumps(content, indent=1))
    return data, *paths


def mean_sd(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def paired_tests(mae: list[float], scratch: list[float]) -> str:
    """Two-sided paired t-test and Wilcoxon signed-rank test of MAE - scratch."""
    t = stats.ttest_rel(mae, scratch)
    w = stats.wilcoxon(mae, scratch)
    return f"paired t = {t.statistic:.2f}, p = {t.pvalue:.3f}; Wilcoxon p = {w.pvalue:.3f}"


def experiment(bundle: str, workdir: str, labelled: int, seeds: list[int], pretrain_epochs: int, finetune_epochs: int,
               presets: list[str], overrides: list[str], command: str) -> Path:  # fmt: skip
    work = Path(workdir).resolve() / bundle
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data, mae_list, few_list = prepare_data(bundle, Path(workdir).resolve() / "data" / bundle, labelled)
    per_stage = sweep.parse_overrides(overrides)

    # MAE pre-training: once, on every image outside the evaluation cases (no labels used)
    mae_root = work / "pretrain"
    settings = {"dataset_dir": data, "datalist_file": mae_list, "max_epochs": pretrain_epochs, **per_stage["pretrain"]}
    cmd = sweep.bundle_command(bundle, "pretrain", presets, {"bundle_root": mae_root, **settings})
    checkpoint = mae_root / "models" / "mae_pretrain.pt"
    plan = mae_root / "commands.json"
    if not (checkpoint.is_file() and plan.is_file() and plan.read_text() == json.dumps(cmd[1:])):
        mae_root.mkdir(parents=True, exist_ok=True)
        checkpoint.unlink(missing_ok=True)
        print(f"{bundle}: MAE pre-training ...", end=" ", flush=True)
        (mae_root / "seconds.txt").write_text(f"{sweep.run_logged(cmd, mae_root / 'pretrain.log'):.0f}")
        plan.write_text(json.dumps(cmd[1:]))
        print(f"{(mae_root / 'seconds.txt').read_text()} s", flush=True)
    loss = (mae_root / "logs/pretrain/loss.csv").read_text().splitlines()[1:]
    mae_loss = (float(loss[0].split(",")[2]), float(loss[-1].split(",")[2]))
    num_mae_images = len(json.loads(mae_list.read_text())["training"])

    results: dict[str, dict[int, dict]] = {"scratch": {}, "mae": {}}
    for seed in seeds:
        for init in ("scratch", "mae"):
            stage_settings = {
                "finetune": {"dataset_dir": data, "datalist_file": few_list, "seed": seed, "init_mode": init,
                             "pretrained_checkpoint": checkpoint, "max_epochs": finetune_epochs,
                             "validation_mode": "none", **per_stage["finetune"]},
                "evaluate": {"dataset_dir": data, "datalist_file": few_list, **per_stage["evaluate"]},
            }  # fmt: skip
            results[init][seed] = sweep.run_pipeline(work / f"{init}_seed{seed}", bundle, presets, stage_settings,
                                                     label=f"{bundle} seed {seed}, {init}")  # fmt: skip

    groups = BUNDLES[bundle]["groups"]
    dice = {i: {g: [runs[s]["groups"][g]["dice"] for s in seeds] for g in groups} for i, runs in results.items()}
    num_eval = results["mae"][seeds[0]]["num_cases"]
    lines = [
        f"Demo experiment, {bundle} (demo preset): MAE pre-trained {pretrain_epochs} epochs on {num_mae_images} unlabelled "
        f"images (loss {mae_loss[0]:.3f} -> {mae_loss[1]:.3f}, {(mae_root / 'seconds.txt').read_text()} s); fine-tuned "
        f"{finetune_epochs} epochs on {labelled} labelled cases, last checkpoint; evaluated on {num_eval} cases; "
        f"seeds {', '.join(map(str, seeds))}. Dice in %.",
        f"Overrides: {' '.join(overrides) or '-'}. Wall time of this call {time.time() - start:.0f} s (stages reused from an earlier call not counted).",
        "",
        "| initialisation | " + " | ".join(f"Dice {g} mean ± sd" for g in groups) + f" | per seed ({groups[0]}) |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for init, name in (("scratch", "scratch (random init)"), ("mae", "MAE self pre-training")):
        lines.append(f"| {name} | " + " | ".join(mean_sd(dice[init][g]) for g in groups) + " | "
                     + ", ".join(f"{100 * d:.2f}" for d in dice[init][groups[0]]) + " |")  # fmt: skip
    diffs = {g: [m - s for m, s in zip(dice["mae"][g], dice["scratch"][g])] for g in groups}
    lines.append("| MAE - scratch (paired by seed) | " + " | ".join(mean_sd(diffs[g]) for g in groups) + " | "
                 + ", ".join(f"{100 * d:+.2f}" for d in diffs[groups[0]]) + " |")  # fmt: skip
    lines += ["", *(f"- {g}: {paired_tests(dice['mae'][g], dice['scratch'][g])}" for g in groups)]
    lines += ["", f"Command: `{command}`", ""]
    out = work / "results.md"
    out.write_text("\n".join(lines))
    print("\n" + out.read_text())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", choices=sorted(BUNDLES), default="btcv_seg")
    p.add_argument("--workdir", default="demo_experiment")
    p.add_argument("--labelled", type=int, default=2, help="labelled training cases used for fine-tuning")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated fine-tuning seeds (at least 2)")
    p.add_argument("--pretrain_epochs", type=int, default=300)
    p.add_argument("--finetune_epochs", type=int, default=80)
    p.add_argument("--preset", action="append", default=None, help="configs layered on every stage (default: demo)")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="[STAGE:]KEY=VALUE")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if len(seeds) < 2:
        p.error("--seeds: at least two seeds are needed for a spread and a paired test")
    command = "python tools/demo_experiment.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    experiment(a.bundle, a.workdir, a.labelled, seeds, a.pretrain_epochs, a.finetune_epochs, a.preset or ["demo"],
               a.override, command)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
