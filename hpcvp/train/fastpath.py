"""Per-device fast-path defaults (mixed precision, channels_last, torch.compile) and micro-batching.

``TrainConfig.channels_last`` / ``compile`` set to ``None`` and ``amp="auto"`` mean "what
``tools/bench_models.py`` shows for this device type" (BENCHMARKS.md):

- CUDA, compute capability >= 8.0 (A100, H100/H200, L40S): bf16 autocast, and per model
  (``TrainConfig.fast_path_model``, from the H200 table in issue 14 / BENCHMARKS.md): U-Net
  channels_last, eager (1,139 samples/s vs 1,073 compiled, 515 fp32); SimVP-gSTA torch.compile,
  NCHW (122 / 112 samples/s compiled vs 65 with channels_last, 62 / 57 fp32); anything else
  (RAFT: 151 vs 121 fp32; channels_last and compile not measured) bf16 only.
- CUDA 7.x (V100, RTX 8000: no bf16): fp16 autocast with a GradScaler, the model's
  channels_last choice, no compile (not measured on these cards yet).
- CPU (``amp="fast"``; ``"auto"`` keeps fp32 on CPU): bf16 autocast where the CPU has AMX
  (SimVP-gSTA fast path 2.3x fp32 on the development VM, which has AMX; bf16 on AVX512-BF16
  without AMX was measured slower, 0.73x), channels_last, no compile (minutes of compilation on
  a few cores, repaid only after thousands of steps).

``plan_micro_batches`` splits a per-GPU batch into ``grad_accum`` micro-batches so that the full
SimVP fits a 32 GB V100 or a 40 GB A100, keeping the effective batch.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FastPath:
    amp: str  # "bf16" | "fp16" | "off"
    channels_last: bool
    compile: bool
    why: str


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX tiles for bf16, where bf16 autocast pays (AVX512-BF16 alone does
    not: 0.73x fp32 measured on such a CPU, issue 14)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read(1 << 16)
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "amx_bf16" in flags


def cpu_fast_path(cpuinfo: str | None = None) -> FastPath:
    """CPU defaults from tools/bench_simvp_compare.py / bench_models.py on the development VM
    (BENCHMARKS.md): bf16 autocast where the CPU has bf16 instructions, channels_last, eager
    (compiling takes minutes on a few cores and does not pay back)."""
    if cpu_has_bf16(cpuinfo):
        return FastPath("bf16", True, False, "CPU with AMX: bf16 autocast, channels_last, eager")
    return FastPath("off", True, False, "CPU without AMX: fp32, channels_last, eager")


# Per model on CUDA: (channels_last, compile) on cc >= 8.0, from tools/bench_models.py's H200 rows.
CUDA_FAST_PATHS = {
    "unet": (True, False),  # channels_last + bf16 1,139 samples/s, compile + bf16 1,073
    "simvp": (False, True),  # compile + bf16 122 / 112, channels_last + bf16 65 (no gain over bf16)
    "default": (False, False),  # only bf16 measured (RAFT 151 vs 121 fp32)
}


def device_fast_path(
    device: torch.device | str, props=None, cpuinfo: str | None = None, model: str = "default"
) -> FastPath:
    """The fast-path settings of ``model`` (a ``CUDA_FAST_PATHS`` key) on ``device``; ``props``
    stands in for ``torch.cuda.get_device_properties`` (``major``, ``minor``, ``name``) in tests,
    ``cpuinfo`` for /proc/cpuinfo."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_fast_path(cpuinfo)
    if props is None:
        props = torch.cuda.get_device_properties(device)
    channels_last, compile_ = CUDA_FAST_PATHS[model]
    layout = "channels_last" if channels_last else "NCHW"
    cc = f"{props.name} (cc {props.major}.{props.minor}), {model} model"
    if props.major >= 8:
        how = "torch.compile" if compile_ else "eager"
        return FastPath("bf16", channels_last, compile_, f"{cc}: bf16 autocast, {layout}, {how}")
    if props.major == 7:
        return FastPath("fp16", channels_last, False, f"{cc}: fp16 autocast + GradScaler (no bf16), {layout}, eager")
    return FastPath("off", False, False, f"{cc}: fp32")


