"""Does self pre-training pay on your data? A label-efficiency study: the metric against the number of labelled
cases, fine-tuned from each initialisation over paired seeds, with paired tests and a curve.

    python tools/label_efficiency.py --bundle btcv_seg --dataset_dir /data/btcv --labelled 1,2,4,8 --seeds 0,1,2 \\
        --inits scratch,mae --workdir studies/btcv
    python tools/label_efficiency.py --bundle btcv_seg  --preset demo --labelled 1,2,4,8 --workdir demo_runs/le
    python tools/label_efficiency.py --bundle cxr14_cls --preset demo --labelled 1%,10%,100% --workdir demo_runs/le

Design, everything through the bundles' own configs and ``python -m monai.bundle run`` (tools/sweep.py's runner):

- one MAE pre-training, label-free, on every image outside the evaluation cases (the datalist's lists except
  ``evaluation``), reused by every cell; ``--mae_checkpoint FILE`` takes an existing one instead;
- the labelled pool is the datalist's ``training`` + ``validation`` cases. For each seed the pool is shuffled once
  and a count takes its first n cases: the same subset for every init (paired), nested across counts;
- a cell (count, seed, init) fine-tunes with ``validation_mode none`` (nothing is selected on held-out data; the
  last weights are kept), then ``evaluate`` runs on the datalist's ``evaluation`` cases;
- equal compute: every count gets the same number of optimiser steps (``--finetune_steps``; default the config's
  epochs at the largest count), so 1 case gets as many updates as 8. A step is one batch; an epoch has
  ceil(n / batch_size) of them, so a cell runs ceil(steps / steps per epoch) epochs: at least the steps asked for,
  at most one epoch more (the ``steps`` column of results.csv says how many). Warm-up is the same fraction of
  every cell (``--warmup_fraction``);
- ``--probe``: the encoder frozen (linear probe on the cls token for classification, a trained UNETR decoder on a
  frozen encoder for segmentation), drop path off;
- ``--preset demo`` layers the bundle's configs/demo.yaml; without ``--dataset_dir`` it also writes the demo data
  (with many unlabelled volumes) under ``<workdir>/data`` through tools/make_demo_data.py and tools/prepare.py.

Writes in ``--workdir``: ``results.csv`` (one row per cell), ``results.md`` (per count: mean +- sd per init, the
paired difference to scratch with its 95 % t interval, paired t-test and Wilcoxon p, Holm-corrected across
counts), ``curve.png`` (metric against labelled count, log axis, one line per init with 95 % bands). Each cell's
result is written atomically (``cells/<cell>/result.json``); a killed study run again with the same arguments
runs only the cells it had not finished. Before the first cell it times real steps (a short pre-training and
fine-tuning of a few one-step epochs, and one evaluation) and prints an estimate of the whole study; after each cell
the time left. ``--tracking mlflow`` logs one parent run per study and a child run per cell, the curve as an artifact.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for path in (TOOLS, REPO):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import sweep  # noqa: E402  (tools/sweep.py: the bundle runner and plotting helpers shared by the experiment tools)

from selfmedmae_components import errors, registry  # noqa: E402
from selfmedmae_components.paired_stats import holm, mean_ci, paired_test  # noqa: E402

INITS = ("scratch", "mae", "imagenet")
# config ids the study sets itself, with the option that sets them
OWN_IDS = {
    "bundle_root": "--workdir",
    "dataset_dir": "--dataset_dir",
    "datalist_file": "--datalist",
    "seed": "--seeds",
    "init_mode": "--inits",
    "pretrained_checkpoint": "--mae_checkpoint or --imagenet_checkpoint",
    "validation_mode": "nothing (the study keeps the last weights: none)",
    "max_epochs": "--finetune_steps or --pretrain_epochs",
    "warmup_epochs": "--warmup_fraction",
}
# demo generator flags beyond the registry's: many unlabelled volumes for MAE (the labelled cases stay the demo's)
DEMO_MAKE = {"btcv": ["--num_test_cases=20"], "brats": ["--num_cases=30", "--num_test_cases=20"]}


class StudyError(SystemExit):
    """A bad argument or dataset: one line naming what was expected (exits with status 1, no traceback)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"label_efficiency: {message}")


# ----------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Cell:
    """One fine-tuning + evaluation: ``n`` labelled cases (``spec`` as given: "4" or "10%"), a seed, an init."""

    spec: str
    n: int
    seed: int
    init: str

    @property
    def name(self) -> str:
        return f"n{self.n}_seed{self.seed}_{self.init}"


