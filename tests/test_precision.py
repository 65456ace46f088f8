"""Which precision the training steps and inferers choose, with the hardware checks mocked; what the MAE step passes
on inside MONAI's SupervisedTrainer, what the inferer's autocast passes on, and the run set-up.

bf16 autocast only where the hardware runs it natively: on CPUs that only emulate it (plain AVX-512,
AVX2) it is slower than float32, and on pre-Ampere GPUs float16 with a grad scaler is used instead.
"""

import importlib.util
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from bundle_runner import REPO
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer

from selfmedmae_components import engines
from selfmedmae_components.engines import (
    AutocastInferer,
    MAETrainingStep,
    TrainingStep,
    autocast_dtype,
    cpu_capability,
    cpu_supports_bf16,
    maybe_compile,
    precision_choice,
    set_determinism,
    setup_run,
)
from selfmedmae_components.networks import MaskedAutoencoder

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


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """The fp16 + grad scaler path on the CPU: GradScaler("cpu") runs there."""
    monkeypatch.setattr(engines, "autocast_dtype", lambda device, amp, amp_dtype="bfloat16": torch.float16)


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
    # the cxr14 preset has no sliding-window part: only the environment and matmul peaks are measured
    benchmark.main(preset="cxr14", parts="sw", device="cpu", out=str(tmp_path / "b.json"))
    env = json.loads((tmp_path / "b.json").read_text())["env"]
    assert env["cpu_capability"] == "avx512"
    assert env["amp_dtype"] is None
    assert env["precision"].startswith("CPU has no native bf16")


@pytest.mark.parametrize(
    "device, amp_dtype, native, expected",
    [
        (CUDA, "bfloat16", True, (torch.bfloat16, "GPU: bfloat16 autocast")),
        (CUDA, "float16", True, (torch.float16, "GPU: float16 autocast with a grad scaler")),
        (
            CUDA,
            "bfloat16",
            False,
            (torch.float16, "GPU has no native bf16 (compute capability < 8.0): float16 autocast with a grad scaler"),
        ),
        (CPU, "float16", True, (None, "no fast float16 on cpu: float32")),
        (torch.device("meta"), "bfloat16", True, (None, "no fast bfloat16 on meta: float32")),
    ],
)
def test_each_precision_choice_says_why(monkeypatch, device, amp_dtype, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    fake_cpu(monkeypatch, "amx")
    assert precision_choice(device, True, amp_dtype) == expected
    assert autocast_dtype(device, True, amp_dtype) == expected[0]


def test_unknown_precision_and_cpu_bf16_probe(monkeypatch):
    with pytest.raises(ValueError) as err:
        precision_choice(CPU, True, "fp8")
    assert str(err.value) == "amp_dtype must be one of ['bfloat16', 'float16'], got 'fp8'."
    fake_cpu(monkeypatch, "amx")
    assert cpu_supports_bf16()
    fake_cpu(monkeypatch, "avx512", "avx2")
    assert not cpu_supports_bf16()


@pytest.mark.parametrize("native", [True, False])
def test_autocast_inferer_runs_the_network_in_bf16_where_native(monkeypatch, native):
    """Extra arguments reach the inner inferer and the network; the network's output comes back in float32."""
    fake_cpu(monkeypatch, *(["amx"] if native else ["avx2"]))
    seen = {}

    def network(x, scale, shift=0.0):
        seen.update(autocast=torch.is_autocast_enabled("cpu"), dtype=torch.get_autocast_dtype("cpu"))
        return torch.nn.functional.linear(x, torch.eye(2)) * scale + shift

    def inner(inputs, net, *args, **kwargs):  # as MONAI's inferers: network(inputs, *args, **kwargs)
        return net(inputs, *args, **kwargs)

    out = AutocastInferer(inner, amp=True)(torch.ones(1, 2), network, 2.0, shift=1.0)
    assert seen["autocast"] == native and (not native or seen["dtype"] == torch.bfloat16)
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((1, 2), 3.0))
    AutocastInferer(inner, amp=False)(torch.ones(1, 2), network, 2.0)
    assert not seen["autocast"]


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_mae_step_in_a_trainer_masks_its_ratio_on_plain_float32_images(ratio, one_thread):
    """The bundles' cache hands float16 MetaTensors; the trainer's to_kwargs make them float32 on the device and the
    step hands the network plain tensors. The step's output carries the mask the loss used."""
    torch.manual_seed(0)
    mae = MaskedAutoencoder(
        1,
        32,
        8,
        3,
        hidden_size=48,
        num_layers=1,
        num_heads=4,
        decoder_hidden_size=48,
        decoder_num_layers=1,
        decoder_num_heads=4,
    )
    seen = []
    mae.register_forward_pre_hook(lambda m, args: seen.append((type(args[0]), args[0].dtype, args[1])))
    batch = {"image": MetaTensor(torch.rand(2, 1, 32, 32, 32).half(), meta={"filename_or_obj": "a.nii.gz"})}
    trainer = SupervisedTrainer(
        CPU,
        1,
        [batch],
        mae,
        torch.optim.SGD(mae.parameters(), lr=0.0),
        None,
        iteration_update=MAETrainingStep(mask_ratio=ratio),
        decollate=False,
        to_kwargs={"dtype": torch.float32},
    )
    trainer.run()
    assert seen == [(torch.Tensor, torch.float32, ratio)]
    mask = trainer.state.output["mask"]
    assert mask.shape == (2, 64) and torch.all(mask.sum(1) == 64 - int(64 * (1 - ratio)))


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_mae_step_refuses_a_ratio_outside_0_to_1(ratio):
    with pytest.raises(ValueError) as err:
        MAETrainingStep(mask_ratio=ratio)
    assert str(err.value) == f"mask_ratio must be in [0, 1), got {ratio}."


