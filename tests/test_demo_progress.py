"""tools/demo.py's console progress (read from each stage's log) and its --amp switch; no timings."""

import importlib.util
import sys

import pytest
from bundle_runner import REPO

spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def stats_line(epoch, epochs, it, its, loss):
    """A line as MONAI's StatsHandler logs it through the bundles' logging.conf."""
    return f"2025-01-01 10:00:00,000 - StatsHandler - INFO - Epoch: {epoch}/{epochs}, Iter: {it}/{its} -- train_loss: {loss:.4f} \n"


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (65, "1m05s"), (3720, "1h02m")])
def test_duration(seconds, text):
    assert demo.duration(seconds) == text


def test_progress_reads_caching_then_epochs_loss_and_eta():
    p = demo.StageProgress("btcv_seg pretrain", start=0.0)
    p.feed(
        "Loading dataset:  40%|####      | 8/20 [00:01<00:02]\rLoading dataset:  45%|####5     | 9/20 [00:01<00:02]\r",
        5.0,
    )
    assert p.status() == "btcv_seg pretrain  caching 9/20  5s"
    p.feed(stats_line(1, 4, 1, 2, 1.0), 100.0)  # 1/8 of the run; no rate yet
    assert p.status() == "btcv_seg pretrain  epoch 1/4  loss 1.0000  ETA --"
    p.feed(stats_line(1, 4, 2, 2, 0.5) + stats_line(2, 4, 1, 2, 0.4), 110.0)  # 2/8 more in 10 s
    assert p.completed == 1
    assert p.status() == "btcv_seg pretrain  epoch 2/4  loss 0.4000  ETA 25s"  # 5/8 left at 40 s per 1
    assert p.status(settled=True) == "btcv_seg pretrain  epoch 1/4  loss 0.7500  ETA 25s"


def test_progress_waits_for_a_line_being_written():
    p = demo.StageProgress("x", start=0.0)
    line = stats_line(1, 1, 1, 1, 0.3512)
    p.feed(line[:-4], 1.0)  # "... train_loss: 0.35", cut mid-number
    assert p.epochs == 0
    p.feed(line[-4:], 2.0)
    assert p.epoch_loss == pytest.approx(0.3512)


def test_non_terminal_reports_every_tenth_of_the_epochs_and_the_last():
    p = demo.StageProgress("x", start=0.0)
    due = []
    for epoch in range(1, 41):
        p.feed(stats_line(epoch, 40, 1, 1, 1.0), float(epoch))
        if p.report_due(due[-1] if due else 0):
            due.append(epoch)
    assert due == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]


def test_run_prints_progress_from_the_stage_log(tmp_path, capsys):
    """A stand-in stage writes StatsHandler lines; captured stdout is no terminal: one line per few epochs."""
    lines = "".join(stats_line(e, 2, i, 2, 1.0 / e) for e in (1, 2) for i in (1, 2))
    log = tmp_path / "demo.log"
    demo._run([sys.executable, "-c", f"print({lines!r}, end='')"], log, label="b pretrain")
    out = capsys.readouterr().out
    assert "  b pretrain  epoch 2/2  loss 0.5000  ETA 0s\n" in out
    assert "Epoch: 2/2, Iter: 2/2" in log.read_text()  # the full log stays in the file


@pytest.mark.parametrize("amp, expected", [(None, None), ("false", "False"), (True, "True")])
def test_amp_reaches_every_bundle_stage(tmp_path, amp, expected):
    for label, cmd, _ in demo.stages("btcv_seg", tmp_path, amp):
        if "monai.bundle" in cmd:
            assert (cmd[cmd.index("--amp") + 1] if "--amp" in cmd else None) == expected, label
        else:
            assert "--amp" not in cmd, label