def parse_labelled(text: str, pool: int, bundle: str, fractions_allowed: bool) -> list[tuple[str, int]]:
    """``"1,2,4,8"`` or ``"1%,10%,100%"`` -> [(spec, n)], n the labelled cases each takes from a pool of ``pool``."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise StudyError("--labelled expects comma-separated counts (1,2,4,8) or percentages (1%,10%,100%)")
    out = []
    for spec in specs:
        if spec.endswith("%"):
            if not fractions_allowed:
                raise StudyError(
                    f"--labelled {spec}: percentages are for 2-D classification (cxr14_cls); give counts "
                    f"of labelled cases for {bundle}, e.g. 1,2,4,8"
                )
            try:
                fraction = float(spec[:-1]) / 100
            except ValueError:
                raise StudyError(f"--labelled {spec}: expected a percentage such as 10%") from None
            if not 0 < fraction <= 1:
                raise StudyError(f"--labelled {spec}: expected a percentage in (0%, 100%]")
            n = max(1, round(fraction * pool))
        else:
            try:
                n = int(spec)
            except ValueError:
                raise StudyError(
                    f"--labelled {spec}: expected a whole number of labelled cases or a percentage"
                ) from None
            if not 1 <= n <= pool:
                raise StudyError(
                    f"--labelled {spec}: expected 1 to {pool}, the labelled cases available "
                    "(training + validation of the datalist)"
                )
        out.append((spec, n))
    if len({n for _, n in out}) < len(out):
        raise StudyError(f"--labelled {text}: two entries give the same number of cases ({[n for _, n in out]})")
    return sorted(out, key=lambda s: s[1])


def subset(pool: list[dict], n: int, seed: int) -> list[dict]:
    """The first ``n`` cases of the pool shuffled by ``seed``: the same for every init, nested across counts."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:n]]


def mae_datalist(datalist: dict) -> dict:
    """The datalist MAE pre-trains on: every image outside the evaluation cases, without its label, as its
    "training" list (every other list emptied, so no config reads an image twice or an evaluation case)."""
    images = [
        {"image": c["image"]}
        for key, cases in datalist.items()
        if key != "evaluation" and isinstance(cases, list)
        for c in cases
        if isinstance(c, dict) and "image" in c
    ]
    return {**{k: ([] if isinstance(v, list) else v) for k, v in datalist.items()}, "training": images}


def write_json_atomic(path: Path, content) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1, default=str))
    os.replace(tmp, path)  # a killed study leaves either the old file or the new one, never half of one


def finished(result_file: Path, plan: dict) -> dict | None:
    """The cell's result if it was finished under the same study settings, else None."""
    if not result_file.is_file():
        return None
    result = json.loads(result_file.read_text())
    return result if result.get("plan") == plan else None


# -------------------------------------------------------------------------------------- the runner
class BundleRunner:
    """Runs the stages through ``python -m monai.bundle run`` (tools/sweep.py), as a user would."""

    def __init__(self, bundle: str, presets: list[str], overrides: dict[str, dict[str, str]], dataset_dir: Path):
        self.bundle, self.presets, self.overrides, self.dataset_dir = bundle, presets, overrides, dataset_dir

    def pretrain(self, root: Path, datalist: Path, epochs: int | None) -> Path:
        """MAE pre-training in ``root`` (skipped when ``root`` holds its checkpoint from the same command)."""
        settings = {
            "bundle_root": root,
            "dataset_dir": self.dataset_dir,
            "datalist_file": datalist,
            **({"max_epochs": epochs} if epochs else {}),
            **self.overrides["pretrain"],
        }
        cmd = sweep.bundle_command(self.bundle, "pretrain", self.presets, settings)
        checkpoint, plan = root / "models" / "mae_pretrain.pt", root / "commands.json"
        if checkpoint.is_file() and plan.is_file() and plan.read_text() == json.dumps(cmd[1:]):
            print(f"MAE pre-training: done in an earlier call ({checkpoint})", flush=True)
            return checkpoint
        root.mkdir(parents=True, exist_ok=True)
        checkpoint.unlink(missing_ok=True)
        print("MAE pre-training ...", end=" ", flush=True)
        seconds = sweep.run_logged(cmd, root / "pretrain.log")
        write_json_atomic(root / "times.json", {"pretrain_s": round(seconds, 1)})
        plan.write_text(json.dumps(cmd[1:]))
        print(f"{seconds:.0f} s", flush=True)
        return checkpoint

    def cell(self, root: Path, finetune: dict, evaluate: dict, label: str) -> dict:
        settings = {
            "finetune": {"dataset_dir": self.dataset_dir, **finetune, **self.overrides["finetune"]},
            "evaluate": {"dataset_dir": self.dataset_dir, **evaluate, **self.overrides["evaluate"]},
        }
        return sweep.run_pipeline(root, self.bundle, self.presets, settings, label=label)

    def timed(self, stage: str, root: Path, settings: dict) -> float:
        root.mkdir(parents=True, exist_ok=True)
        full = {"bundle_root": root, "dataset_dir": self.dataset_dir, **settings, **self.overrides[stage]}
        return sweep.run_logged(sweep.bundle_command(self.bundle, stage, self.presets, full), root / f"{stage}.log")


