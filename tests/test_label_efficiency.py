"""tools/label_efficiency.py: the study's design (paired, nested subsets; equal steps; nothing of the evaluation cases
in training or MAE), resume after a kill between cells, one-line errors, MLflow runs, the frozen-encoder probe.

The fast tests run the real study loop, datalists, config reading, statistics, tables and curve with a cell runner
that computes a deterministic score from the subset it is given instead of training (the bundle stages are tested
elsewhere); the slow test runs the real bundles on tiny data and kills the process between cells.
"""

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from selfmedmae_components.networks import UNETR, ViTClassifier
from selfmedmae_components.optim import param_groups_layer_decay
from selfmedmae_components.probe import freeze_encoder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import label_efficiency as le  # noqa: E402


def tiny_datalist(folder: Path, pool: int = 10, evaluation: int = 3, test: int = 2) -> Path:
    """A BTCV-like datalist (file names only: the score runner reads no image)."""
    case = lambda i: {"image": f"img/{i:04d}.nii.gz", "label": f"label/{i:04d}.nii.gz"}
    datalist = {
        "name": "tiny",
        "training": [case(i) for i in range(pool - 2)],
        "validation": [case(i) for i in range(pool - 2, pool)],
        "evaluation": [case(100 + i) for i in range(evaluation)],
        "test": [{"image": f"test/{i}.nii.gz"} for i in range(test)],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


class ScoreRunner:
    """Stands in for the bundle stages: a cell's 'Dice' is a hash of its training cases, seed and init, so equal
    inputs give equal tables and any change of subset or pairing shows. Records every call; ``kill_at`` raises
    KeyboardInterrupt (Ctrl-C) when that many cells have finished."""

    calls: list = []
    kill_at: int | None = None

    def __init__(self, bundle, presets, overrides, dataset_dir):
        self.bundle, self.presets, self.overrides = bundle, presets, overrides

    def pretrain(self, root, datalist, epochs):
        ScoreRunner.calls.append(("pretrain", json.loads(Path(datalist).read_text())))
        root.mkdir(parents=True, exist_ok=True)
        (root / "mae.pt").write_text("weights")
        return root / "mae.pt"

    def cell(self, root, finetune, evaluate, label):
        if ScoreRunner.kill_at is not None and sum(c[0] == "cell" for c in ScoreRunner.calls) == ScoreRunner.kill_at:
            raise KeyboardInterrupt
        cases = [c["image"] for c in json.loads(Path(finetune["datalist_file"]).read_text())["training"]]
        digest = hashlib.sha256(json.dumps([cases, finetune["seed"], finetune["init_mode"]]).encode()).digest()
        score = 0.3 + 0.1 * len(cases) / 10 + 0.05 * digest[0] / 255 + (0.02 if finetune["init_mode"] == "mae" else 0)
        ScoreRunner.calls.append(("cell", root.name, dict(finetune), dict(evaluate)))
        return {
            "groups": {"8 organs (paper)": {"dice": score, "hd95": 10.0}},
            "num_cases": 3,
            "finetune_s": 1.0,
            "evaluate_s": 1.0,
        }


def run_study(work: Path, data: Path, *extra: str):
    args = [
        "--bundle",
        "btcv_seg",
        "--dataset_dir",
        str(data),
        "--labelled",
        "1,2,4,8",
        "--seeds",
        "0,1,2",
        "--inits",
        "scratch,mae",
        "--workdir",
        str(work),
        "--preset",
        "demo",
        "--finetune_steps",
        "8",
        "--no_estimate",
        *extra,
    ]
    return le.study(
        le.build_parser().parse_args(args), "python tools/label_efficiency.py (test)", runner_factory=ScoreRunner
    )


@pytest.fixture()
def runner_log():
    ScoreRunner.calls, ScoreRunner.kill_at = [], None
    yield ScoreRunner
    ScoreRunner.calls, ScoreRunner.kill_at = [], None


def test_cells_are_paired_nested_equal_steps_and_never_see_the_evaluation_cases(tmp_path, runner_log):
    data = tiny_datalist(tmp_path / "data")
    work = run_study(tmp_path / "w", data)
    original = json.loads((data / "datalist.json").read_text())
    evaluation = {c["image"] for c in original["evaluation"]}

    (_, mae_list), *cells = runner_log.calls
    assert _ == "pretrain" and len(cells) == 4 * 3 * 2
    images = [c["image"] for c in mae_list["training"]]
    assert len(images) == 10 + 2 and not evaluation & set(images)  # pool and unlabelled test images, no evaluation case
    assert (
        all(set(c) == {"image"} for c in mae_list["training"])
        and not mae_list["validation"]
        and not mae_list["evaluation"]
    )

    subsets = {}
    for _, name, finetune, evaluate in cells:
        lst = json.loads(Path(finetune["datalist_file"]).read_text())
        n, seed, init = int(name.split("_")[0][1:]), finetune["seed"], finetune["init_mode"]
        assert finetune["validation_mode"] == "none" and lst["validation"] == []  # nothing selected on held-out cases
        assert lst["evaluation"] == original["evaluation"] and evaluate["datalist_file"] == finetune["datalist_file"]
        assert len(lst["training"]) == n and not evaluation & {c["image"] for c in lst["training"]}
        subsets.setdefault((n, seed), {})[init] = [c["image"] for c in lst["training"]]
        # equal compute: batch 2 (demo preset), ceil(n / 2) steps an epoch: 8 steps at every count
        assert finetune["max_epochs"] * math.ceil(n / 2) == 8
        assert ("pretrained_checkpoint" in finetune) == (init == "mae")
    for (n, seed), by_init in subsets.items():
        assert by_init["scratch"] == by_init["mae"]  # paired: the same labelled cases for both inits
        if n > 1:
            assert subsets[(n // 2, seed)]["mae"] == by_init["mae"][: n // 2]  # nested across counts
    assert len({tuple(subsets[(4, s)]["mae"]) for s in (0, 1, 2)}) == 3  # seeds draw different subsets

    rows = list(csv.DictReader(open(work / "results.csv")))
    assert len(rows) == 24 and {r["steps"] for r in rows} == {"8"}
    table = (work / "results.md").read_text()
    assert "| 8 | 8 |" in table and "**mae - scratch**" in table and "Holm" in table
    assert Image.open(work / "curve.png").format == "PNG"


def test_a_study_killed_between_cells_resumes_and_ends_with_the_same_table(tmp_path, runner_log):
    data = tiny_datalist(tmp_path / "data")
    reference = run_study(tmp_path / "uninterrupted", data)
    runner_log.calls = []

    runner_log.kill_at = 5
    with pytest.raises(KeyboardInterrupt):
        run_study(tmp_path / "killed", data)
    finished = sorted(p.parent.name for p in (tmp_path / "killed" / "cells").glob("*/result.json"))
    assert len(finished) == 5 and not (tmp_path / "killed" / "results.csv").exists()
    assert not list((tmp_path / "killed").rglob("*.tmp"))  # results are replaced whole, never left half-written
    runner_log.calls, runner_log.kill_at = [], None

    resumed = run_study(tmp_path / "killed", data)
    rerun = [c[1] for c in runner_log.calls if c[0] == "cell"]
    assert len(rerun) == 24 - 5 and not set(rerun) & set(finished)  # only the unfinished cells ran
    for name in ("results.csv", "results.md"):
        assert (resumed / name).read_text() == (reference / name).read_text()

    runner_log.calls = []  # the same workdir with other settings: nothing reused, every cell runs again
    stale = tmp_path / "killed" / "cells" / finished[0] / "eval" / "summary.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # the bundle runner's record of an evaluation, which it would otherwise reuse
    run_study(tmp_path / "killed", data, "--finetune_steps", "4")
    assert not stale.exists()
    assert sum(c[0] == "cell" for c in runner_log.calls) == 24
    assert {r["steps"] for r in csv.DictReader(open(tmp_path / "killed" / "results.csv"))} == {"4"}


def test_bad_input_is_one_line_naming_what_was_expected(tmp_path, runner_log):
    data = tiny_datalist(tmp_path / "data")

    def error(*args):
        with pytest.raises(SystemExit) as e:
            run_study(tmp_path / "w", data, *args)
        message = str(e.value.code)
        assert "\n" not in message and message.startswith("label_efficiency: ")
        return message

    assert "expected 1 to 10, the labelled cases available" in error("--labelled", "1,20")
    assert "percentages are for 2-D classification (cxr14_cls)" in error("--labelled", "10%")
    assert "expected a whole number" in error("--labelled", "two")
    assert "expected comma-separated integers" in error("--seeds", "0,one")
    assert "expected distinct names among scratch, mae, imagenet" in error("--inits", "scratch,moco")
    assert "needs --imagenet_checkpoint" in error("--inits", "scratch,imagenet")
    assert "--datalist" in error("--set", "finetune:datalist_file=x.json")
    with pytest.raises(SystemExit) as e:
        le.study(
            le.build_parser().parse_args(["--bundle", "nope", "--labelled", "1", "--workdir", str(tmp_path / "x")]), ""
        )
    assert "unknown dataset or bundle 'nope'" in str(e.value.code) and "btcv_seg" in str(e.value.code)
    assert runner_log.calls == []  # refused before anything ran
    # as a user sees it: exit status 1, the line on stderr, no traceback
    proc = subprocess.run(
        [
            sys.executable,
            "tools/label_efficiency.py",
            "--bundle",
            "btcv_seg",
            "--dataset_dir",
            str(data),
            "--labelled",
            "4%",
            "--workdir",
            str(tmp_path / "w2"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "percentages" in proc.stderr


def test_percentages_of_the_pool_for_classification():
    assert le.parse_labelled("100%,1%,10%", 900, "cxr14_cls", True) == [("1%", 9), ("10%", 90), ("100%", 900)]
    assert le.parse_labelled("0.1%", 900, "cxr14_cls", True) == [("0.1%", 1)]  # at least one case


def test_mlflow_parent_run_with_a_child_per_cell_and_the_curve(tmp_path, runner_log):
    mlflow = pytest.importorskip("mlflow")
    environ = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    data = tiny_datalist(tmp_path / "data")
    work = tmp_path / "w"
    runner_log.kill_at = 3  # a resumed study logs into the same parent run
    with pytest.raises(KeyboardInterrupt):
        run_study(work, data, "--labelled", "1,2", "--seeds", "0,1", "--tracking", "mlflow")
    runner_log.kill_at = None
    run_study(work, data, "--labelled", "1,2", "--seeds", "0,1", "--tracking", "mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("label_efficiency_btcv_seg").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 8
    assert sorted(r.info.run_name for r in children) == sorted(p.name for p in (work / "cells").iterdir())
    assert all(0 < r.data.metrics["dice:8 organs paper"] < 1 for r in children)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"curve.png", "results.md", "results.csv"}
    # MLflow exports its URI and experiment to the environment; the study puts them back (a later bundle run with
    # --tracking mlflow in this process's children logged into the study's store)
    assert {k: os.environ.get(k) for k in environ} == environ


@pytest.mark.parametrize(
    "make",
    [
        lambda: UNETR(
            1, 3, (16, 16, 16), feature_size=8, hidden_size=48, num_layers=2, num_heads=4, skip_hidden_states=(0, 0, 1)
        ),
        lambda: ViTClassifier(img_size=32, patch_size=16, num_classes=14, hidden_size=48, num_layers=2, num_heads=4),
    ],
)
def test_probe_freezes_the_encoder_only(make):
    model = freeze_encoder(make())
    groups = param_groups_layer_decay(model, lr=1e-3)
    trained = {n for g in groups for n in g["param_names"]}
    assert trained and not any(n.startswith("encoder.") for n in trained)
    assert trained == {n for n, p in model.named_parameters() if not n.startswith("encoder.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups)
    x = torch.randn(1, 1, 16, 16, 16) if isinstance(model, UNETR) else torch.randn(2, 3, 32, 32)
    model(x).float().pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("encoder."))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if not n.startswith("encoder."))


@pytest.mark.slow
def test_real_bundles_killed_between_cells_resume(tmp_path):
    """The real runner on tiny btcv data: killed (SIGTERM) after its first cell, run again, the finished cells kept;
    one more call with --probe trains the decoder on a frozen encoder."""
    from selfmedmae_components.data import btcv
    from selfmedmae_components.data.demo import btcv as btcv_demo

    data = tmp_path / "btcv"
    btcv_demo.make_demo(data, num_test_cases=1, shape=(64, 64, 24))
    btcv.prepare_datalist(data, check_files=False)
    lst = json.loads((data / "datalist.json").read_text())
    lst.update(training=lst["training"][:2], validation=lst["validation"][:1], evaluation=lst["evaluation"][:1])
    (data / "datalist_tiny.json").write_text(json.dumps(lst))
    work = tmp_path / "w"
    cmd = [
        sys.executable,
        "tools/label_efficiency.py",
        "--bundle",
        "btcv_seg",
        "--dataset_dir",
        str(data),
        "--datalist",
        str(data / "datalist_tiny.json"),
        "--labelled",
        "1,2",
        "--seeds",
        "0,1",
        "--workdir",
        str(work),
        "--preset",
        "demo",
        "--finetune_steps",
        "2",
        "--pretrain_epochs",
        "1",
        "--no_estimate",
        "--set",
        "roi_size=[32,32,32]",
        "pixdim=[8.0,8.0,8.0]",
        "hidden_size=48",
        "num_workers=0",
        "batch_size=1",
        "pretrain:decoder_hidden_size=48",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = work / "cells" / "n1_seed0_scratch" / "result.json"
    deadline = time.time() + 600
    while not first.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # the tool and its bundle subprocess, between or inside the next cell
    proc.wait()
    assert first.is_file() and not (work / "results.csv").exists()
    kept = {p: p.stat().st_mtime_ns for p in (work / "cells").glob("*/result.json")}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    rows = list(csv.DictReader(open(work / "results.csv")))
    assert len(rows) == 8 and all(0 <= float(r["dice:8 organs (paper)"]) <= 1 for r in rows)

    probe = tmp_path / "probe"
    mae = work / "pretrain" / "models" / "mae_pretrain.pt"
    cmd_probe = [*cmd[: cmd.index("--workdir") + 1], str(probe), *cmd[cmd.index("--workdir") + 2 :]]
    subprocess.run(
        [*cmd_probe, "--probe", "--mae_checkpoint", str(mae), "--labelled", "1", "--seeds", "0"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    assert "freeze_encoder(@model)" in (probe / "cells" / "n1_seed0_mae" / "sweep.log").read_text()
    pre = torch.load(mae, weights_only=True)["model"]
    tuned = torch.load(probe / "cells" / "n1_seed0_mae" / "models" / "model.pt", weights_only=True)["model"]
    blocks = [k for k in tuned if k.startswith("encoder.blocks.") and k in pre]
    assert blocks and all(torch.equal(pre[k], tuned[k]) for k in blocks)  # fine-tuned, yet the encoder as pre-trained


def test_step_time_is_read_from_ignites_epoch_lines(caplog):
    from ignite.engine import Engine

    engine = Engine(lambda e, batch: time.sleep(0.01))
    with caplog.at_level("INFO"):
        engine.run([0, 1], max_epochs=3)
    seconds = le.epoch_seconds("\n".join(caplog.messages))
    assert len(seconds) == 3 and all(0.02 <= s < 1.0 for s in seconds)  # two 10 ms steps an epoch