def resolve_amp(amp: str, device: torch.device, props=None, cpuinfo: str | None = None) -> str:
    """``fast`` -> the device's fast path (bf16 on CPUs with AMX too); ``auto`` -> the same on
    CUDA, fp32 on CPU (small runs and tests keep fp32 numerics). ``fp16`` (autocast + GradScaler)
    is what pays on CUDA 7.x; on a CPU it runs, slowly, which lets the GradScaler path be tested."""
    if amp == "fast" or (amp == "auto" and torch.device(device).type == "cuda"):
        amp = device_fast_path(device, props, cpuinfo).amp
    elif amp == "auto":
        amp = "off"
    return amp


def effective_fast_path(cfg, device: torch.device | str, props=None, cpuinfo: str | None = None) -> FastPath:
    """What a run with TrainConfig ``cfg`` uses on ``device``: its amp (``resolve_amp``), and
    channels_last / compile from the device's fast path for ``cfg.fast_path_model`` where ``cfg``
    leaves them ``None``; ``why`` says which came from the device and which from the config. The
    Trainer calls this; tests pass ``props`` / ``cpuinfo`` to stand in for a card or a CPU."""
    fast = device_fast_path(device, props, cpuinfo, cfg.fast_path_model)
    set_by_config = [
        name
        for name, explicit in (
            ("amp", cfg.amp not in ("fast", "auto")),
            ("channels_last", cfg.channels_last is not None),
            ("compile", cfg.compile is not None),
        )
        if explicit
    ]
    why = f"device fast path: {fast.why}"
    if set_by_config:
        why += f"; set by the config: {', '.join(set_by_config)}"
    return FastPath(
        resolve_amp(cfg.amp, torch.device(device), props, cpuinfo),
        fast.channels_last if cfg.channels_last is None else bool(cfg.channels_last),
        fast.compile if cfg.compile is None else bool(cfg.compile),
        why,
    )


def compile_pays_back(
    compile_s: float, eager_step_s: float, compiled_step_s: float, max_steps: int, fraction: float = 0.02
) -> bool:
    """Whether compiling is repaid within the first ``fraction`` of a ``max_steps`` run."""
    saved = eager_step_s - compiled_step_s
    return saved > 0 and compile_s / saved <= fraction * max_steps


# ----------------------------------------------------------------------------- torch.compile