def config_int(bundle: str, stage: str, presets: list[str], overrides: dict[str, str], key: str) -> int | None:
    """An integer config id as the bundle sees it (``--set`` first, then the presets over the stage config), or
    None where the config derives it from the data (msd_seg's pre-training epochs follow its step budget)."""
    from monai.bundle import ConfigParser

    if key in overrides:
        try:
            return int(overrides[key])
        except ValueError:
            return None
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / f"{n}.yaml") for n in [stage, *presets]])
    value = parser.get(key)
    return value if isinstance(value, int) else None


# ----------------------------------------------------------------------------------------- results
def metric_rows(results: list[tuple[Cell, dict]], bundle: str) -> list[dict]:
    rows = []
    for cell, r in results:
        rows.append(
            {
                "bundle": bundle,
                "labelled": cell.spec,
                "n_labelled": cell.n,
                "seed": cell.seed,
                "init": cell.init,
                "steps": r["steps"],
                "epochs": r["epochs"],
                **sweep.metrics_of(r["summary"]),
                "finetune_s": r["times"].get("finetune_s"),
                "evaluate_s": r["times"].get("evaluate_s"),
            }
        )
    return rows


def pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def pval(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def summary_table(rows: list[dict], metric: str, inits: list[str]) -> list[str]:
    """results.md body: per count mean +- sd per init, and each init against scratch, Holm across counts."""
    counts = sorted({(r["n_labelled"], r["labelled"]) for r in rows})
    value = {(r["n_labelled"], r["seed"], r["init"]): r[metric] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| labelled | n | " + " | ".join(f"{i} mean ± sd" for i in inits) + " |",
        "|---|---|" + "---|" * len(inits),
    ]
    for n, spec in counts:
        cells = []
        for init in inits:
            v = [value[(n, s, init)] for s in seeds]
            sd = statistics.stdev(v) if len(v) > 1 else math.nan
            cells.append(f"{pct(statistics.mean(v))} ± {pct(sd)}")
        lines.append(f"| {spec} | {n} | " + " | ".join(cells) + " |")
    for init in [i for i in inits if i != "scratch"] if "scratch" in inits else []:
        tests = [
            paired_test([value[(n, s, init)] for s in seeds], [value[(n, s, "scratch")] for s in seeds])
            for n, _ in counts
        ]
        holm_t, holm_w = holm([t.p_t for t in tests]), holm([t.p_wilcoxon for t in tests])
        lines += [
            "",
            f"**{init} - scratch**, paired by seed (same labelled cases); p values two-sided, Holm-corrected "
            f"across the {len(counts)} counts (raw p in brackets). With {len(seeds)} pairs the smallest two-sided "
            f"Wilcoxon p is {2 / 2 ** len(seeds):.3g} (all differences of one sign); the t-test assumes normal "
            "differences.",
            "",
            "| labelled | pairs | mean difference [95 % CI] | paired t | t-test p | Wilcoxon p |",
            "|---|---|---|---|---|---|",
        ]
        for (_, spec), t, ht, hw in zip(counts, tests, holm_t, holm_w):
            ci = f"[{100 * t.ci_low:+.2f}, {100 * t.ci_high:+.2f}]" if not math.isnan(t.ci_low) else "[-]"
            tstat = "-" if math.isnan(t.t) else f"{t.t:.2f}"
            lines.append(
                f"| {spec} | {t.n} | {100 * t.mean_diff:+.2f} {ci} | {tstat} | {pval(ht)} ({pval(t.p_t)}) "
                f"| {pval(hw)} ({pval(t.p_wilcoxon)}) |"
            )
    return lines


def metric_label(metric: str) -> str:
    return ("Dice, " + metric.split(":", 1)[1] if metric.startswith("dice:") else metric) + " (%)"


def plot_curve(rows: list[dict], metric: str, inits: list[str], path: Path, title: str) -> None:
    """The metric (in %) against the labelled count on a log axis, one line per init with its 95 % t band (PIL)."""
    W, H, left, right, top, bottom = 680, 440, 70, 130, 50, 60
    img = Image.new("RGBA", (W, H), "white")
    font, small = sweep._font(14), sweep._font(12)
    counts = sorted({(r["n_labelled"], r["labelled"]) for r in rows})
    series = {}
    for init in inits:
        pts = []
        for n, _ in counts:
            v = [r[metric] for r in rows if r["n_labelled"] == n and r["init"] == init and math.isfinite(r[metric])]
            if v:
                m, lo, hi = mean_ci(v)
                # Dice and AUC lie in [0, 1]: a t band of few seeds may cross the bounds, drawn clipped to them
                lo, hi = (m, m) if math.isnan(lo) else (max(lo, 0.0), min(hi, 1.0))
                pts.append((n, 100 * m, 100 * lo, 100 * hi))
        series[init] = pts
    values = [y for pts in series.values() for p in pts for y in p[1:]]
    if not values:
        raise StudyError(f"no finite values of {metric} to plot")
    span = max(max(values) - min(values), 0.5)
    ticks = sweep.nice_ticks(min(values) - 0.05 * span, max(values) + 0.05 * span)
    y0, y1 = ticks[0], ticks[-1]
    lx0, lx1 = math.log(counts[0][0]), math.log(counts[-1][0])
    pad = 0.08 * (lx1 - lx0) if lx1 > lx0 else 0.5
    lx0, lx1 = lx0 - pad, lx1 + pad
    X = lambda n: left + (math.log(n) - lx0) / (lx1 - lx0) * (W - left - right)
    Y = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)
    for i, init in enumerate(inits):  # one translucent layer per band, so overlapping bands blend
        pts = series[init]
        if len(pts) > 1:
            band = Image.new("RGBA", (W, H), (0, 0, 0, 0))
            ImageDraw.Draw(band).polygon(
                [(X(n), Y(hi)) for n, _, _, hi in pts] + [(X(n), Y(lo)) for n, _, lo, _ in reversed(pts)],
                fill=(*sweep.COLOURS[i % len(sweep.COLOURS)], 60),
            )
            img = Image.alpha_composite(img, band)
    d = ImageDraw.Draw(img)
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0])))
    for v in ticks:
        d.line([left, Y(v), W - right, Y(v)], fill=(225, 225, 225))
        d.text((left - 8, Y(v)), f"{v:.{decimals}f}", fill="black", font=small, anchor="rm")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for n, spec in counts:
        d.line([X(n), H - bottom, X(n), H - bottom + 4], fill="black")
        d.text(
            (X(n), H - bottom + 7), spec if spec == str(n) else f"{spec} ({n})", fill="black", font=small, anchor="ma"
        )
    d.text(((left + W - right) / 2, H - 22), "labelled cases (log scale)", fill="black", font=font, anchor="ma")
    d.text((W / 2, 8), title, fill="black", font=font, anchor="ma")
    d.text((8, top - 20), metric_label(metric) + ", mean and 95 % CI over seeds", fill="black", font=small)
    for i, init in enumerate(inits):
        xy = [(X(n), Y(m)) for n, m, _, _ in series[init]]
        sweep.draw_series(d, xy, sweep.COLOURS[i % len(sweep.COLOURS)], init, i, (W - right, top), small)
    img.convert("RGB").save(path)


