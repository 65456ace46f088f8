"""The paper's ablation grid (mask ratio x pre-training epochs, Tables 3/4) through a bundle's own configs.

    python tools/sweep.py --bundle btcv_seg --mask_ratios 0.125,0.25,0.5,0.75,0.875 --pretrain_epochs 10000 \\
        --dataset_dir /data/btcv --out sweeps/btcv

For every cell it runs, as a user would, ``python -m monai.bundle run pretrain`` (with ``--mask_ratio``
and ``--max_epochs`` of the cell), ``finetune`` (from that MAE checkpoint) and ``evaluate``, each cell
in its own ``bundle_root`` (``<out>/cells/mask<r>_ep<e>``, with a ``sweep.log``). Then it collects every
``eval/summary.json`` into ``<out>/results.csv`` and ``<out>/results.md`` and draws
``<out>/results.png`` (the metric against mask ratio, one line per epoch budget).

``--preset demo`` layers the bundle's ``configs/demo.yaml`` on every stage; ``--override key=value``
goes to every stage, ``--override finetune:max_epochs=30`` to one (pretrain, finetune or evaluate).
A cell whose evaluation exists with the same commands is not run again, so an interrupted sweep
continues where it stopped. Cells run one after the other.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "finetune", "evaluate")


# ------------------------------------------------------------------------------------ running
def config_file(bundle: str, stage: str, presets: list[str]) -> str:
    files = [REPO / "bundles" / bundle / "configs" / f"{n}.yaml" for n in [stage, *presets]]
    for f in files:
        if not f.is_file():
            raise SystemExit(f"config not found: {f}")
    return str(files[0]) if len(files) == 1 else "[" + ",".join(repr(str(f)) for f in files) + "]"


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """``["k=v", "finetune:k=v"]`` -> {stage: {k: v}} (values stay strings: the bundle CLI parses them)."""
    out: dict[str, dict[str, str]] = {s: {} for s in STAGES}
    for item in items:
        target, sep, value = item.partition("=")
        stage, colon, key = target.rpartition(":")
        if not sep or not key or (colon and stage not in STAGES):
            raise SystemExit(f"--override expects key=value or <{'|'.join(STAGES)}>:key=value, got {item!r}")
        for s in [stage] if colon else STAGES:
            out[s][key] = value
    return out


def bundle_command(bundle: str, stage: str, presets: list[str], settings: dict[str, object]) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", stage, "--config_file", config_file(bundle, stage, presets)]
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_logged(cmd: list[str], log: Path) -> float:
    """Run one bundle command, appending its output to ``log``; exits with the log's tail on failure."""
    start = time.time()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(
            f"failed ({proc.returncode}) after {seconds:.0f} s: {shlex.join(cmd)}\n--- {log} (tail)\n{tail}"
        )
    return seconds


def run_pipeline(root: Path, bundle: str, presets: list[str], stage_settings: dict[str, dict], label: str = "") -> dict:
    """pretrain (if given) -> finetune -> evaluate in ``root``; returns the evaluation summary plus stage times.

    ``stage_settings`` maps stage -> CLI settings (without bundle_root); a stage absent from it is skipped.
    Skips the run when ``root`` holds an evaluation made by the same commands.
    """
    root.mkdir(parents=True, exist_ok=True)
    commands = {
        s: bundle_command(bundle, s, presets, {"bundle_root": root, **stage_settings[s]})
        for s in STAGES
        if s in stage_settings
    }
    plan_file, summary_file = root / "commands.json", root / "eval" / "summary.json"
    planned = json.dumps({s: c[1:] for s, c in commands.items()}, indent=1)
    if summary_file.is_file() and plan_file.is_file() and plan_file.read_text() == planned:
        print(f"{label}: already evaluated in {root}, not run again", flush=True)
        return json.loads(summary_file.read_text()) | json.loads((root / "times.json").read_text())
    summary_file.unlink(missing_ok=True)
    plan_file.write_text(planned)
    log = root / "sweep.log"
    log.write_text("")
    times = {}
    for stage, cmd in commands.items():
        print(f"{label}: {stage} ...", end=" ", flush=True)
        times[f"{stage}_s"] = round(run_logged(cmd, log), 1)
        print(f"{times[f'{stage}_s']:.0f} s", flush=True)
    (root / "times.json").write_text(json.dumps(times))
    return json.loads(summary_file.read_text()) | times


