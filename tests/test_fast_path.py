"""The fast path keeps the numerics, and the MAE step never waits on the host.

Fast settings checked against the plain float32 path on the same weights, mask (seed) and input:
bf16 autocast of the MAE loss (through the bundle's MAETrainingStep), fused AdamW, and bf16
sliding-window UNETR inference (engines.AutocastInferer). No timed assertions: speed is shown by
tools/benchmark.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from torch.utils._python_dispatch import TorchDispatchMode

from selfmedmae_components.engines import AutocastInferer, MAETrainingStep, autocast_dtype, cpu_supports_bf16
from selfmedmae_components.networks import UNETR, MaskedAutoencoder
from selfmedmae_components.optim import param_groups_weight_decay

# big enough for bf16 rounding to show (32 tokens of 16^3, 4 blocks of width 192), small enough for CPU
SMALL = dict(
    hidden_size=192, num_layers=4, num_heads=4, decoder_hidden_size=96, decoder_num_layers=2, decoder_num_heads=4
)
# Tolerances of bf16 against float32. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%
# per value); the loss averages ~10^5 squared errors in float32, so it agrees far better than single
# values do. Measured on this model: loss 1e-5 relative, predictions 0.6% (relative Frobenius);
# the bounds leave room for other CPUs' and GPUs' kernels.
LOSS_RTOL = 1e-3
PRED_RTOL = 3e-2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_mae(mask_ratio: float = 0.75) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(1, (64, 64, 32), 16, 3, mask_ratio=mask_ratio, **SMALL)


def images(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # smooth, image-like input (a plain uniform noise patch has no structure to reconstruct)
    x = torch.rand(n, 1, 8, 8, 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(64, 64, 32), mode="trilinear", align_corners=False)


def fake_engine(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> SimpleNamespace:
    return SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu")), non_blocking=False, network=net, optimizer=optimizer
    )


def mae_loss(net: MaskedAutoencoder, x: torch.Tensor, dtype: torch.dtype | None, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)  # the same noise, so the same mask, on both paths
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, pred, mask = net(x)
    return loss, pred, mask


@pytest.mark.parametrize("mask_ratio", [0.75, 0.125])
def test_mae_bf16_loss_matches_fp32(mask_ratio):
    net, x = make_mae(mask_ratio), images()
    loss32, pred32, mask32 = mae_loss(net, x, None)
    loss16, pred16, mask16 = mae_loss(net, x, torch.bfloat16)
    assert torch.equal(mask32, mask16)  # same seed -> same mask on both paths
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= LOSS_RTOL * abs(loss32.item())
    # predictions as a whole (relative Frobenius error), not element by element
    assert (pred16.float() - pred32).norm() / pred32.norm() < PRED_RTOL


def test_compiled_mae_matches_eager(monkeypatch):
    """The ``compile`` switch (engines.maybe_compile): same parameter names, same loss and gradients."""
    import torch._inductor.config as inductor_config

    from selfmedmae_components.engines import maybe_compile

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the eager random numbers: the same mask
    net, x = make_mae(), images()
    eager = copy.deepcopy(net)
    compiled = maybe_compile(net, True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    runs = []  # (loss, mask, gradients) of the eager, then the compiled module
    for model in (eager, compiled):
        loss, _, mask = mae_loss(model, x, None)
        loss.backward()
        runs.append(
            (loss.detach(), mask, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        )
    (loss_eager, mask_eager, grads_eager), (loss_compiled, mask_compiled, grads_compiled) = runs
    assert torch.equal(mask_compiled, mask_eager)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads_compiled, grads_eager, rtol=1e-3, atol=1e-5)
    assert maybe_compile(eager, False) is eager and eager._compiled_call_impl is None  # off: left eager


def test_mae_bf16_gradients_follow_fp32():
    net, x = make_mae(), images()
    grads = {}
    for dtype in (None, torch.bfloat16):
        net.zero_grad(set_to_none=True)
        loss, _, _ = mae_loss(net, x, dtype)
        loss.backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    g32, g16 = grads[None], grads[torch.bfloat16]
    assert torch.isfinite(g16).all()
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
    assert cosine > 0.99, cosine


def test_mae_training_step_bf16_matches_fp32_step():
    """Through the bundle's own step (amp switch), one optimiser step from the same state."""
    if autocast_dtype(torch.device("cpu"), True) is None:
        pytest.skip("this CPU has no native bf16: the step keeps float32 (the switch is a no-op here)")
    x = images()
    losses, params = {}, {}
    for amp in (False, True):
        net = make_mae()
        opt = torch.optim.AdamW(param_groups_weight_decay(net, 1e-4, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
        step = MAETrainingStep(amp=amp)
        torch.manual_seed(7)
        out = step(fake_engine(net, opt), {"image": x})
        losses[amp], params[amp] = out["loss"], torch.cat([p.detach().flatten() for p in net.parameters()])
    assert abs(losses[True].item() - losses[False].item()) <= LOSS_RTOL * abs(losses[False].item())
    # the first AdamW step moves each weight by about lr, whatever the gradient's scale: the
    # updates agree in direction when the gradients do
    start = torch.cat([p.detach().flatten() for p in make_mae().parameters()])
    d32, d16 = params[False] - start, params[True] - start
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9


def test_fused_adamw_matches_default_adamw():
    """The fused optimiser (the benchmark's and the recommended bundle setting) is the same update."""
    x = images()
    params = []
    for kwargs in ({}, {"fused": True}):
        net = make_mae()
        opt = torch.optim.AdamW(param_groups_weight_decay(net, 1e-3, 0.05), lr=1e-3, betas=(0.9, 0.95), **kwargs)
        step = MAETrainingStep()
        for i in range(2):
            torch.manual_seed(i)
            step(fake_engine(net, opt), {"image": x})
        params.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-4, atol=1e-5)  # steps are ~lr = 1e-3


def test_unetr_bf16_sliding_window_matches_fp32():
    torch.manual_seed(0)
    net = UNETR(
        1, 4, 32, feature_size=8, hidden_size=96, num_layers=3, num_heads=4, skip_hidden_states=(0, 1, 2)
    ).eval()
    g = torch.Generator().manual_seed(2)
    vol = torch.nn.functional.interpolate(torch.rand(1, 1, 6, 6, 5, generator=g), size=(48, 48, 40), mode="trilinear")
    sw = SlidingWindowInferer(roi_size=(32, 32, 32), sw_batch_size=4, overlap=0.5)
    with torch.inference_mode():
        ref = sw(vol, net)
        fast = AutocastInferer(sw, amp=True)(vol, net) if cpu_supports_bf16() else None
        forced = _forced_bf16(sw)(vol, net)  # the same wrapper, bf16 even where the CPU lacks it
    for out in (fast, forced):
        if out is None:
            continue
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert (out - ref).norm() / ref.norm() < 2e-2
        # random weights leave many near-ties between classes; a trained net is more decisive
        assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.95


def _forced_bf16(inner):
    class Forced(AutocastInferer):
        def __call__(self, inputs, network, *args, **kwargs):
            def autocast_network(x, *a, **k):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return network(x, *a, **k).float()

            return self.inferer(inputs, autocast_network, *args, **kwargs)

    return Forced(inner)


def test_autocast_inferer_is_a_no_op_without_amp():
    net = torch.nn.Conv3d(1, 2, 1)
    sw = SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.25)
    vol = torch.rand(1, 1, 12, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(AutocastInferer(sw, amp=False)(vol, net), sw(vol, net), rtol=0, atol=0)


# ---------------------------------------------------------------------------- no host sync
class HostSyncRecorder(TorchDispatchMode):
    """Records the ops that make the host wait for the device.

    ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)`` all reach ``aten._local_scalar_dense``;
    ``nonzero`` / ``masked_select`` / ``unique`` / boolean-mask indexing have data-dependent
    output shapes, so the host must read the device; a copy from a device to the CPU is ``.cpu()``.
    On a CPU nothing is asynchronous, but the same ops would stall a GPU step, so they are
    flagged wherever the test runs.
    """

    SYNC_OPS = {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "is_nonzero",
        "equal",
        "allclose",
        "repeat_interleave",
    }

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.SYNC_OPS:
            self.syncs.append(str(func))
        elif name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.syncs.append(f"{func} with a boolean mask")
        elif name in ("_to_copy", "copy_") and _leaves_device(func, args, kwargs):
            self.syncs.append(f"{func} to the host")
        return func(*args, **kwargs)


def _leaves_device(func, args, kwargs) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if func._schema.name.endswith("_to_copy"):
        target = kwargs.get("device")
        return (
            bool(tensors)
            and tensors[0].device.type != "cpu"
            and target is not None
            and torch.device(target).type == "cpu"
        )
    return len(tensors) >= 2 and tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu"


def test_sync_recorder_catches_host_syncs():
    """The recorder itself: it sees .item(), bool(), boolean indexing and nonzero."""
    x = torch.randn(8)
    with HostSyncRecorder() as rec:
        x.sum().item()
    assert rec.syncs
    for fn in (lambda: bool(x.sum() > 0), lambda: x[x > 0], lambda: torch.nonzero(x)):
        with HostSyncRecorder() as rec:
            fn()
        assert rec.syncs, fn


@pytest.mark.parametrize("amp", [False, True])
def test_mae_step_has_no_host_sync(amp):
    """Masking, loss, backward, gradient clipping and the fused AdamW step: no host reads."""
    net, x = make_mae(), images()
    opt = torch.optim.AdamW(param_groups_weight_decay(net, 1e-4, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    step = MAETrainingStep(amp=amp, grad_clip_norm=1.0)
    engine = fake_engine(net, opt)
    step(engine, {"image": x})  # first step: optimiser state is created
    with HostSyncRecorder() as rec:
        step(engine, {"image": x})
    assert rec.syncs == [], rec.syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_mae_step_has_no_host_sync_cuda():
    net = make_mae().cuda()
    x = images().cuda()
    opt = torch.optim.AdamW(param_groups_weight_decay(net, 1e-4, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    step = MAETrainingStep(amp=True, grad_clip_norm=1.0)
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cuda")), non_blocking=True, network=net, optimizer=opt
    )
    step(engine, {"image": x})
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(engine, {"image": x})
    finally:
        torch.cuda.set_sync_debug_mode("default")