def write_results(work: Path, rows: list[dict], metric: str, inits: list[str], header: list[str]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = work / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, work / "results.csv")
    md = [*header, "", f"Metric: {metric_label(metric)}; sd over seeds.", "", *summary_table(rows, metric, inits), ""]
    (work / "results.md.tmp").write_text("\n".join(md))
    os.replace(work / "results.md.tmp", work / "results.md")
    plot_curve(rows, metric, inits, work / "curve.png", f"{rows[0]['bundle']}: label efficiency")


# ------------------------------------------------------------------------------------------- tracking
class Tracker:
    """``--tracking mlflow``: a parent run per study (its id kept in the workdir, so a resumed study logs into
    the same run), a child run per cell, the tables and the curve as the parent's artifacts."""

    def __init__(self, work: Path, uri: str | None, experiment: str, params: dict):
        try:
            import mlflow
        except ImportError:
            raise StudyError(
                "--tracking mlflow needs MLflow: pip install -e '.[mlflow]' (the project's mlflow extra)"
            ) from None
        self.mlflow, self.work = mlflow, work
        # MLflow exports its URI and experiment to the environment: put them back at the end, or a later MLflow
        # user in this process and its subprocesses (a bundle's --tracking mlflow) logs into this study's store
        self._environ = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
        mlflow.set_tracking_uri(uri or f"sqlite:///{work / 'mlflow.db'}")
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=(work / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment)
        id_file = work / "mlflow_parent_run.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.parent = mlflow.start_run(run_id=run_id, run_name=None if run_id else f"label efficiency {work.name}")
        if not run_id:
            id_file.write_text(self.parent.info.run_id)
            mlflow.log_params(params)

    def cell(self, cell: Cell, row: dict, cell_dir: Path) -> None:
        marker = cell_dir / "mlflow_run.txt"
        if marker.is_file():  # logged before the study was killed
            return
        with self.mlflow.start_run(run_name=cell.name, nested=True) as run:
            self.mlflow.log_params({k: row[k] for k in ("labelled", "n_labelled", "seed", "init", "steps", "epochs")})
            # MLflow names allow letters, digits and _-. :/ only: "dice:8 organs (paper)" -> "dice:8 organs paper"
            self.mlflow.log_metrics(
                {re.sub(r"[^\w\-. :/]", "", k): v for k, v in row.items() if isinstance(v, float) and math.isfinite(v)}
            )
        marker.write_text(run.info.run_id)

    def finish(self) -> None:
        for name in ("curve.png", "results.md", "results.csv"):
            self.mlflow.log_artifact(str(self.work / name))
        self.close()

    def close(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)
        self.mlflow.set_tracking_uri(self._environ["MLFLOW_TRACKING_URI"])  # None: unset, as before
        for key, value in self._environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------- the study