# ----------------------------------------------------------------------------------- results
def metrics_of(summary: dict) -> dict[str, float]:
    """Flat metrics of an evaluation summary: ``dice:<group>``, ``hd95:<group>`` (segmentation) or ``mean_auc``."""
    out = {}
    for group, values in summary.get("groups", {}).items():
        for m in ("dice", "hd95"):
            if m in values:
                out[f"{m}:{group}"] = values[m]
    if "mean_auc" in summary:
        out["mean_auc"] = summary["mean_auc"]
    return out


def default_metric(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.startswith("dice:") or k == "mean_auc"]
    if not keys:
        raise SystemExit(f"no Dice or AUC in the evaluation summaries: {list(rows[0])}")
    return keys[0]


def fmt(key: str, value) -> str:
    """Dice / AUC as %, other floats with 2 decimals (mask ratios and epochs as given)."""
    if key in ("mask_ratio", "pretrain_epochs") or not isinstance(value, float) or not math.isfinite(value):
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)
    return f"{100 * value:.2f}" if key.startswith("dice:") or key == "mean_auc" else f"{value:.2f}"


def write_tables(rows: list[dict], out: Path, title: str) -> None:
    keys = list(rows[0])
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"### {title}", "", "Dice and AUC in %, HD95 in mm; times in seconds.", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step - 1e-9)) + 1)]


def plot(rows: list[dict], metric: str, path: Path, title: str) -> None:
    """Metric (in %) against mask ratio, one line per pre-training epoch budget, drawn with PIL."""
    W, H, left, right, top, bottom = 640, 440, 70, 150, 60, 55
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    ratios = sorted({r["mask_ratio"] for r in rows})
    values = [100 * r[metric] for r in rows if isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
    if not values:
        raise SystemExit(f"no finite values of {metric} to plot")
    x0, x1 = (ratios[0] - 0.5, ratios[0] + 0.5) if len(ratios) == 1 else (ratios[0], ratios[-1])
    pad = 0.06 * (x1 - x0)
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(values), max(values)
    span = max(y1 - y0, 0.1)
    ticks = nice_ticks(y0 - 0.1 * span, y1 + 0.1 * span)
    y0, y1 = ticks[0], ticks[-1]
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0])))
    X = lambda v: left + (v - x0) / (x1 - x0) * (W - left - right)
    Y = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)
    for v in ticks:
        d.line([left, Y(v), W - right, Y(v)], fill=(225, 225, 225))
        d.line([left - 4, Y(v), left, Y(v)], fill="black")
        d.text((left - 8, Y(v)), f"{v:.{decimals}f}", fill="black", font=small, anchor="rm")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for r in ratios:
        d.line([X(r), H - bottom, X(r), H - bottom + 4], fill="black")
        d.text((X(r), H - bottom + 7), f"{r:g}", fill="black", font=small, anchor="ma")
    d.text(((left + W - right) / 2, H - 20), "mask ratio", fill="black", font=font, anchor="ma")
    ylabel = ("Dice, " + metric.split(":", 1)[1] if metric.startswith("dice:") else metric) + " (%)"
    d.text((W / 2, 8), title, fill="black", font=font, anchor="ma")
    d.text((8, top - 20), ylabel, fill="black", font=small)
    budgets = sorted({r["pretrain_epochs"] for r in rows})
    for i, epochs in enumerate(budgets):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(
            (r["mask_ratio"], 100 * r[metric])
            for r in rows
            if r["pretrain_epochs"] == epochs and math.isfinite(r[metric])
        )
        draw_series(
            d, [(X(a), Y(b)) for a, b in pts], colour, f"{epochs} epochs", i, (W - right, top), small, legend_dot=True
        )
    img.save(path)


