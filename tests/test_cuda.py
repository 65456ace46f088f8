"""CUDA-only checks (skipped without a GPU; tools/gpu_check.sh runs them with the host-sync test of
test_fast_path.py). Every test here has "cuda" in its name, which is how gpu_check.sh selects them.

They check on a real GPU what the CPU tests can only mock: the backend settings of a bundle run, the fp16
grad scaler across a resume, HD95 of GPU tensors computed on the host, bf16 sliding-window inference,
and the benchmark's CUDA timing and memory figures.
"""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from bundle_runner import REPO
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from selfmedmae_components.engines import AutocastInferer, TrainingStep, setup_run
from selfmedmae_components.metrics import HAS_CUCIM, HausdorffDistanceMMMetric
from selfmedmae_components.networks import UNETR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_cuda_run_setup_autotunes_and_uses_tf32():
    setup_run(0, CUDA)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    setup_run(0, CUDA, deterministic=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    setup_run(0, CUDA)


def test_cuda_fp16_scaler_state_survives_a_resume():
    net = torch.nn.Linear(8, 2).to(CUDA)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    engine = SimpleNamespace(
        state=SimpleNamespace(device=CUDA),
        non_blocking=True,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.functional.mse_loss,
    )
    batch = {"image": torch.randn(4, 8), "label": torch.randn(4, 2)}
    first = TrainingStep(amp=True, amp_dtype="float16")
    first(engine, batch)
    first.scaler.update(256.0)
    resumed = TrainingStep(amp=True, amp_dtype="float16")
    resumed.load_state_dict(first.state_dict())  # as the checkpoint loader does, before the first step
    resumed(engine, batch)
    assert resumed.scaler.get_scale() == 256.0


def test_cuda_hd95_is_computed_on_the_host_and_agrees():
    pred = torch.zeros(1, 2, 24, 24, 24)
    label = torch.zeros(1, 2, 24, 24, 24)
    pred[:, 1, 4:14, 4:14, 4:14], label[:, 1, 5:16, 5:15, 4:14] = 1, 1
    pred[:, 0], label[:, 0] = 1 - pred[:, 1], 1 - label[:, 1]
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0]))
    metric = HausdorffDistanceMMMetric(include_background=False, percentile=95)
    seen = []
    compute = metric._compute_tensor
    metric._compute_tensor = lambda p, t, **k: (seen.append(p.device.type), compute(p, t, **k))[1]
    on_gpu = metric._compute_list(
        [MetaTensor(pred[0], affine=affine).to(CUDA)], [MetaTensor(label[0], affine=affine).to(CUDA)]
    )
    on_cpu = metric._compute_list([MetaTensor(pred[0], affine=affine)], [MetaTensor(label[0], affine=affine)])
    assert seen[0] == ("cuda" if HAS_CUCIM else "cpu")
    torch.testing.assert_close(on_gpu.cpu(), on_cpu.cpu())


def test_cuda_bf16_sliding_window_agrees_with_float32():
    torch.manual_seed(0)
    net = UNETR(1, 3, 32, hidden_size=96, num_layers=4, num_heads=4, skip_hidden_states=(0, 1, 2)).to(CUDA).eval()
    x = torch.rand(1, 1, 64, 64, 48, device=CUDA)
    sw = SlidingWindowInferer(roi_size=32, sw_batch_size=8, overlap=0.5)
    with torch.inference_mode():
        ref = sw(x, net)
        out = AutocastInferer(sw, amp=True)(x, net)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.99


def test_cuda_benchmark_reports_step_and_total_memory(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(
        preset="btcv",
        parts="mae,finetune",
        device="cuda",
        roi_size=32,
        hidden_size=96,
        num_layers=2,
        num_heads=4,
        decoder_hidden_size=96,
        decoder_num_layers=1,
        decoder_num_heads=4,
        feature_size=8,
        mask_ratios=0.75,
        repeats=2,
        warmup=1,
        batch=2,
        out=str(tmp_path / "b.json"),
    )
    results = json.loads((tmp_path / "b.json").read_text())
    assert results["env"]["float32_matmul"] == "tf32" and results["env"]["cudnn_benchmark"]
    for row in results["mae"] + results["finetune"]:
        if row["error"]:
            continue
        # the step's own peak sits below the absolute one, which includes the models and optimiser state
        assert 0 < row["peak_mem_mib"] < row["peak_mem_total_mib"], row["name"]
        assert 0 < row["optimizer_median_s"] < row["median_s"], row["name"]