def prepare_demo(entry, data_root: Path) -> Path:
    """The demo data (with many unlabelled volumes) and its datalist through the user-facing tools."""
    dataset = data_root / entry.demo_run.dataset if entry.demo_run.dataset else data_root
    if not (dataset / "datalist.json").is_file():
        make = [*entry.demo_run.make_args, *DEMO_MAKE.get(entry.name, [])]
        subprocess.run(
            [sys.executable, "tools/make_demo_data.py", entry.name, str(data_root), *make], cwd=REPO, check=True
        )
        subprocess.run(
            [sys.executable, "tools/prepare.py", *entry.demo_run.prepare_command(entry.name, data_root)],
            cwd=REPO,
            check=True,
        )
    return dataset


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


# Ignite's own line at the end of every epoch (the bundles' logging.conf keeps it): the epoch's steps and handlers,
# without the process start-up, caching and the final checkpoint that a wall-clock difference of two runs mixes in
EPOCH_LINE = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")
TIMING_EPOCHS = 4  # one full batch each: the first (warm-up of allocators and kernels) is left out of the step time


def epoch_seconds(log: str) -> list[float]:
    """Seconds of each training epoch, from Ignite's "Epoch[k] Complete. Time taken: h:m:s" lines of a run's log."""
    return [int(h) * 3600 + int(m) * 60 + float(sec) for _, h, m, sec in EPOCH_LINE.findall(log)]


def timed_steps(runner: BundleRunner, stage: str, root: Path, settings: dict) -> tuple[float, float]:
    """(seconds a step, seconds of everything else) of a run of TIMING_EPOCHS epochs of one step each."""
    wall = runner.timed(stage, root, {**settings, "max_epochs": TIMING_EPOCHS, "warmup_epochs": 0})
    epochs = epoch_seconds((root / f"{stage}.log").read_text())[-TIMING_EPOCHS:]
    if len(epochs) < 2:  # no epoch lines (a logging config without Ignite's INFO): the wall time as one step
        return wall / TIMING_EPOCHS, 0.0
    return statistics.mean(epochs[1:]), max(0.0, wall - sum(epochs))


def estimate(
    runner: BundleRunner,
    work: Path,
    pool: list[dict],
    batch: int,
    mae_list: dict,
    pretrain: dict | None,
    datalist: dict,
    finetune_extra: dict,
) -> dict:
    """Time real steps, kept in ``estimate.json``: fine-tuning (and pre-training, if it is to run) for a few epochs
    of one full batch, and one evaluation of the evaluation cases."""
    out_file = work / "estimate.json"
    key = json.loads(json.dumps([runner.presets, runner.overrides, finetune_extra, batch, pretrain], default=str))
    if out_file.is_file() and json.loads(out_file.read_text()).get("key") == key:  # timed with these settings
        return json.loads(out_file.read_text())
    root = work / "timing"
    root.mkdir(parents=True, exist_ok=True)
    ft_list = root / "datalist_timing.json"
    write_json_atomic(ft_list, dict(datalist, training=pool[:batch], validation=[]))
    settings = {"datalist_file": ft_list, "validation_mode": "none", "init_mode": "scratch", **finetune_extra}
    result = dict(
        zip(("finetune_step_s", "finetune_startup_s"), timed_steps(runner, "finetune", root / "finetune", settings))
    )
    result["evaluate_s"] = runner.timed("evaluate", root / "finetune", {"datalist_file": ft_list})
    if pretrain is not None:
        pre_list = root / "datalist_timing_mae.json"
        write_json_atomic(pre_list, dict(mae_list, training=mae_list["training"][: pretrain["batch"]]))
        step, rest = timed_steps(runner, "pretrain", root / "pretrain", {"datalist_file": pre_list})
        result |= {"pretrain_step_s": step, "pretrain_startup_s": rest}
    result["key"] = key
    write_json_atomic(out_file, result)
    return result


def cell_seconds(est: dict, steps: int) -> float:
    return est["finetune_startup_s"] + steps * est["finetune_step_s"] + est["evaluate_s"]


