"""Which precision the training steps and inferers choose, with the hardware checks mocked.

bf16 autocast only where the hardware runs it natively: on CPUs that only emulate it (plain AVX-512,
AVX2) it is slower than float32, and on pre-Ampere GPUs float16 with a grad scaler is used instead.
"""

import importlib.util
import json
import logging

import pytest
import torch
from bundle_runner import REPO

from selfmedmae_components import engines
from selfmedmae_components.engines import MAETrainingStep, autocast_dtype, cpu_capability, precision_choice

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def fake_cpu(monkeypatch, *features):
    """Make torch.cpu's probes report exactly ``features`` (keys of engines.CPU_CAPABILITIES)."""
    for name, probe in engines.CPU_CAPABILITIES.items():
        monkeypatch.setattr(torch.cpu, probe, lambda has=name in features: has, raising=False)


@pytest.mark.parametrize(
    "features, found, dtype",
    [
        (("amx", "avx512_bf16", "avx512", "avx2"), "amx", torch.bfloat16),  # Sapphire Rapids
        (("avx512_bf16", "avx512", "avx2"), "avx512_bf16", torch.bfloat16),  # Cooper Lake, Zen 4
        (("avx512", "avx2"), "avx512", None),  # Skylake-SP, Cascade Lake: oneDNN emulates bf16
        (("avx2",), "avx2", None),
        ((), "none", None),
    ],
)
def test_cpu_uses_bf16_only_where_native(monkeypatch, features, found, dtype):
    fake_cpu(monkeypatch, *features)
    # what the old check asked: oneDNN says yes on every AVX-512 CPU, emulated or not
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert cpu_capability() == found
    chosen, reason = precision_choice(CPU, amp=True)
    assert chosen == dtype
    assert ("no native bf16" in reason) == (dtype is None), reason
    assert found in reason


def test_cpu_capability_without_torch_probes(monkeypatch):
    """Another torch version may lack the private probes: float32, not an AttributeError."""
    for probe in engines.CPU_CAPABILITIES.values():
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    assert cpu_capability() == "none"
    assert autocast_dtype(CPU, True) is None


@pytest.mark.parametrize("amp", [False, "false"])  # "--amp false" reaches the config as a string
def test_amp_off_is_float32_even_with_native_bf16(monkeypatch, amp):
    fake_cpu(monkeypatch, "amx")
    assert precision_choice(CPU, amp) == (None, "amp off: float32")


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float16)])
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_cuda_bf16_only_where_native_else_float16_with_scaler(monkeypatch, native, dtype):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a pre-Ampere GPU emulates bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert autocast_dtype(CUDA, True) == dtype
    assert asked == [False]
    step = MAETrainingStep(amp=True)
    assert step.dtype(CUDA) == dtype
    assert (step.scaler is not None) == (dtype == torch.float16)


def test_choice_is_logged_once_per_process(monkeypatch, caplog):
    fake_cpu(monkeypatch, "avx512", "avx2")
    engines._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger=engines.__name__):
        for _ in range(3):
            autocast_dtype(CPU, True)
    lines = [r.getMessage() for r in caplog.records if r.name == engines.__name__]
    assert lines == [
        "precision: CPU has no native bf16 (AVX512-BF16/AMX), best found: avx512; float32 (emulated bf16 is slower)"
    ]


def test_benchmark_records_cpu_capability_and_precision(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, "avx512", "avx2")
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    # the cxr preset has no sliding-window part: only the environment and matmul peaks are measured
    benchmark.main(preset="cxr", parts="sw", device="cpu", out=str(tmp_path / "b.json"))
    env = json.loads((tmp_path / "b.json").read_text())["env"]
    assert env["cpu_capability"] == "avx512"
    assert env["amp_dtype"] is None
    assert env["precision"].startswith("CPU has no native bf16")
