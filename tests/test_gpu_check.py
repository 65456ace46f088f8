"""tools/gpu_check.sh, the first GPU run's script, on its CPU path: GPU_CHECK_DRY_RUN=1 runs every step it runs
on a GPU (the CUDA tests, which skip here, and each bundle's benchmark) with a tiny model, and must write the
one JSON with every part in it."""

import json
import os
import subprocess

from bundle_runner import REPO


def test_gpu_check_dry_run_writes_one_json_with_every_step(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["ok"], [
        (s["name"], s["exit_code"], s["log_tail"][-800:]) for s in report["steps"]
    ]
    assert [s["name"] for s in report["steps"]] == ["pytest", "benchmark_btcv", "benchmark_brats", "benchmark_cxr14"]

    # the CUDA tests were collected (and skipped on this CPU), the host-sync test among them
    tests = {t["test"]: t["outcome"] for t in report["tests"]}
    assert "tests.test_fast_path::test_mae_step_has_no_host_sync_cuda" in tests
    assert sum(name.startswith("tests.test_cuda::") for name in tests) >= 5
    assert set(tests.values()) == {"skipped"}

    for preset, parts in (
        ("btcv", {"mae", "finetune", "sliding_window"}),
        ("brats", {"mae", "finetune", "sliding_window"}),
        ("cxr14", {"mae", "finetune"}),
    ):
        bench = report["benchmarks"][preset]
        assert parts <= bench.keys(), preset
        ours = [r for part in parts for r in bench[part] if r["name"].startswith("ours") and not r["error"]]
        assert {r["precision"] for r in ours} >= {"float32"}, preset
        assert all(r["median_s"] > 0 and r["peak_mem_mib"] is not None for r in ours), preset
        assert all(r["mfu"] is not None for r in ours if r in bench["mae"] + bench["finetune"]), preset
