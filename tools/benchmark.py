"""Speed benchmark: our MAE pre-training step beside MONAI's MaskedAutoEncoderViT, fine-tuning,
sliding-window inference beside plain MONAI UNETR, and the data pipeline, all in ONE process.

    python tools/benchmark.py --preset btcv --batch 2 --out results.json
    python tools/benchmark.py --preset brats --parts mae --hidden_size 384 --num_layers 6   # smaller ViT
    python tools/benchmark.py --preset cxr14 --batch 32 --compile                          # + torch.compile
    python tools/benchmark.py --preset btcv --batch 24 --finetune_batch 6   # the configs' MAE step, fine-tuning micro-batch

A preset is a dataset of selfmedmae_components/registry.py (btcv, brats, cxr14; also its bundle folder); the
entry's ``benchmark`` and ``geometry`` say what is measured on which data.

Every measurement interleaves the variants it compares (round r runs each variant once, then
round r + 1, ...), after ``warmup`` untimed rounds, so a slow spell on a shared machine hits all
variants alike. Times are reported as the median with the interquartile range over ``repeats``
rounds; a ratio is the median of the per-round ratios (baseline time / variant time).

Parts (``--parts``, comma separated, default all):
  mae       MAE step (forward, loss, backward, AdamW) of ours (the bundle's MAETrainingStep,
            fused AdamW) and MONAI's MaskedAutoEncoderViT configured the same way (widths, depths,
            heads, MLP width, qkv bias, mask ratio, batch; the same normalised-pixel loss; AdamW
            with torch's default implementation), at each mask ratio, in float32 and with the
            fastest safe mixed precision (bf16 where the hardware has it). A variant that fails
            (MONAI's MAE under bf16 autocast does) is reported with its error, not hidden.
  finetune  fine-tuning step of our UNETR (btcv, brats) or ViT classifier (cxr14), float32 and amp.
  sw        sliding-window inference (3D presets): plain float32 MONAI UNETR with the bundle's
            inference settings (overlap; sw_batch_size 4 as the original on CPU, 8 on CUDA) against ours in float32,
            with bf16 autocast (engines.AutocastInferer, the same settings), with a larger
            sw_batch_size (CUDA) and with a smaller overlap (a documented trade-off). Each variant's
            labels are compared with our float32 labels (Dice, voxel agreement). On CUDA each variant
            runs once untimed first (cuDNN autotuning, allocator; ``--sw_warmup``).
  data      preprocessed crops/s from cached data: the bundle's own train transforms and
            CacheDataset, built from pretrain.yaml / finetune.yaml with monai.bundle.ConfigParser,
            on synthetic volumes in the datasets' geometry (or your data: --data_dir). Host memory
            per cached case, its extrapolation to the full datasets and the crops/s before and after
            a change of the configs: tools/data_benchmark.py.

Memory: the step's own peak, above what was allocated before it (models, optimiser state, inputs):
on CPU the rise of the resident set during the step (VmHWM after the step minus VmRSS before it,
with the peak reset through /proc/self/clear_refs); on CUDA torch's max allocated minus the
allocation before the step (``peak_mem_mib``), with the absolute max allocated beside it
(``peak_mem_total_mib``: what the card must hold). The optimiser's share of a step is timed with
CUDA events, so timing it adds no synchronisation inside the step.
MFU: FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode, divided by the median
time and by the device's matmul peak measured here in the same precision, under the bundles'
backend settings (engines.setup_run: on CUDA TF32 for float32, the roof of the float32 rows, and
cuDNN autotuning).

On a CPU, sliding-window inference on a whole CT volume takes minutes per variant, so by default
the inferer runs on a centre crop of it (``sw_measure_size``) and the seconds per CT volume are the
measured seconds per window times the number of windows the CT volume needs at that variant's
overlap (marked "est." in the table, ``extrapolated`` in the JSON). ``--sw_measure_size full``
runs the whole volume.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selfmedmae_components import errors, registry  # noqa: E402
from selfmedmae_components.engines import (  # noqa: E402
    AutocastInferer,
    MAETrainingStep,
    TrainingStep,
    autocast_dtype,
    cpu_capability,
    precision_choice,
    setup_run,
)

MODEL_KEYS = (
    "in_channels",
    "patch_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "mlp_ratio",
    "decoder_hidden_size",
    "decoder_num_layers",
    "decoder_num_heads",
)


# ----------------------------------------------------------------------------- measuring helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one call above what was allocated before it: CUDA max allocated, or on CPU the rise
    of the resident set. On CUDA ``total`` is the absolute max allocated (MiB) of the last call."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = (
            "cuda max allocated above the allocation before the step" if device.type == "cuda" else "cpu rss rise"
        )
        self.total: float | None = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self._can_reset = os.access("/proc/self/clear_refs", os.W_OK) and _proc_status_kb("VmHWM") is not None
        if device.type == "cpu" and not self._can_reset:
            self.kind = "cpu max rss rise (process-wide peak, cannot reset)"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back, so the next peak is this call's own
        if self._can_reset:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._start = _proc_status_kb("VmRSS") or 0
        else:
            import resource

            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> float:
        """MiB."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.total = peak / 2**20
            return (peak - self._start) / 2**20
        if self._can_reset:
            return max(0, (_proc_status_kb("VmHWM") or 0) - self._start) / 1024
        import resource

        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start) / 1024


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """TFLOP/s of a square matmul, the roof for MFU: the best of ``reps`` rounds, each timing a run of
    back-to-back products after a warm-up (on a GPU one product is too short to time on its own: launch
    and clock ramp-up would count). float32 runs under the current TF32 setting, as the steps do."""
    n, inner = (8192, 20) if device.type == "cuda" else (2048, 1)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(inner):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = max(best, inner * 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def count_flops(fn: Callable[[], Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def median_iqr(xs: list[float]) -> tuple[float, float, float]:
    if not xs:
        return float("nan"), float("nan"), float("nan")
    if len(xs) < 4:
        return statistics.median(xs), min(xs), max(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


class Variant:
    """One thing to time: ``run()`` does one step; ``items`` volumes / crops / images per step."""

    def __init__(
        self,
        name: str,
        run: Callable[[], Any],
        items: int,
        precision: str,
        group: str = "",
        flops: Callable[[], float] | None = None,
        phase: dict | None = None,
        info: dict | None = None,
    ) -> None:
        self.name, self.run, self.items, self.precision, self.group = name, run, items, precision, group
        self.flops_fn, self.phase, self.info = flops, phase, dict(info or {})
        self.flops_warm = "compile" not in name  # the FLOP count runs the eager module
        self.times: list[float] = []
        self.opt_times: list[float] = []
        self.mem: list[float] = []
        self.mem_total: list[float] = []
        self.flops: float | None = None
        self.error: str | None = None


def interleave(variants: list[Variant], device: torch.device, warmup: int, repeats: int, log: Callable) -> None:
    """Warm up, count FLOPs, then time the variants round by round (interleaved)."""
    mem = PeakMemory(device)
    for w in range(max(warmup, 1)):
        for v in variants:
            if v.error:
                continue
            try:
                counted = w == 0 and v.flops_fn is not None
                if counted:
                    v.flops = v.flops_fn()  # an untimed step under the FLOP counter: also a warm-up step
                if w < warmup and not (counted and v.flops_warm):
                    v.run()
                sync(device)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                log(f"  {v.name}: FAILED ({v.error})")
                if os.environ.get("BENCHMARK_TRACEBACK"):
                    traceback.print_exc()
    for r in range(repeats):
        for v in variants:
            if v.error:
                continue
            mem.start()
            sync(device)
            if v.phase is not None:
                optimizer_seconds(v.phase)  # drop what the warm-up and other variants' steps recorded
            t = time.perf_counter()
            v.run()
            sync(device)
            v.times.append(time.perf_counter() - t)
            v.mem.append(mem.stop())
            if mem.total is not None:
                v.mem_total.append(mem.total)
            if v.phase is not None:
                v.opt_times.append(optimizer_seconds(v.phase))
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{v.name} {v.times[-1]:.2f}s" for v in variants if not v.error))


def timed_optimizer(optimizer: torch.optim.Optimizer, device: torch.device, phase: dict) -> None:
    """Record the optimiser step's share of a step (read with :func:`optimizer_seconds` after the step).

    On CUDA with a pair of events on the stream, read once the step's closing sync has happened: syncing
    around the optimiser step would stall the queue and time a step that the bundles never run."""
    step = optimizer.step

    def wrapped(*args, **kwargs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step(*args, **kwargs)
            end.record()
            phase.setdefault("events", []).append((start, end))
            return out
        t = time.perf_counter()
        out = step(*args, **kwargs)
        phase["opt"] = phase.get("opt", 0.0) + time.perf_counter() - t
        return out

    optimizer.step = wrapped


def optimizer_seconds(phase: dict) -> float:
    """The optimiser time recorded in ``phase`` since the last call (the device must be synchronised)."""
    seconds = phase.get("opt", 0.0) + sum(a.elapsed_time(b) / 1000 for a, b in phase.get("events", []))
    phase["opt"], phase["events"] = 0.0, []
    return seconds


def summarize(v: Variant, baseline: Variant | None, peaks: dict) -> dict:
    med, q1, q3 = median_iqr(v.times)
    row = dict(
        name=v.name,
        group=v.group,
        precision=v.precision,
        items_per_step=v.items,
        error=v.error,
        times_s=v.times,
        median_s=med,
        q1_s=q1,
        q3_s=q3,
        items_per_s=v.items / med if v.times else None,
        optimizer_median_s=statistics.median(v.opt_times) if v.opt_times else None,
        peak_mem_mib=max(v.mem) if v.mem else None,
        peak_mem_total_mib=max(v.mem_total) if v.mem_total else None,
        flops=v.flops,
        **v.info,
    )
    if v.flops and v.times:
        row["tflops"] = v.flops / med / 1e12
        peak = peaks.get(v.precision)
        row["mfu"] = row["tflops"] / peak if peak else None
    if baseline is not None and baseline is not v and v.times and baseline.times:
        n = min(len(v.times), len(baseline.times))
        row["speedup_vs_baseline"] = statistics.median(baseline.times[i] / v.times[i] for i in range(n))
        row["baseline"] = baseline.name
    return row


# ----------------------------------------------------------------------------- bundle settings
def bundle_parser(preset: str, config: str, overrides: dict | None = None):
    from monai.bundle import ConfigParser

    path = REPO / "bundles" / registry.get(preset).bundle / "configs" / f"{config}.yaml"
    parser = ConfigParser()
    parser.read_config(str(path))
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


def setting(parser, key: str, default: Any = None) -> Any:
    try:
        return parser.get_parsed_content(key, instantiate=False) if key in parser else default
    except Exception:  # noqa: BLE001
        return default


def preset_settings(preset: str, overrides: dict) -> dict:
    """Model and inference settings read from the bundle's configs, then the CLI overrides."""
    pre = bundle_parser(preset, "pretrain")
    fin = bundle_parser(preset, "finetune")
    s = {k: setting(pre, k) for k in MODEL_KEYS}
    roi = [int(v) for v in np.atleast_1d(setting(pre, "roi_size", setting(pre, "img_size", 96)))]
    s["roi_size"] = tuple(roi * registry.get(preset).geometry.spatial_dims if len(roi) == 1 else roi)
    s["betas"] = tuple(setting(pre, "betas", (0.9, 0.95)))
    s["weight_decay"] = setting(pre, "weight_decay", 0.05)
    s["out_channels"] = setting(fin, "out_channels")
    s["feature_size"] = setting(fin, "feature_size", 16)
    s["skip_hidden_states"] = tuple(setting(fin, "skip_hidden_states", (3, 6, 9)))
    s["drop_path_rate"] = setting(fin, "drop_path_rate", 0.1)
    s["layer_decay"] = setting(fin, "layer_decay", 0.75)
    s["finetune_betas"] = tuple(setting(fin, "betas", (0.9, 0.999)))
    if registry.get(preset).benchmark.sw_size is not None:  # sliding-window inference settings
        inf = bundle_parser(preset, "inference")
        s["sw_batch_size"] = setting(inf, "sw_batch_size", 4)
        s["sw_overlap"] = setting(inf, "sw_overlap", 0.5)
    for k, v in overrides.items():
        if v is not None:
            s[k] = v
    if (
        s.get("skip_hidden_states") and max(s["skip_hidden_states"]) >= s["num_layers"]
    ):  # a shrunken ViT: spread the skips
        n = s["num_layers"]
        s["skip_hidden_states"] = tuple(max(0, round(k * n / 12) - 1) for k in (4, 7, 10))  # blocks 4, 7, 10 of 12
    return s


def _lr_parts(cfg: dict):
    return dict(lr=1e-4, betas=cfg["betas"], weight_decay=cfg["weight_decay"])


def fused_adamw(params, device: torch.device, fused: bool, **kw) -> torch.optim.Optimizer:
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(params, foreach=device.type == "cuda" or None, **kw)


# ----------------------------------------------------------------------------- 1. MAE step
def build_mae_pair(cfg: dict, spatial_dims: int, device: torch.device):
    from monai.networks.nets import MaskedAutoEncoderViT

    from selfmedmae_components.networks import MaskedAutoencoder

    c = cfg
    ours = MaskedAutoencoder(
        c["in_channels"],
        c["roi_size"],
        c["patch_size"],
        spatial_dims,
        c["hidden_size"],
        c["num_layers"],
        c["num_heads"],
        c["mlp_ratio"],
        c["decoder_hidden_size"],
        c["decoder_num_layers"],
        c["decoder_num_heads"],
    ).to(device)
    theirs = MaskedAutoEncoderViT(
        in_channels=c["in_channels"],
        img_size=c["roi_size"],
        patch_size=c["patch_size"],
        hidden_size=c["hidden_size"],
        mlp_dim=int(c["hidden_size"] * c["mlp_ratio"]),
        num_layers=c["num_layers"],
        num_heads=c["num_heads"],
        decoder_hidden_size=c["decoder_hidden_size"],
        decoder_mlp_dim=int(c["decoder_hidden_size"] * c["mlp_ratio"]),
        decoder_num_layers=c["decoder_num_layers"],
        decoder_num_heads=c["decoder_num_heads"],
        spatial_dims=spatial_dims,
        qkv_bias=True,
    ).to(device)
    return ours, theirs


def mae_variants(cfg, preset, device, batch, mask_ratios, amp, fused, compile_, log) -> list[Variant]:
    from selfmedmae_components.optim import param_groups_weight_decay

    sd = registry.get(preset).geometry.spatial_dims
    torch.manual_seed(0)
    ours, theirs = build_mae_pair(cfg, sd, device)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    log(f"MAE: ours {n_ours / 1e6:.1f} M trainable parameters, MONAI {n_theirs / 1e6:.1f} M")
    x = torch.rand(batch, cfg["in_channels"], *cfg["roi_size"], device=device)
    kw = _lr_parts(cfg)
    opt_ours = fused_adamw(
        param_groups_weight_decay(ours, kw["lr"], kw["weight_decay"]), device, fused, betas=kw["betas"]
    )
    opt_theirs = torch.optim.AdamW(theirs.parameters(), **kw)  # what a MONAI user writes: torch's default
    phase_ours: dict = {}
    phase_theirs: dict = {}
    timed_optimizer(opt_ours, device, phase_ours)
    timed_optimizer(opt_theirs, device, phase_theirs)
    fast = autocast_dtype(device, amp)
    compiled = torch.compile(ours) if compile_ else None
    batchdata = {"image": x}
    groups = []
    for mr in mask_ratios:
        info = dict(mask_ratio=mr, visible_tokens=int(ours.encoder.num_patches * (1 - mr)))

        def ours_variant(
            amp_on: bool, net: torch.nn.Module, suffix: str = "", mr: float = mr, info: dict = info
        ) -> Variant:
            step = MAETrainingStep(mask_ratio=mr, amp=amp_on)
            engine = SimpleNamespace(
                state=SimpleNamespace(device=device), non_blocking=True, network=net, optimizer=opt_ours
            )
            eager = SimpleNamespace(**{**engine.__dict__, "network": ours})
            prec = _prec(step.dtype(device))
            return Variant(
                f"ours {_short(prec)}{suffix}",
                lambda: step(engine, batchdata),
                x.shape[0],
                prec,
                f"mae {mr}",
                flops=lambda: count_flops(lambda: step(eager, batchdata)),
                phase=phase_ours,
                info=info,
            )

        def monai_variant(dtype: torch.dtype | None, mr: float = mr, info: dict = info) -> Variant:
            def run() -> None:
                opt_theirs.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    pred, mask = theirs(x, masking_ratio=mr)
                    loss = ours.forward_loss(x, pred, mask.float())  # the same normalised-pixel masked MSE
                loss.backward()
                opt_theirs.step()

            prec = _prec(dtype)
            return Variant(
                f"MONAI MaskedAutoEncoderViT {_short(prec)}",
                run,
                x.shape[0],
                prec,
                f"mae {mr}",
                flops=lambda: count_flops(run),
                phase=phase_theirs,
                info=info,
            )

        group = [monai_variant(None), ours_variant(False, ours)]
        if amp and fast is not None:
            group += [monai_variant(fast), ours_variant(True, ours)]
        if compiled is not None:
            group.append(ours_variant(bool(amp and fast is not None), compiled, " + compile"))
        groups.append(group)
    return groups


def _prec(dtype: torch.dtype | None) -> str:
    return str(dtype or torch.float32).replace("torch.", "")


def _short(prec: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(prec, prec)


# ----------------------------------------------------------------------------- 2. fine-tuning step
def finetune_variants(cfg, preset, device, batch, amp, fused, compile_, log) -> list[Variant]:
    from selfmedmae_components.networks import UNETR, ViTClassifier
    from selfmedmae_components.optim import param_groups_layer_decay

    torch.manual_seed(0)
    c = cfg
    labels = registry.get(preset).geometry.labels
    if labels == "multilabel":  # a label vector per image: the classifier
        net = ViTClassifier(
            c["in_channels"],
            c["out_channels"],
            c["roi_size"],
            c["patch_size"],
            c["hidden_size"],
            c["num_layers"],
            c["num_heads"],
            c["mlp_ratio"],
            c["drop_path_rate"],
        ).to(device)
        x = torch.rand(batch, c["in_channels"], *c["roi_size"], device=device)
        y = (torch.rand(batch, c["out_channels"], device=device) < 0.2).float()
        label = "ours ViTClassifier"
    else:
        net = UNETR(
            c["in_channels"],
            c["out_channels"],
            c["roi_size"],
            c["feature_size"],
            c["hidden_size"],
            c["num_layers"],
            c["num_heads"],
            c["mlp_ratio"],
            c["drop_path_rate"],
            skip_hidden_states=c["skip_hidden_states"],
        ).to(device)
        x = torch.rand(batch, c["in_channels"], *c["roi_size"], device=device)
        if labels == "regions":  # a binary channel per output
            y = (torch.rand(batch, c["out_channels"], *c["roi_size"], device=device) < 0.1).float()
        else:
            y = torch.randint(0, c["out_channels"], (batch, 1, *c["roi_size"]), device=device).float()
        label = "ours UNETR"
    loss_fn = bundle_parser(preset, "finetune").get_parsed_content("loss")
    groups = param_groups_layer_decay(net, 1e-4, c["weight_decay"], c["layer_decay"])
    opt = fused_adamw(groups, device, fused, betas=c["finetune_betas"])
    phase: dict = {}
    timed_optimizer(opt, device, phase)
    log(
        f"fine-tune: {label}, {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters, loss {type(loss_fn).__name__}"
    )
    out = []
    nets = [(net, "")] + ([(torch.compile(net), " + compile")] if compile_ else [])
    for amp_on in [False] + ([True] if amp and autocast_dtype(device, True) else []):
        for n, suffix in nets:
            step = TrainingStep(amp=amp_on)
            engine = SimpleNamespace(
                state=SimpleNamespace(device=device), non_blocking=True, network=n, optimizer=opt, loss_function=loss_fn
            )
            flop_engine = SimpleNamespace(**{**engine.__dict__, "network": net})
            bd = {"image": x, "label": y}
            prec = str(step.dtype(device) or torch.float32).replace("torch.", "")
            out.append(
                Variant(
                    f"{label} {_short(prec)}{suffix}",
                    (lambda s=step, e=engine, b=bd: s(e, b)),
                    batch,
                    prec,
                    "finetune",
                    flops=lambda s=step, e=flop_engine, b=bd: count_flops(lambda: s(e, b)),
                    phase=phase,
                )
            )
    return out


# ----------------------------------------------------------------------------- 3. sliding window
def sw_volume(preset: str, size: tuple[int, ...], in_channels: int) -> torch.Tensor:
    """A CT- (or MR-) like volume of ``size`` voxels scaled as the network sees it, from the demo generator."""
    image = registry.get(preset).demo_module().network_input(np.random.default_rng(0), tuple(size))
    return torch.from_numpy(np.ascontiguousarray(image[:in_channels]))[None]


def n_windows(size, roi, overlap) -> int:
    n = 1
    for s, r in zip(size, roi):
        stride = max(int(r * (1 - overlap)), 1)
        n *= 1 if s <= r else math.ceil((s - r) / stride) + 1
    return n


def monai_unetr(cfg, device):
    from monai.networks.nets import UNETR as MonaiUNETR

    c = cfg
    return (
        MonaiUNETR(
            c["in_channels"],
            c["out_channels"],
            c["roi_size"],
            feature_size=c["feature_size"],
            hidden_size=c["hidden_size"],
            mlp_dim=int(c["hidden_size"] * c["mlp_ratio"]),
            num_heads=c["num_heads"],
            norm_name="instance",
            res_block=True,
            qkv_bias=True,
        )
        .to(device)
        .eval()
    )


def sw_variants(cfg, preset, device, amp, sw_measure_size, fast_overlap, fast_sw_batch, checkpoint, log):
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import ViT

    from selfmedmae_components.networks import UNETR

    c = cfg
    full = tuple(registry.get(preset).benchmark.sw_size)
    if sw_measure_size in (None, "auto"):
        # CPU: a centre crop with 2 x 2 x 1 windows at the bundle's overlap; CUDA: the whole volume
        measure = (
            full
            if device.type == "cuda"
            else tuple(
                min(f, r + int(r * (1 - c["sw_overlap"])) if i < 2 else r)
                for i, (f, r) in enumerate(zip(full, c["roi_size"]))
            )
        )
    elif sw_measure_size == "full":
        measure = full
    else:
        measure = tuple(int(s) for s in sw_measure_size)
    vol_full = sw_volume(preset, full, c["in_channels"])
    starts = [(f - m) // 2 for f, m in zip(full, measure)]
    vol = vol_full[(..., *[slice(s, s + m) for s, m in zip(starts, measure)])].contiguous().to(device)
    del vol_full
    extrapolated = measure != full

    torch.manual_seed(0)
    ours = (
        UNETR(
            c["in_channels"],
            c["out_channels"],
            c["roi_size"],
            c["feature_size"],
            c["hidden_size"],
            c["num_layers"],
            c["num_heads"],
            c["mlp_ratio"],
            0.0,
            skip_hidden_states=c["skip_hidden_states"],
        )
        .to(device)
        .eval()
    )
    if checkpoint:
        from selfmedmae_components.weights import load_state_dict

        ours.load_state_dict(load_state_dict(checkpoint, map_location=device))
        log(f"sliding window: our UNETR weights from {checkpoint}")
    theirs = monai_unetr(c, device)
    assert isinstance(theirs.vit, ViT)
    base_ov, base_bs = c["sw_overlap"], c["sw_batch_size"]
    roi = c["roi_size"]
    fast = autocast_dtype(device, amp)
    fast_name = str(fast)[6:] if fast else "fp32"
    outputs: dict[str, torch.Tensor] = {}

    def make(name, net, dtype, overlap, bs, mode, precision):
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=bs, overlap=overlap)
        if dtype is not None:
            inferer = AutocastInferer(inferer, amp=True)
        ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad

        def run():
            with ctx():
                out = inferer(vol, net)
            outputs[name] = out.argmax(1)

        w_measured, w_full = n_windows(measure, roi, overlap), n_windows(full, roi, overlap)
        win_flops = {}

        def flops():
            with torch.no_grad():
                win_flops["f"] = count_flops(lambda: net(vol[(..., *[slice(0, r) for r in roi])]))
            return win_flops["f"] * w_measured

        info = dict(
            overlap=overlap,
            sw_batch_size=bs,
            windows_measured=w_measured,
            windows_full=w_full,
            measured_size=list(measure),
            volume_size=list(full),
            extrapolated=extrapolated,
            grad_mode=mode,
        )
        return Variant(name, run, 1, precision, "sw", flops=flops, info=info)

    vs = [
        make(f"MONAI UNETR fp32 (ov {base_ov}, sw {base_bs})", theirs, None, base_ov, base_bs, "no_grad", "float32"),
        make(f"ours fp32 (ov {base_ov}, sw {base_bs})", ours, None, base_ov, base_bs, "inference_mode", "float32"),
    ]
    if fast is not None:
        vs.append(
            make(
                f"ours {fast_name} (ov {base_ov}, sw {base_bs})",
                ours,
                fast,
                base_ov,
                base_bs,
                "inference_mode",
                fast_name,
            )
        )
    big = fast_sw_batch or (4 * base_bs if device.type == "cuda" else None)
    if big and big != base_bs:
        vs.append(
            make(f"ours {fast_name} (ov {base_ov}, sw {big})", ours, fast, base_ov, big, "inference_mode", fast_name)
        )
    if fast_overlap is not None and fast_overlap != base_ov:
        vs.append(
            make(
                f"ours {fast_name} (ov {fast_overlap}, sw {base_bs}) [trade-off]",
                ours,
                fast,
                fast_overlap,
                base_bs,
                "inference_mode",
                fast_name,
            )
        )
    ref_name = vs[1].name
    return vs, outputs, ref_name, measure, full


def label_agreement(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> dict:
    """Mean Dice over the classes present in ``ref`` (background excluded) and voxel agreement."""
    dices = []
    for k in range(1, num_classes):
        r, p = ref == k, pred == k
        denom = r.sum() + p.sum()
        if r.any():
            dices.append(float(2 * (r & p).sum() / denom))
    return dict(
        dice_vs_ours_fp32=float(np.mean(dices)) if dices else None, voxel_agreement=float((pred == ref).float().mean())
    )


# ----------------------------------------------------------------------------- 4. data pipeline
def write_synthetic_data(preset: str, folder: Path, n: int) -> list[dict]:
    """``n`` cases of the preset's ``benchmark.data_shape`` (registry), written by its demo generator."""
    entry = registry.get(preset)
    rng = np.random.default_rng(0)
    return [entry.demo_module().write_case(folder, i, rng, entry.benchmark.data_shape) for i in range(n)]


def data_pipeline(preset: str, data_dir: str | None, n_volumes: int, items_per_config: int, log) -> list[dict]:
    from monai.utils import set_determinism

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir:
            from selfmedmae_components.data.common import load_datalist

            items = load_datalist(Path(data_dir) / "datalist.json", "training", data_dir)[:n_volumes]
        else:
            t = time.perf_counter()
            items = write_synthetic_data(preset, Path(tmp), n_volumes)
            log(f"data: wrote {len(items)} synthetic {preset} cases in {time.perf_counter() - t:.1f}s")
        for config in ("pretrain", "finetune"):
            try:
                parser = bundle_parser(preset, config, {"cache_rate": 1.0, "num_workers": 0})
                # the config's keys; else (cxr14) what the stage reads: pre-training the registry's pretrain_keys,
                # fine-tuning images and labels (the fallback ["image"] dropped cxr14's labels: finetune failed)
                default = list(registry.get(preset).geometry.pretrain_keys) if config == "pretrain" else list(items[0])
                keys = setting(parser, "train#keys") or setting(parser, "keys") or default
                data = [{k: d[k] for k in (keys if isinstance(keys, list) else [keys]) if k in d} for d in items]
                if config == "pretrain":  # what pre-training reads (cxr14: the images only)
                    data = [
                        {k: v for k, v in d.items() if k in registry.get(preset).geometry.pretrain_keys} for d in data
                    ]
                parser["train#data"] = data
                set_determinism(0)
                t = time.perf_counter()
                dataset = parser.get_parsed_content("train#dataset")
                cache_s = time.perf_counter() - t
                n_items, n_crops = 0, 0
                dataset[0]
                t = time.perf_counter()
                while n_items < items_per_config:
                    out = dataset[n_items % len(dataset)]
                    n_crops += len(out) if isinstance(out, list) else 1
                    n_items += 1
                el = time.perf_counter() - t
                sample = out[0] if isinstance(out, list) else out
                shape = list(sample["image"].shape)
                rows.append(
                    dict(
                        config=config,
                        cached_items=len(dataset),
                        cache_s=cache_s,
                        crops=n_crops,
                        seconds=el,
                        crops_per_s=n_crops / el,
                        crop_shape=shape,
                        workers=1,
                    )
                )
                log(
                    f"data {config}: {n_crops} crops {shape} in {el:.2f}s = {n_crops / el:.1f} crops/s per worker "
                    f"(caching {len(dataset)} items took {cache_s:.1f}s)"
                )
            except Exception as e:  # noqa: BLE001
                rows.append(dict(config=config, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                log(f"data {config}: FAILED {rows[-1]['error']}")
    return rows


# ----------------------------------------------------------------------------- table
def fmt(x, spec=".2f", none="-"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[dict], title: str, unit: str, extra: Callable[[dict], str] | None = None) -> None:
    print(f"\n{title}")
    head = f"{'variant':<52} {'prec':<9} {unit:>10} {'s/run (IQR)':>20} {'opt s':>6} {'x base':>7} {'mem MiB':>8} {'tot MiB':>8} {'TFLOP/s':>8} {'MFU':>6}"
    print(head + ("  " + "notes" if extra else ""))
    print("-" * len(head))
    for r in rows:
        if r.get("error"):
            print(f"{r['name']:<52} {r['precision']:<9} FAILED: {r['error']}")
            continue
        spread = f"{fmt(r['median_s'])} ({fmt(r['q1_s'])}-{fmt(r['q3_s'])})"
        line = (
            f"{r['name']:<52} {r['precision']:<9} {fmt(r.get('items_per_s'), '.3f'):>10} {spread:>20} "
            f"{fmt(r.get('optimizer_median_s')):>6} {fmt(r.get('speedup_vs_baseline')):>7} "
            f"{fmt(r.get('peak_mem_mib'), '.0f'):>8} {fmt(r.get('peak_mem_total_mib'), '.0f'):>8} "
            f"{fmt(r.get('tflops'), '.3g'):>8} {fmt(r.get('mfu'), '.1%'):>6}"
        )
        print(line + ("  " + extra(r) if extra else ""))


# ----------------------------------------------------------------------------- CLI
def main(
    preset: str = "btcv",
    batch: int = 2,
    mask_ratios: tuple | list | float = (0.75, 0.125),
    repeats: int = 3,
    warmup: int = 1,
    amp: bool = True,
    parts: str | tuple | list = "mae,finetune,sw,data",
    fused: bool = True,
    compile: bool = False,  # noqa: A002 - the CLI switch reads best as --compile
    device: str | None = None,
    threads: int | None = None,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    decoder_hidden_size: int | None = None,
    decoder_num_layers: int | None = None,
    decoder_num_heads: int | None = None,
    feature_size: int | None = None,
    finetune_repeats: int | None = None,
    finetune_batch: int | None = None,
    sw_repeats: int | None = None,
    sw_measure_size: Any = "auto",
    sw_fast_overlap: float | None = 0.25,
    sw_fast_batch: int | None = None,
    sw_warmup: int | None = None,
    roi_size: Any = None,
    checkpoint: str | None = None,
    data_dir: str | None = None,
    data_volumes: int = 2,
    data_items: int = 20,
    out: str | None = None,
) -> None:
    """Run the benchmark; see the module docstring. ``--out results.json`` writes every number."""
    errors.install()  # a user error ends the tool with "error: <message>", not a traceback (errors.py)
    preset = registry.get(preset).name  # a bundle folder names its dataset too; unknown: ValueError
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts)]
    unknown = set(parts) - {"mae", "finetune", "sw", "data"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from mae, finetune, sw, data.")
    mask_ratios = [float(m) for m in (mask_ratios if isinstance(mask_ratios, (list, tuple)) else [mask_ratios])]
    overrides = dict(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        decoder_hidden_size=decoder_hidden_size,
        decoder_num_layers=decoder_num_layers,
        decoder_num_heads=decoder_num_heads,
        feature_size=feature_size,
    )
    if roi_size is not None:  # e.g. --roi_size 32 for a quick check (tools/gpu_check.sh's dry run)
        roi = [int(r) for r in np.atleast_1d(roi_size)]
        overrides["roi_size"] = tuple(roi * registry.get(preset).geometry.spatial_dims if len(roi) == 1 else roi)
    cfg = preset_settings(preset, overrides)
    setup_run(0, dev)  # the bundles' backend settings: cuDNN autotuning, and on CUDA TF32 for float32
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    fast, precision_reason = precision_choice(dev, amp)
    # the CPU's bf16 capability and the precision chosen from it, so that numbers from two CPUs compare
    env = dict(
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        cpu_model=_cpu_model(),
        cpu_capability=cpu_capability(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        amp_dtype=str(fast) if fast else None,
        precision=precision_reason,
        float32_matmul="tf32" if dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "float32",
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    )
    try:
        import monai

        env["monai"] = monai.__version__
    except ImportError:
        pass
    log(
        f"{env['device_name']} ({env['cpu_model']}), {env['threads']} threads, torch {env['torch']}, amp {env['amp_dtype']}"
    )
    log(f"precision: {precision_reason}")
    log("settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if dev.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        env["load_average"] = load
        if load > cores and torch.get_num_threads() > 1:
            log(
                f"note: load average {load:.1f} on {cores} cores: threads wait for each other at every op; "
                "--threads 1 is faster and steadier on a shared CPU"
            )
    peaks = {"float32": matmul_peak_tflops(dev, torch.float32)}
    if fast is not None:
        peaks[str(fast)[6:]] = matmul_peak_tflops(dev, fast)
    log("matmul peak (TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))
    results: dict[str, Any] = dict(
        preset=preset, batch=batch, settings=cfg, env=env, matmul_peak_tflops=peaks, memory_kind=PeakMemory(dev).kind
    )

    if "mae" in parts:
        log(f"MAE step, batch {batch}, mask ratios {mask_ratios}")
        results["mae"] = []
        for group in mae_variants(cfg, preset, dev, batch, mask_ratios, amp, fused, compile, log):
            interleave(group, dev, warmup, repeats, log)
            rows = [summarize(v, group[0], peaks) for v in group]
            results["mae"] += rows
            print_table(
                rows,
                f"MAE pre-training step, {preset}, mask {group[0].info['mask_ratio']}, batch {batch}",
                "vol/s" if registry.get(preset).geometry.spatial_dims == 3 else "img/s",
            )
        group = None  # the models live in the variants' closures: let them go
        _gc(dev)
        save(results, out)
    if "finetune" in parts:
        ft_batch = finetune_batch or batch
        log(f"fine-tuning step, batch {ft_batch}")
        group = finetune_variants(cfg, preset, dev, ft_batch, amp, fused, compile, log)
        interleave(group, dev, warmup, finetune_repeats or (repeats if dev.type == "cuda" else min(repeats, 2)), log)
        results["finetune"] = [summarize(v, group[0], peaks) for v in group]
        print_table(results["finetune"], f"fine-tuning step, {preset}, batch {ft_batch}", "crops/s")
        del group
        _gc(dev)
        save(results, out)
    if "sw" in parts and registry.get(preset).benchmark.sw_size is not None:
        vs, outputs, ref_name, measure, full = sw_variants(
            cfg, preset, dev, amp, sw_measure_size, sw_fast_overlap, sw_fast_batch, checkpoint, log
        )
        log(f"sliding window: volume {full}, measured on {measure}, roi {cfg['roi_size']}")
        reps = sw_repeats or (repeats if dev.type == "cuda" else max(1, min(repeats, 2)))
        # CUDA: one untimed pass per variant (cuDNN autotuning, allocator, clocks); on a CPU a pass takes minutes
        interleave(vs, dev, sw_warmup if sw_warmup is not None else int(dev.type == "cuda"), reps, log)
        rows = []
        ref = outputs.get(ref_name)
        for v in vs:
            r = summarize(v, vs[0], peaks)
            if v.times:
                per_window = r["median_s"] / v.info["windows_measured"]
                r["s_per_volume"] = per_window * v.info["windows_full"] if v.info["extrapolated"] else r["median_s"]
                r["s_per_window"] = per_window
                r["items_per_s"] = 1 / r["s_per_volume"]  # volumes per second, whole volume
            same_windows = v.info["overlap"] == vs[1].info["overlap"] or not v.info["extrapolated"]
            if ref is not None and v.name in outputs and not v.name.startswith("MONAI") and same_windows:
                # ours: the same weights; an overlap change is only judged on the whole volume
                r.update(label_agreement(outputs[v.name].cpu(), ref.cpu(), cfg["out_channels"]))
            rows.append(r)
        base = rows[0].get("s_per_volume")
        for r in rows:
            if base and r.get("s_per_volume"):
                r["speedup_per_volume_vs_baseline"] = base / r["s_per_volume"]
        results["sliding_window"] = rows
        est = " est." if rows[0].get("extrapolated") else ""
        print_table(
            rows,
            f"sliding-window inference, {preset}, volume {'x'.join(map(str, full))}"
            + (f" (measured on a {'x'.join(map(str, measure))} crop)" if est else ""),
            "vol/s",
            extra=lambda r: (
                f"s/volume{est} {fmt(r.get('s_per_volume'), '.1f')}, x base {fmt(r.get('speedup_per_volume_vs_baseline'))}, "
                f"Dice vs ours fp32 {fmt(r.get('dice_vs_ours_fp32'), '.4f')}, agreement {fmt(r.get('voxel_agreement'), '.4f')}"
            ),
        )
        del vs, outputs
        _gc(dev)
        save(results, out)
    if "data" in parts:
        results["data"] = data_pipeline(preset, data_dir, data_volumes, data_items, log)
        mae_rows = [r for r in results.get("mae", []) if r["name"].startswith("ours") and not r.get("error")]
        pre = [r for r in results["data"] if r.get("config") == "pretrain" and r.get("crops_per_s")]
        if mae_rows and pre:
            need = max(r["items_per_s"] for r in mae_rows)
            workers = math.ceil(need / pre[0]["crops_per_s"])
            results["data_workers_needed"] = workers
            log(
                f"data: the fastest MAE step consumes {need:.2f} crops/s; one loader worker makes "
                f"{pre[0]['crops_per_s']:.1f}: {workers} worker(s) keep the model the bottleneck"
            )
    results["wall_s"] = time.perf_counter() - t_start
    log(f"done in {results['wall_s']:.0f}s")
    if out:
        save(results, out)
        log(f"wrote {out}")


def save(results: dict, out: str | None) -> None:
    """Write the results so far (after each part too: a run stopped by a time limit keeps the parts it finished)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)


def _gc(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    fire.Fire(main)
