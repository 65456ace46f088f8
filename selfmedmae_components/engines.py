"""Training steps for MONAI's SupervisedTrainer (passed as ``iteration_update``), and the run set-up
(seeding, cuDNN and TF32 settings) every bundle config calls first.

MONAI's own step supports mixed precision only on CUDA (fp16 + GradScaler) and has no gradient
clipping. These steps add bf16/fp16 autocast on any device, an optional gradient-norm clip (the
original code clipped nothing and users saw NaN losses under fp16), gradient accumulation over
micro-batches (the paper's batch on a smaller GPU), and the MAE step, whose loss comes from the
network itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import default_prepare_batch
from monai.utils import CommonKeys

from .config_helpers import as_bool

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# What this CPU offers for bf16, best first, as torch.cpu's probes name it. Only AMX and AVX512-BF16
# run bf16 matrix products natively; on plain AVX-512 (Skylake-SP, Cascade Lake) oneDNN emulates them
# and bf16 autocast is about 3x slower than float32 (ViT-B MAE step: 10.4 s vs 3.2 s).
CPU_CAPABILITIES = {
    "amx": "_is_amx_tile_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "avx512": "_is_avx512_supported",
    "avx2": "_is_avx2_supported",
}
NATIVE_CPU_BF16 = ("amx", "avx512_bf16")


def cpu_capability() -> str:
    """The best of ``CPU_CAPABILITIES`` this CPU has, or "none" (also where torch lacks the probes)."""
    for name, probe in CPU_CAPABILITIES.items():
        check = getattr(torch.cpu, probe, None)  # private API: guard its absence in other torch versions
        try:
            if check is not None and check():
                return name
        except RuntimeError:
            pass
    return "none"


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 / AMX), so autocast helps."""
    return cpu_capability() in NATIVE_CPU_BF16


def precision_choice(
    device: torch.device, amp: bool | str, amp_dtype: str = "bfloat16"
) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``device`` (None: float32) and why, in words.

    bf16 only where the hardware runs it natively; float16 only on CUDA (with a grad scaler). torch's
    own bf16 checks also count emulation (oneDNN on AVX-512 CPUs, pre-Ampere GPUs), which is slower
    than the precision it replaces, so they are not used.
    """
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}.")
    if not as_bool(amp):
        return None, "amp off: float32"
    if device.type == "cuda":
        if amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return (
                torch.float16,
                "GPU has no native bf16 (compute capability < 8.0): float16 autocast with a grad scaler",
            )
        return AMP_DTYPES[amp_dtype], f"GPU: {amp_dtype} autocast" + (
            " with a grad scaler" if amp_dtype == "float16" else ""
        )
    if device.type == "cpu" and amp_dtype == "bfloat16":
        found = cpu_capability()
        if found in NATIVE_CPU_BF16:
            return torch.bfloat16, f"CPU has native bf16 ({found}): bfloat16 autocast"
        return None, f"CPU has no native bf16 (AVX512-BF16/AMX), best found: {found}; float32 (emulated bf16 is slower)"
    return None, f"no fast {amp_dtype} on {device.type}: float32"


@functools.cache  # once per process and message: autocast_dtype runs at every inference call
def _log_once(message: str) -> None:
    logger.info(f"precision: {message}")


def autocast_dtype(device: torch.device, amp: bool | str, amp_dtype: str = "bfloat16") -> torch.dtype | None:
    """:func:`precision_choice`'s dtype; logs the choice and its reason once per process."""
    dtype, reason = precision_choice(device, amp, amp_dtype)
    _log_once(reason)
    return dtype


