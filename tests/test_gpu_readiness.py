"""Ready for the first GPU run: the CUDA-bound fixes checked on their CPU paths, in process.

Gradient accumulation (micro-batches), the fp16 grad scaler across a resume (fp16 forced on CPU),
unscaling only to clip, the validation sampler for more ranks than cases, cuDNN / TF32 settings,
per-iteration logging every N iterations, and activation checkpointing. The 3-process run is in test_resume_and_ddp.py, the
CUDA-only checks in test_cuda.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from ignite.engine import Engine
from monai.data import DistributedSampler
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, StatsHandler
from monai.losses import DiceCELoss

from selfmedmae_components import engines
from selfmedmae_components.distributed import ValidationSampler, validation_partition
from selfmedmae_components.engines import TrainingStep, set_determinism, setup_run
from selfmedmae_components.handlers import EpochSeeder, log_every
from selfmedmae_components.networks import UNETR, MaskedAutoencoder, ViTClassifier

CPU = torch.device("cpu")


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """The fp16 + grad scaler path, as on a pre-Ampere GPU, on the CPU (CPU autocast runs float16)."""
    monkeypatch.setattr(
        engines, "precision_choice", lambda device, amp, amp_dtype="bfloat16": (torch.float16, "forced")
    )


def seg_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))


def seg_batch(n: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.rand(n, 1, 8, 8, 8, generator=g),
        "label": torch.randint(0, 3, (n, 1, 8, 8, 8), generator=g).float(),
    }


def engine_for(net, step_lr: float = 1.0, loss=None):
    opt = torch.optim.SGD(net.parameters(), lr=step_lr)
    loss = loss or DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    state = type("State", (), {"device": CPU})()
    return type("Engine", (), dict(state=state, non_blocking=False, network=net, optimizer=opt, loss_function=loss))()


def test_micro_batches_give_the_whole_batch_step():
    """5 crops in parts of 2, 2 and 1: the same loss and the same weights after the step as all 5 at once
    (the bundles' Dice + CE loss averages over crops of one size)."""
    whole, parts = seg_net(), seg_net()
    batch = seg_batch(5)
    out_whole = TrainingStep()(engine_for(whole), batch)
    out_parts = TrainingStep(micro_batch_size=2)(engine_for(parts), batch)
    torch.testing.assert_close(out_parts["loss"], out_whole["loss"], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(whole.named_parameters(), parts.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert out_parts["pred"].shape[0] == 2  # the first part's outputs, for the handlers


def test_micro_batches_all_reduce_once_under_ddp():
    """DDP's no_sync for every part but the last: one gradient all-reduce per optimiser step."""
    entered = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(True)
            yield

    TrainingStep(micro_batch_size=2)(engine_for(FakeDDP(seg_net())), seg_batch(5))
    assert len(entered) == 2  # parts 1 and 2 of 3


@pytest.mark.filterwarnings("ignore:.*GradScaler.*")
def test_fp16_grad_scaler_state_survives_a_resume(fp16_on_cpu, tmp_path):
    """The scaler is created in the first step, after the checkpoint was loaded at STARTED: the loaded
    state must wait for it instead of being dropped (the scale would restart at 65536)."""

    def trainer(step):
        net = seg_net()
        return SupervisedTrainer(
            device=CPU,
            max_epochs=1,
            train_data_loader=[seg_batch(2)] * 2,
            network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
            loss_function=engine_for(net).loss_function,
            iteration_update=step,
            decollate=False,
        )

    first = TrainingStep(amp=True, amp_dtype="float16")
    trainer(first).run()
    assert first.scaler is not None
    first.scaler.update(128.0)  # a scale the interrupted run had reached
    torch.save({"grad_scaler": first.state_dict()}, tmp_path / "ckpt.pt")

    resumed = TrainingStep(amp=True, amp_dtype="float16")
    run = trainer(resumed)
    CheckpointLoader(load_path=str(tmp_path / "ckpt.pt"), load_dict={"grad_scaler": resumed}).attach(run)
    run.run()
    assert resumed.scaler.get_scale() == 128.0  # growth_interval 2000: two steps later, still the saved scale
    assert resumed.state_dict()["scaler"]["scale"] == 128.0


@pytest.mark.filterwarnings("ignore:.*GradScaler.*")
@pytest.mark.parametrize("clip, unscales", [(0.0, 0), (1.0, 1)])
def test_fp16_unscales_only_to_clip(fp16_on_cpu, clip, unscales):
    step = TrainingStep(amp=True, amp_dtype="float16", grad_clip_norm=clip)
    step.dtype(CPU)
    calls = []
    real = step.scaler.unscale_
    step.scaler.unscale_ = lambda opt: (calls.append(opt), real(opt))
    engine = engine_for(seg_net())
    # the bundles' fused AdamW: scaler.step() unscales inside the optimiser kernel, no unscale_ pass of its own
    engine.optimizer = torch.optim.AdamW(engine.network.parameters(), lr=1e-3, fused=True)
    step(engine, seg_batch(2))
    assert len(calls) == unscales
    assert all(torch.isfinite(p).all() for p in engine.network.parameters())


@pytest.mark.parametrize("cases, ranks", [(2, 3), (2, 8), (1, 2), (5, 3), (6, 3)])
def test_validation_sampler_every_rank_has_a_case_and_every_case_weighs_the_same(cases, ranks):
    per_rank = [list(ValidationSampler(range(cases), num_replicas=ranks, rank=r)) for r in range(ranks)]
    assert all(per_rank)
    counts = [sum(idx.count(c) for idx in per_rank) for c in range(cases)]
    assert len(set(counts)) == 1, counts
    if cases >= ranks:  # each case once, exactly as MONAI's sampler without padding
        expected = [
            list(DistributedSampler(range(cases), even_divisible=False, num_replicas=ranks, rank=r, shuffle=False))
            for r in range(ranks)
        ]
        assert per_rank == expected
    else:  # what MONAI's does there
        with pytest.raises(ValueError, match="less than the number of participating ranks"):
            DistributedSampler(range(cases), even_divisible=False, num_replicas=ranks, rank=0, shuffle=False)


def test_each_rank_caches_only_the_validation_cases_it_validates():
    """The multi-GPU configs build each rank's validation CacheDataset from its own part of the list."""
    cases = [{"image": f"case{i}.nii.gz"} for i in range(5)]
    parts = [validation_partition(cases, num_replicas=3, rank=r) for r in range(3)]
    assert parts == [[cases[0], cases[3]], [cases[1], cases[4]], [cases[2]]]
    assert [validation_partition(cases[:2], num_replicas=3, rank=r) for r in range(3)] == [
        [cases[0], cases[1]],
        [cases[1]],
        [cases[0]],
    ]  # fewer cases than ranks: each case twice


@pytest.fixture
def backend_flags():
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    ) = saved


@pytest.mark.parametrize("deterministic", [False, "false", True, "true"])
def test_seeding_keeps_cudnn_autotuning_unless_deterministic(backend_flags, deterministic):
    det = deterministic in (True, "true")
    set_determinism(3, deterministic)
    a = torch.rand(4)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (det, not det)
    # every epoch's re-seeding keeps the choice (MONAI's set_determinism alone would turn autotuning off)
    seeder = EpochSeeder(2, deterministic=deterministic)
    seeder(type("E", (), {"state": type("S", (), {"epoch": 0})()})())
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (det, not det)
    set_determinism(3, deterministic)
    assert torch.equal(torch.rand(4), a)  # seeding is the same either way


def test_tf32_only_for_cuda_runs(backend_flags):
    setup_run(0, "cpu")
    assert not torch.backends.cuda.matmul.allow_tf32
    setup_run(0, torch.device("cuda", 0))  # the flags are set without a GPU, as the configs do on one
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_loss_is_logged_every_n_iterations_and_at_each_epochs_end(capsys):
    """StatsHandler with the configs' iteration_log filter: iterations 3, 6, 8 of 8 (each a .item() on a GPU)."""
    engine = Engine(lambda e, batch: torch.tensor(float(batch)))
    StatsHandler(
        name="log_every_test", iteration_log=log_every(3), epoch_log=False, output_transform=lambda o: o
    ).attach(engine)
    engine.run(list(range(8)), max_epochs=2)
    logged = [
        line.split(" - INFO - ")[-1].split(" -- ")[0]
        for line in capsys.readouterr().out.splitlines()
        if "Iter:" in line
    ]
    assert logged == [f"Epoch: {e}/2, Iter: {i}/8" for e in (1, 2) for i in (3, 6, 8)]


@pytest.mark.parametrize(
    "make, shape, blocks_dominate",
    [
        # at 32^3 the UNETR's 8 tokens keep little beside the convolutional decoder: only the gradients are compared
        (
            lambda ac: UNETR(
                1,
                3,
                32,
                hidden_size=48,
                num_layers=3,
                num_heads=4,
                drop_path_rate=0.2,
                skip_hidden_states=(0, 1, 2),
                activation_checkpointing=ac,
            ),
            (2, 1, 32, 32, 32),
            False,
        ),
        (
            lambda ac: MaskedAutoencoder(
                1,
                64,
                16,
                3,
                hidden_size=48,
                num_layers=2,
                num_heads=4,
                decoder_hidden_size=48,
                decoder_num_layers=2,
                decoder_num_heads=4,
                activation_checkpointing=ac,
            ),
            (2, 1, 64, 64, 64),
            True,
        ),
        (
            lambda ac: ViTClassifier(
                1,
                3,
                64,
                8,
                hidden_size=48,
                num_layers=3,
                num_heads=4,
                drop_path_rate=0.2,
                spatial_dims=2,
                activation_checkpointing=ac,
            ),
            (2, 1, 64, 64),
            True,
        ),
    ],
    ids=["unetr", "mae", "classifier"],
)
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(make, shape, blocks_dominate):
    """The blocks run again in the backward pass with the same drop-path masks: equal gradients, and the
    tensors kept for the backward pass (counted as autograd saves them) shrink where the blocks hold most."""

    def step(ac: bool):
        torch.manual_seed(0)
        net = make(ac)
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: (kept.append(t.numel() * t.element_size()), t)[1], lambda t: t
        ):
            torch.manual_seed(2)  # drop path, MAE masking
            out = net(x)
            loss = out[0] if isinstance(out, tuple) else out.square().mean()
        loss.backward()
        return [p.grad for p in net.parameters() if p.requires_grad], sum(kept)

    (plain, kept_plain), (ckpt, kept_ckpt) = step(False), step(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert kept_ckpt < (0.8 if blocks_dominate else 1.0) * kept_plain, (kept_ckpt, kept_plain)
