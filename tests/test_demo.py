"""The README's demo command, end to end (marker ``slow``: about 12 minutes on 2 quiet CPU cores in float32).

    python -m pytest -m slow tests/test_demo.py

Runs ``tools/demo.py`` (all bundles, the documented epochs) into a temporary folder and checks that
each fine-tuned model learned: Dice / AUC on the demo evaluation cases well above an untrained
network's (btcv: 8-organ Dice 1.7 % untrained, 25.7 % measured; brats: 89.6 % measured; cxr14: AUC
0.5 = chance, 0.75 measured with 40 fine-tuning epochs), and that every MAE loss fell.
"""

import json
import subprocess
import sys

import pytest
from bundle_runner import REPO, read_losses

pytestmark = pytest.mark.slow

# lower bounds, with room for the arithmetic differences between CPUs and thread counts
MIN_SCORE = {"btcv_seg": ("8 organs (paper)", 0.15), "brats_seg": ("mean (WT, TC, ET)", 0.5), "cxr14_cls": (None, 0.62)}


def test_readme_demo_learns_on_every_bundle(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/demo.py", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "demo finished" in proc.stdout
    for bundle, (group, minimum) in MIN_SCORE.items():
        out = tmp_path / bundle
        losses = read_losses(out / "logs" / "pretrain" / "loss.csv")
        assert losses[-1] < losses[0], (bundle, losses)
        summary = json.loads((out / "eval" / "summary.json").read_text())
        score = summary["mean_auc"] if group is None else summary["groups"][group]["dice"]
        assert score > minimum, (bundle, summary)
        assert (out / "logs" / "pretrain" / "reconstruction_latest.png").is_file()
        assert any((out / "predictions").iterdir())