def set_determinism(seed: int, deterministic: bool | str = False) -> None:
    """Seed Python, NumPy and torch (MONAI's ``set_determinism``), and set cuDNN's mode.

    MONAI's ``set_determinism`` also makes cuDNN deterministic and turns its benchmark mode off. That
    stops the autotuning of the 3-D convolutions and still does not make CUDA runs bitwise repeatable
    (other kernels use atomics), so here cuDNN stays in benchmark mode unless ``deterministic`` is set.
    Seeding is the same either way, and CPU runs do not use cuDNN: their results do not change.
    """
    from monai.utils import set_determinism as monai_set_determinism

    monai_set_determinism(seed=seed)
    deterministic = as_bool(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def setup_run(seed: int, device: torch.device | str, deterministic: bool | str = False) -> None:
    """What every bundle run does first: :func:`set_determinism`, and on CUDA TF32 for float32 matrix
    products and convolutions (10-bit mantissa inputs, float32 accumulation; what amp: false runs on
    Ampere and newer GPUs, about 8x the float32 rate). The only place the bundles set backend flags."""
    set_determinism(seed, deterministic)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _prepare(batchdata: dict, engine: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's (image, label) on the engine's device through the trainer's ``prepare_batch`` and
    ``to_kwargs`` (MONAI's default moves them; the chest X-ray bundle's also replicates and normalises its
    8-bit images there), as plain tensors: training needs no metadata, MONAI's MetaTensor adds a Python
    hook to every operation, and torch.compile'd networks refuse it."""
    prepare = getattr(engine, "prepare_batch", default_prepare_batch)
    image, label = prepare(batchdata, engine.state.device, engine.non_blocking, **getattr(engine, "to_kwargs", {}))[:2]
    return tuple(x.as_tensor() if isinstance(x, MetaTensor) else x for x in (image, label))


def maybe_compile(module: torch.nn.Module, enabled: bool | str = False) -> torch.nn.Module:
    """``module.compile()`` in place when ``enabled`` (the bundles' ``compile`` switch), else nothing.

    In place, so parameter names (checkpoints, weight transfer) stay those of the eager module. The
    first steps are slow while PyTorch compiles (about a minute for ViT-B on 2 CPU cores); after that
    the MAE step is about 10 % faster on CPU (tools/benchmark.py --compile). Needs a C++ compiler on CPU.
    """
    if as_bool(enabled):
        module.compile()
    return module


class TrainingStep:
    """Supervised step: ``loss_function(network(image), label)`` under autocast, then an optimiser step.

    With ``micro_batch_size``, the batch goes through the network in parts of at most that many
    samples whose gradients add up before the one optimiser step (gradient accumulation): the batch,
    learning rate and schedule stay the paper's while activation memory is that of a part. Each part's
    loss is weighted by its share of the batch, which gives the whole batch's gradient for losses that
    average over equally sized samples (Dice, cross-entropy, BCE, the MAE loss). Under
    DistributedDataParallel the gradients are all-reduced once, after the last part.

    Args:
        amp: mixed precision on/off.
        amp_dtype: "bfloat16" (default; no scaler needed) or "float16" (CUDA, with a grad scaler).
        grad_clip_norm: clip the global gradient norm to this value; None or 0 disables it.
        micro_batch_size: samples (crops) per forward/backward pass; None or 0: the whole batch at once.
    """

    def __init__(
        self,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
        grad_clip_norm: float | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        self.amp = amp
        self.amp_dtype = amp_dtype
        self.grad_clip_norm = grad_clip_norm
        self.micro_batch_size = int(micro_batch_size or 0)
        self.scaler: torch.amp.GradScaler | None = None
        self._scaler_state: dict | None = None  # a resumed run's scaler state, until the scaler exists
        self._dtype_for: dict[str, torch.dtype | None] = {}

    def dtype(self, device: torch.device) -> torch.dtype | None:
        if device.type not in self._dtype_for:
            dtype = autocast_dtype(device, self.amp, self.amp_dtype)
            self._dtype_for[device.type] = dtype
            if dtype == torch.float16:
                self.scaler = torch.amp.GradScaler(device.type)
                if self._scaler_state is not None:
                    self.scaler.load_state_dict(self._scaler_state)
                    self._scaler_state = None
        return self._dtype_for[device.type]

    def micro_batches(self, batchdata: dict) -> list[tuple[dict, float]]:
        """The batch's image (and label) in parts of at most ``micro_batch_size`` samples, each with its
        share of the batch; the whole batch (share 1) without ``micro_batch_size``."""
        n = len(batchdata[CommonKeys.IMAGE])
        if not self.micro_batch_size or n <= self.micro_batch_size:
            return [(batchdata, 1.0)]
        keys = [k for k in (CommonKeys.IMAGE, CommonKeys.LABEL) if k in batchdata]
        starts = range(0, n, self.micro_batch_size)
        return [
            ({k: batchdata[k][i : i + self.micro_batch_size] for k in keys}, min(self.micro_batch_size, n - i) / n)
            for i in starts
        ]

    def compute_loss(self, engine: Any, batchdata: dict) -> tuple[torch.Tensor, dict]:
        image, label = _prepare(batchdata, engine)
        pred = engine.network(image)
        return engine.loss_function(pred, label), {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: label,
            CommonKeys.PRED: pred,
        }

    def __call__(self, engine: Any, batchdata: dict) -> dict:
        device = torch.device(engine.state.device)
        dtype = self.dtype(device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        parts = self.micro_batches(batchdata)
        total = None
        for i, (part, share) in enumerate(parts):
            # DDP all-reduces the gradients in every backward; the parts before the last only accumulate
            last = i == len(parts) - 1
            no_sync = getattr(engine.network, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, out = self.compute_loss(engine, part)
                if share != 1.0:
                    loss = loss * share
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
            if i == 0:
                output = out  # the first part's tensors: what the handlers show (e.g. the reconstruction image)
        if self.grad_clip_norm:
            if self.scaler is not None:
                # clip the true gradients; without a clip, scaler.step() unscales them, inside the fused
                # AdamW kernel (the bundles' optimiser) rather than in a pass of its own
                self.scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(engine.optimizer)
            self.scaler.update()
        else:
            engine.optimizer.step()
        output[CommonKeys.LOSS] = total
        return output

    def state_dict(self) -> dict:
        if self.scaler is not None:
            return {"scaler": self.scaler.state_dict()}
        return {"scaler": self._scaler_state} if self._scaler_state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restores the fp16 grad scaler. A resumed run loads its checkpoint when the trainer starts, before
        the first step has created the scaler (the precision depends on the device the step runs on), so
        the state is kept until then."""
        if "scaler" not in state:
            return
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        else:
            self._scaler_state = state["scaler"]


class AutocastInferer:
    """Run another inferer (e.g. ``SlidingWindowInferer``) with the network under autocast.

    MONAI's evaluators autocast only on CUDA; this gives bf16 inference on CPUs with native bf16
    too. Only the network runs in low precision: its output is cast back to float32, so the
    sliding-window stitching (and argmax / metrics after it) stay in float32. Where
    :func:`autocast_dtype` finds no fast low precision, the inner inferer runs unchanged.

    Args:
        inferer: the inferer to wrap, called as ``inferer(inputs, network, *args, **kwargs)``.
        amp: mixed precision on/off.
        amp_dtype: "bfloat16" (default) or "float16" (CUDA only).
    """

    def __init__(self, inferer: Any, amp: bool = True, amp_dtype: str = "bfloat16") -> None:
        self.inferer = inferer
        self.amp = amp
        self.amp_dtype = amp_dtype

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        dtype = autocast_dtype(inputs.device, self.amp, self.amp_dtype)
        if dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)

        def autocast_network(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            with torch.autocast(x.device.type, dtype=dtype):
                return network(x, *a, **k).float()

        return self.inferer(inputs, autocast_network, *args, **kwargs)


class MAETrainingStep(TrainingStep):
    """MAE pre-training step: the network returns (loss, pred, mask) for the images; no labels.

    The step owns the mask ratio of training: the bundles set it here (``mask_ratio`` of pretrain.yaml)
    and it is passed to the network at every step. The network's own ``mask_ratio`` is only the default
    of direct calls.

    Args:
        mask_ratio: fraction of tokens masked, in [0, 1) (None: the network's default).
        amp, amp_dtype, grad_clip_norm, micro_batch_size: as for :class:`TrainingStep`.
    """

    def __init__(self, mask_ratio: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mask_ratio is not None and not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)

    def compute_loss(self, engine: Any, batchdata: dict) -> tuple[torch.Tensor, dict]:
        image, _ = _prepare(batchdata, engine)
        loss, pred, mask = engine.network(image, self.mask_ratio)
        return loss, {CommonKeys.IMAGE: image, CommonKeys.PRED: pred, "mask": mask}