def test_setup_run_seeds_every_run_alike(monkeypatch):
    for flag in ("deterministic", "benchmark"):  # restored after the test
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    draws = []
    for seed in (3, 3, 4):
        setup_run(seed, "cpu")
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    setup_run(0, "cpu", deterministic=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    setup_run(0, "cpu")
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    set_determinism(0, deterministic=True)
    set_determinism(0)  # the default: cuDNN autotunes (benchmark mode), as setup_run's
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_compile_only_when_asked():
    """torch.compile compiles lazily, at the first call: asking costs nothing here."""
    assert maybe_compile(torch.nn.Linear(1, 1))._compiled_call_impl is None
    assert maybe_compile(torch.nn.Linear(1, 1), "false")._compiled_call_impl is None
    assert maybe_compile(torch.nn.Linear(1, 1), True)._compiled_call_impl is not None


def test_float16_is_never_chosen_on_a_cpu_even_with_native_bf16(monkeypatch):
    """The dtype asked for is the one weighed: float16 on a CPU stays float32 (no bf16 in its place)."""
    fake_cpu(monkeypatch, "amx")
    assert TrainingStep(amp=True, amp_dtype="float16").dtype(CPU) is None
    seen = []
    net = lambda x: seen.append(torch.is_autocast_enabled("cpu")) or x  # noqa: E731
    AutocastInferer(lambda inputs, network: network(inputs), amp_dtype="float16")(torch.ones(1), net)
    AutocastInferer(lambda inputs, network: network(inputs))(torch.ones(1), net)  # amp on by default
    assert seen == [False, True]


def test_the_step_trains_under_the_chosen_autocast(monkeypatch):
    fake_cpu(monkeypatch, "amx")
    seen = []
    net = torch.nn.Linear(2, 1)
    net.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    engine = SimpleNamespace(
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        non_blocking=False,
        loss_function=lambda p, y: p.float().mean(),
        state=SimpleNamespace(device=CPU),
    )
    TrainingStep(amp=True)(engine, {"image": torch.ones(2, 2), "label": torch.ones(2, 1)})
    assert seen == [(True, torch.bfloat16)]


def test_scaler_state_round_trips_before_and_after_the_scaler_exists(fp16_on_cpu):
    """A resumed run loads the grad scaler's state before the first step creates the scaler: it is kept, saved
    again if the run stops first, and loaded into the scaler once it exists."""
    saved = {
        "scale": 1024.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 3,
    }
    step = TrainingStep(amp=True, amp_dtype="float16")
    assert step.state_dict() == {}
    step.load_state_dict({"scaler": saved})
    assert step.state_dict() == {"scaler": saved}
    step.dtype(CPU)  # the first step: the scaler is created and takes the state
    assert step.scaler.get_scale() == 1024.0
    step.load_state_dict({"scaler": {**saved, "scale": 64.0}})
    assert step.scaler.get_scale() == 64.0 and step.state_dict()["scaler"]["scale"] == 64.0


def test_a_batch_that_fits_goes_through_whole():
    batch = {"image": torch.zeros(4, 1), "label": torch.zeros(4, 1)}
    (part, share), *rest = TrainingStep(micro_batch_size=4).micro_batches(batch)
    assert part is batch and share == 1.0 and not rest


def test_under_ddp_the_parts_before_the_last_accumulate_without_an_all_reduce():
    """DistributedDataParallel all-reduces in every backward outside ``no_sync()``: only the last part may run
    outside it, so the gradients are all-reduced once, over the whole batch."""
    import contextlib

    class Wrapped(torch.nn.Linear):  # the no_sync() of a DDP module, recorded
        syncing, seen = True, []

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, x):
            self.seen.append(self.syncing)
            return super().forward(x)

    net = Wrapped(2, 1)
    engine = SimpleNamespace(
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        non_blocking=False,
        loss_function=lambda p, y: p.float().mean(),
        state=SimpleNamespace(device=CPU),
    )
    TrainingStep(micro_batch_size=2)(engine, {"image": torch.ones(5, 2), "label": torch.ones(5, 1)})
    assert net.seen == [False, False, True]