def study(a: argparse.Namespace, command: str, runner_factory=BundleRunner) -> Path:
    try:
        entry = registry.get(a.bundle)
    except ValueError as e:
        raise StudyError(str(e)) from None
    bundle = entry.bundle
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    presets = list(a.preset or [])
    if a.dataset_dir:
        dataset_dir = Path(a.dataset_dir).resolve()
    elif "demo" in presets:
        dataset_dir = prepare_demo(entry, work / "data" / entry.name)
    else:
        raise StudyError(
            "--dataset_dir is required (a prepared dataset folder with datalist.json), unless --preset demo"
        )
    list_file = Path(a.datalist) if a.datalist else dataset_dir / "datalist.json"
    if not list_file.is_file():
        raise StudyError(f"no datalist at {list_file}: expected the datalist tools/prepare.py writes")
    datalist = json.loads(list_file.read_text())
    pool = [c for key in ("training", "validation") for c in datalist.get(key, [])]
    if not datalist.get("evaluation"):
        raise StudyError(
            f"{list_file} has no 'evaluation' cases to evaluate on (expected the list tools/prepare.py writes)"
        )
    counts = parse_labelled(a.labelled, len(pool), bundle, entry.geometry.labels == "multilabel")
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise StudyError(f"--seeds {a.seeds}: expected comma-separated integers such as 0,1,2") from None
    inits = [i.strip() for i in a.inits.split(",") if i.strip()]
    bad = [i for i in inits if i not in INITS]
    if bad or not inits or len(set(inits)) < len(inits):
        raise StudyError(f"--inits {a.inits}: expected distinct names among {', '.join(INITS)}")
    if "imagenet" in inits and not a.imagenet_checkpoint:
        raise StudyError("--inits imagenet needs --imagenet_checkpoint FILE (an ImageNet ViT-B/16 checkpoint)")
    if not seeds or len(set(seeds)) < len(seeds):
        raise StudyError(f"--seeds {a.seeds}: expected distinct integers")
    if a.mae_checkpoint and not Path(a.mae_checkpoint).is_file():
        raise StudyError(f"--mae_checkpoint {a.mae_checkpoint}: file not found")
    if a.tracking == "mlflow" and importlib.util.find_spec("mlflow") is None:  # said now, not after the pre-training
        raise StudyError("--tracking mlflow needs MLflow: pip install -e '.[mlflow]' (the project's mlflow extra)")
    overrides = sweep.parse_overrides(a.set)
    pretrain_own = {"bundle_root", "dataset_dir", "datalist_file", "max_epochs"}
    taken = sorted(
        ({*overrides["finetune"], *overrides["evaluate"]} & set(OWN_IDS)) | (set(overrides["pretrain"]) & pretrain_own)
    )
    if taken:  # the study sets these per cell: a --set would silently break the design (subsets, equal steps, pairing)
        raise StudyError(
            f"--set {', '.join(taken)}: set by the study for each cell; use " + "; ".join(OWN_IDS[k] for k in taken)
        )
    runner = runner_factory(bundle, presets, overrides, dataset_dir)

    from selfmedmae_components.optim import epochs_for_steps  # torch: loaded after the arguments are checked

    # equal compute: the same optimiser steps at every count (an epoch is ceil(n / batch) steps)
    # the demo's epochs are tools/demo.py's (the registry's): btcv's demo.yaml has none
    demo = entry.demo_run if "demo" in presets else None
    batch = config_int(bundle, "finetune", presets, overrides["finetune"], "batch_size")
    if batch is None:
        raise StudyError("the finetune config's batch_size is an expression: give it with --set finetune:batch_size=N")
    per_epoch = {n: math.ceil(n / batch) for _, n in counts}
    ft_epochs = demo.finetune_epochs if demo else config_int(bundle, "finetune", presets, {}, "max_epochs")
    steps = a.finetune_steps or (ft_epochs or 0) * per_epoch[counts[-1][1]]
    if steps < 1:
        raise StudyError("--finetune_steps: expected a positive number of optimiser steps")
    epochs = {n: epochs_for_steps(steps, per_epoch[n]) for n in per_epoch}
    cells = [Cell(spec, n, seed, init) for spec, n in counts for seed in seeds for init in inits]
    probe = {"network": "$selfmedmae_components.probe.freeze_encoder(@model)", "drop_path_rate": 0.0} if a.probe else {}
    pretrain_epochs = a.pretrain_epochs or (demo.pretrain_epochs if demo else None)

    lists = work / "datalists"
    lists.mkdir(exist_ok=True)
    mae_list = mae_datalist(datalist)
    write_json_atomic(lists / "mae_unlabelled.json", mae_list)
    print(
        f"{bundle}: {len(pool)} labelled cases in the pool, {len(datalist['evaluation'])} evaluation cases, "
        f"{len(mae_list['training'])} images for MAE; {len(cells)} cells ({len(counts)} counts x {len(seeds)} seeds "
        f"x {len(inits)} inits), {steps} fine-tuning steps each (batch {batch}: "
        + ", ".join(f"{n} cases {epochs[n]} epochs = {epochs[n] * per_epoch[n]} steps" for n in epochs)
        + ")",
        flush=True,
    )

    # what a finished cell's result depends on beyond its own (count, seed, init): a workdir reused with other settings
    # runs its cells again instead of mixing results
    plan = json.loads(
        json.dumps(
            {
                "bundle": bundle,
                "presets": presets,
                "set": a.set,
                "dataset_dir": dataset_dir,
                "datalist": list_file.resolve(),
                "steps": steps,
                "warmup_fraction": a.warmup_fraction,
                "probe": a.probe,
                "mae": a.mae_checkpoint or pretrain_epochs,
                "imagenet": a.imagenet_checkpoint,
            },
            default=str,
        )
    )
    done = {c.name for c in cells if finished(work / "cells" / c.name / "result.json", plan)}
    if (a.estimate_only or not a.no_estimate) and len(done) < len(cells):
        pre = None
        if "mae" in inits and not a.mae_checkpoint and not (work / "pretrain" / "models" / "mae_pretrain.pt").is_file():
            pre_batch = config_int(bundle, "pretrain", presets, overrides["pretrain"], "batch_size") or batch
            pre_epochs = pretrain_epochs or config_int(bundle, "pretrain", presets, overrides["pretrain"], "max_epochs")
            pre = {"batch": pre_batch, "steps": (pre_epochs or 0) * math.ceil(len(mae_list["training"]) / pre_batch)}
        print("Timing real steps for the estimate (short bundle runs in <workdir>/timing) ...", flush=True)
        est = estimate(runner, work, pool, batch, mae_list, pre, datalist, probe)
        total = sum(cell_seconds(est, epochs[c.n] * per_epoch[c.n]) for c in cells if c.name not in done)
        if pre is not None:
            total += est["pretrain_startup_s"] + pre["steps"] * est["pretrain_step_s"]
        print(
            f"Estimate: {fmt_time(total)} for what is left ({len(cells) - len(done)} cells"
            + (
                f", MAE pre-training of {pre['steps']} steps"
                if pre and pre["steps"]
                else ", MAE pre-training not counted: its length is derived from the data"
                if pre
                else ""
            )
            + f"): a fine-tuning step {est['finetune_step_s']:.2f} s, start-up {est['finetune_startup_s']:.0f} s, "
            f"evaluation {est['evaluate_s']:.0f} s"
            + (f", an MAE step {est['pretrain_step_s']:.2f} s" if pre else "")
            + f" (measured on full batches: {work / 'estimate.json'})",
            flush=True,
        )

    if a.estimate_only:
        return work
    if "mae" in inits:
        checkpoint = (
            Path(a.mae_checkpoint).resolve()
            if a.mae_checkpoint
            else runner.pretrain(work / "pretrain", lists / "mae_unlabelled.json", pretrain_epochs)
        )
    tracker = None
    if a.tracking == "mlflow":
        tracker = Tracker(
            work,
            a.tracking_uri,
            a.experiment_name or f"label_efficiency_{bundle}",
            {
                "bundle": bundle,
                "labelled": a.labelled,
                "seeds": a.seeds,
                "inits": a.inits,
                "steps": steps,
                "probe": a.probe,
                "presets": ",".join(presets),
                "command": command[:480],
            },
        )

    results, start, spent = [], time.time(), []
    try:
        for k, cell in enumerate(cells):
            cell_dir = work / "cells" / cell.name
            result_file = cell_dir / "result.json"
            result = finished(result_file, plan)
            if result:
                results.append((cell, result))
                continue
            if result_file.is_file():  # finished under other settings: the bundle runner must not reuse its evaluation
                result_file.unlink()
                (cell_dir / "eval" / "summary.json").unlink(missing_ok=True)
            few = lists / f"n{cell.n}_seed{cell.seed}.json"
            if not few.is_file():  # nothing is selected on evaluation: it stays in the datalist for `evaluate` only
                write_json_atomic(few, dict(datalist, training=subset(pool, cell.n, cell.seed), validation=[]))
            n_epochs = epochs[cell.n]
            finetune = {
                "datalist_file": few,
                "seed": cell.seed,
                "init_mode": cell.init,
                "max_epochs": n_epochs,
                "warmup_epochs": round(a.warmup_fraction * n_epochs),
                "validation_mode": "none",
                **probe,
            }
            if cell.init == "mae":
                finetune["pretrained_checkpoint"] = checkpoint
            elif cell.init == "imagenet":
                finetune["pretrained_checkpoint"] = Path(a.imagenet_checkpoint).resolve()
            t0 = time.time()
            summary = runner.cell(
                cell_dir, finetune, {"datalist_file": few}, label=f"[{k + 1}/{len(cells)}] {cell.name}"
            )
            cell_dir.mkdir(parents=True, exist_ok=True)
            times = {key: summary[key] for key in ("finetune_s", "evaluate_s") if key in summary}
            result = {
                "cell": cell.__dict__,
                "plan": plan,
                "steps": n_epochs * per_epoch[cell.n],
                "epochs": n_epochs,
                "summary": {k2: v for k2, v in summary.items() if not k2.endswith("_s")},
                "times": times,
            }
            write_json_atomic(result_file, result)
            results.append((cell, result))
            spent.append(time.time() - t0)
            left = [c for c in cells[k + 1 :] if c.name not in done]
            mean = statistics.mean(spent)  # measured cells' time; the estimate's step model before the first
            print(
                f"  {len(cells) - len(left)}/{len(cells)} cells, {fmt_time(time.time() - start)} this call, "
                f"about {fmt_time(mean * len(left))} left",
                flush=True,
            )
            if tracker:
                tracker.cell(cell, metric_rows([(cell, result)], bundle)[0], cell_dir)
    except BaseException:
        if tracker:  # a killed process ends its MLflow run anyway; a call interrupted inside this process must too
            tracker.close(status="KILLED")
        raise

    rows = metric_rows(results, bundle)
    metric = a.metric or sweep.default_metric(rows)
    if metric not in rows[0]:
        raise StudyError(f"--metric {metric!r}: expected one of {[k for k in rows[0] if ':' in k or k == 'mean_auc']}")
    header = [
        f"### Label efficiency, {bundle}" + (" (frozen encoder: probe)" if a.probe else ""),
        "",
        f"{len(seeds)} seeds ({a.seeds}); labelled cases drawn from the {len(pool)} of training + validation, the same "
        f"for every init; {steps} fine-tuning steps at every count (batch {batch}; epochs "
        + ", ".join(f"{n}: {epochs[n]}" for n in epochs)
        + "), last weights, no selection on held-out cases; evaluated "
        f"on the {len(datalist['evaluation'])} evaluation cases. Presets: {', '.join(presets) or '-'}; --set: "
        f"{' '.join(a.set) or '-'}. MAE: "
        + (
            f"{a.mae_checkpoint}"
            if a.mae_checkpoint
            else f"pre-trained once on {len(mae_list['training'])} unlabelled images"
            if "mae" in inits
            else "-"
        )
        + ".",
        "",
        f"Command: `{command}`",
    ]
    write_results(work, rows, metric, inits, header)
    if tracker:
        for cell, result in results:  # cells finished in an earlier call that had not been logged
            tracker.cell(cell, metric_rows([(cell, result)], bundle)[0], work / "cells" / cell.name)
        tracker.finish()
    print("\n" + (work / "results.md").read_text())
    print(f"{work / 'results.csv'}, results.md, curve.png")
    return work


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", required=True, help="btcv_seg, brats_seg, cxr14_cls or msd_seg (or a dataset name)")
    p.add_argument(
        "--dataset_dir", default=None, help="prepared dataset folder (datalist.json); optional with --preset demo"
    )
    p.add_argument("--datalist", default=None, help="another datalist than <dataset_dir>/datalist.json")
    p.add_argument("--labelled", required=True, help="counts 1,2,4,8, or percentages 1%%,10%%,100%% (cxr14_cls)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (subset, decoder init, data order)")
    p.add_argument("--inits", default="scratch,mae", help="scratch, mae, imagenet (with --imagenet_checkpoint)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", action="append", default=None, help="config layered on every stage (e.g. demo)")
    p.add_argument("--pretrain_epochs", type=int, default=None, help="MAE epochs (default: the config's)")
    p.add_argument(
        "--finetune_steps",
        type=int,
        default=None,
        help="optimiser steps of every cell (default: the config's max_epochs at the largest count)",
    )
    p.add_argument("--warmup_fraction", type=float, default=0.1, help="warm-up epochs as a fraction of a cell's epochs")
    p.add_argument("--mae_checkpoint", default=None, help="an existing MAE checkpoint instead of pre-training")
    p.add_argument("--imagenet_checkpoint", default=None, help="ViT-B/16 ImageNet file for --inits imagenet")
    p.add_argument("--probe", action="store_true", help="frozen encoder: linear probe (cxr14) or decoder only (UNETR)")
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="[STAGE:]KEY=VALUE",
        help="config ids for every stage (or finetune:/evaluate:/pretrain: one)",
    )
    p.add_argument(
        "--metric",
        default=None,
        help="results.csv column of the table and curve (default: first Dice group or mean_auc)",
    )
    p.add_argument("--tracking", choices=["mlflow"], default=None)
    p.add_argument("--tracking_uri", default=None, help="default: sqlite:///<workdir>/mlflow.db")
    p.add_argument("--experiment_name", default=None)
    p.add_argument("--no_estimate", action="store_true", help="skip the timed steps before the study")
    p.add_argument("--estimate_only", action="store_true", help="time the steps, print the estimate and stop")
    return p


def main(argv: list[str] | None = None) -> None:
    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    a = build_parser().parse_args(argv)
    command = "python tools/label_efficiency.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    study(a, command)


if __name__ == "__main__":
    sys.exit(main())