def draw_series(
    d, xy: list, colour: tuple, label: str, row: int, corner: tuple, font, legend_dot: bool = False
) -> None:
    """One series of a plot: a line through the points ``xy`` with a dot at each, and its legend entry in row ``row``
    right of the plot area, whose top right corner is ``corner`` (a line, a dot if ``legend_dot``, the label)."""
    if len(xy) > 1:
        d.line(xy, fill=colour, width=2)
    for x, y in xy:
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    x0, ly = corner[0], corner[1] + 10 + 22 * row
    d.line([x0 + 12, ly, x0 + 36, ly], fill=colour, width=2)
    if legend_dot:
        d.ellipse([x0 + 20, ly - 4, x0 + 28, ly + 4], fill=colour)
    d.text((x0 + 42, ly), label, fill="black", font=font, anchor="lm")


# --------------------------------------------------------------------------------------- main
def sweep(
    bundle: str,
    mask_ratios: list[float],
    pretrain_epochs: list[int],
    dataset_dir: str,
    out: str,
    presets: list[str] | None = None,
    overrides: list[str] | None = None,
    metric: str | None = None,
) -> list[dict]:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    per_stage = parse_overrides(overrides or [])
    rows = []
    start = time.time()
    for epochs in pretrain_epochs:
        for ratio in mask_ratios:
            root = out_dir / "cells" / f"mask{ratio:g}_ep{epochs}"
            settings = {
                "pretrain": {
                    "dataset_dir": dataset_dir,
                    **per_stage["pretrain"],
                    "mask_ratio": ratio,
                    "max_epochs": epochs,
                },
                "finetune": {"dataset_dir": dataset_dir, "init_mode": "mae", **per_stage["finetune"]},
                "evaluate": {"dataset_dir": dataset_dir, **per_stage["evaluate"]},
            }
            summary = run_pipeline(root, bundle, presets or [], settings, label=f"mask {ratio:g}, {epochs} epochs")
            times = {k: summary[k] for k in ("pretrain_s", "finetune_s", "evaluate_s")}
            rows.append(
                {"bundle": bundle, "mask_ratio": ratio, "pretrain_epochs": epochs, **metrics_of(summary), **times}
            )
    metric = metric or default_metric(rows)
    if metric not in rows[0]:
        raise SystemExit(f"--metric {metric!r} not among {[k for k in rows[0] if ':' in k or k == 'mean_auc']}")
    title = f"{bundle}: mask ratio x pre-training epochs"
    write_tables(rows, out_dir, title)
    plot(rows, metric, out_dir / "results.png", title)
    print((out_dir / "results.md").read_text())
    print(f"{len(rows)} cells in {time.time() - start:.0f} s: {out_dir / 'results.csv'}, results.md, results.png")
    return rows


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", default="btcv_seg")
    p.add_argument("--mask_ratios", type=floats, default=floats("0.125,0.75"), help="comma-separated")
    p.add_argument(
        "--pretrain_epochs", type=lambda t: [int(x) for x in floats(t)], default=[500], help="comma-separated"
    )
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--out", required=True, help="output folder (cells/, results.csv, results.md, results.png)")
    p.add_argument("--preset", action="append", default=[], help="extra config layered on every stage (e.g. demo)")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="[STAGE:]KEY=VALUE")
    p.add_argument("--metric", default=None, help="column to plot (default: the first Dice group, or mean_auc)")
    a = p.parse_args(argv)
    sweep(a.bundle, a.mask_ratios, a.pretrain_epochs, a.dataset_dir, a.out, a.preset, a.override, a.metric)


if __name__ == "__main__":
    sys.exit(main())