class CompiledWithFallback(nn.Module):
    """``torch.compile(module)`` that falls back to the eager module, with one warning, when
    compilation fails (compilation happens at the first call). The wrapped module is the plain
    one: its ``state_dict`` keys carry no ``_orig_mod.`` prefix, so compiled and eager runs save
    and resume the same checkpoints. ``compile_seconds`` is the first call's time (compilation
    included)."""

    def __init__(self, module: nn.Module, backend: str = "inductor", compiler=None):
        super().__init__()
        self.module = module
        compiler = compiler or torch.compile
        self.compile_error: str | None = None
        self.compile_seconds: float | None = None
        try:
            self._compiled = compiler(module, backend=backend)
        except Exception as error:
            self.fall_back(error)

    def fall_back(self, error: BaseException) -> None:
        """Train eagerly from now on (the Trainer calls this when the first backward fails to compile)."""
        self.compile_error = f"{type(error).__name__}: {error}"
        self._compiled = None
        warnings.warn(f"torch.compile failed, training eagerly instead ({self.compile_error[:300]})", stacklevel=3)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def forward(self, *args, **kwargs):
        if self._compiled is None:
            return self.module(*args, **kwargs)
        if self.compile_seconds is not None:
            return self._compiled(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as error:
            self.fall_back(error)
            return self.module(*args, **kwargs)
        self.compile_seconds = time.perf_counter() - start
        return out

    # checkpoints: the plain module's keys
    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


# ----------------------------------------------------------------------------- micro-batching

# Peak training memory of the full SimVP-gSTA at 160x240 (GB): fixed part (weights, AdamW state,
# workspace) + per sample, from the H200 measurements at batch 16 (issue 14: 46.8 GB fp32,
# 36.5 GB bf16, 22-24 GB compiled + bf16), fixed ~1.5 GB.
SIMVP_FULL_MEMORY_GB = {
    ("off", False): (1.5, (46.8 - 1.5) / 16),
    ("bf16", False): (1.5, (36.5 - 1.5) / 16),
    ("fp16", False): (1.5, (36.5 - 1.5) / 16),
    ("bf16", True): (1.5, (24.0 - 1.5) / 16),
    ("fp16", True): (1.5, (24.0 - 1.5) / 16),
}
MEMORY_HEADROOM = 0.85  # the allocator's fragmentation, cuDNN workspaces, the CUDA context


@dataclass(frozen=True)
class MicroBatchPlan:
    batch_size: int  # per micro-batch
    grad_accum: int
    why: str


def plan_micro_batches(
    batch_size: int,
    grad_accum: int,
    total_memory_bytes: int,
    fixed_gb: float,
    per_sample_gb: float,
    headroom: float = MEMORY_HEADROOM,
) -> MicroBatchPlan:
    """Split ``batch_size`` (per micro-batch) x ``grad_accum`` into the fewest micro-batches
    (a divisor of the effective batch) that fit ``headroom`` of the card's memory; the effective
    batch ``batch_size * grad_accum`` is kept."""
    effective = batch_size * grad_accum
    usable_gb = total_memory_bytes / 1e9 * headroom
    fits = max(int((usable_gb - fixed_gb) / per_sample_gb), 1) if per_sample_gb > 0 else effective
    for accum in range(max(grad_accum, 1), effective + 1):
        if effective % accum == 0 and effective // accum <= fits:
            micro = effective // accum
            break
    else:
        accum, micro = effective, 1
    need = fixed_gb + micro * per_sample_gb
    why = (
        f"batch {effective} per GPU = {accum} micro-batch(es) of {micro} (train.grad_accum={accum}): "
        f"~{need:.1f} GB of {total_memory_bytes / 1e9:.0f} GB ({headroom:.0%} usable)"
    )
    return MicroBatchPlan(micro, accum, why)


@dataclass(frozen=True)
class CardSpec:
    """What ``plan_micro_batches`` needs of a card (the fields of torch.cuda's device properties)."""

    name: str
    major: int
    minor: int
    total_memory: int  # bytes


# The --gpu-type names of Greene and Torch (hpcvp/cluster/profiles.json) whose memory is known,
# for the launcher's preview of the split; the job plans again from the card it gets. A100s come
# in 40 and 80 GB: the preview takes the smaller.
CARDS = {
    "v100": CardSpec("Tesla V100 32 GB", 7, 0, 32 * 10**9),
    "rtx8000": CardSpec("Quadro RTX 8000 48 GB", 7, 5, 48 * 10**9),
    "a100": CardSpec("A100 40 GB (80 GB cards fit more)", 8, 0, 40 * 10**9),
    "l40s": CardSpec("L40S 48 GB", 8, 9, 48 * 10**9),
    "h100": CardSpec("H100 80 GB", 9, 0, 80 * 10**9),
    "h200": CardSpec("H200 141 GB", 9, 0, 141 * 10**9),
}


def simvp_micro_batches(batch_size: int, grad_accum: int, amp: str, compiled: bool, props) -> MicroBatchPlan:
    """``plan_micro_batches`` for the full SimVP on a card with ``props.total_memory`` bytes."""
    fixed, per_sample = SIMVP_FULL_MEMORY_GB[
        (amp, compiled) if (amp, compiled) in SIMVP_FULL_MEMORY_GB else ("off", False)
    ]
    return plan_micro_batches(batch_size, grad_accum, props.total_memory, fixed, per_sample)
