"""TrainConfig: everything the loop owns (the stage owns model/data settings).

Stages nest it (``cfg.train``); ``from_dict`` rejects unknown keys and ``with_overrides`` applies
``key=value`` strings typed by the field's declared type (hpcvp.config_overrides), so CLI overrides fail with the key named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from hpcvp.config_overrides import apply_overrides

from .signals import parse_signal

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
AMP_MODES = ("auto", "fast", "bf16", "fp16", "off")
PROGRESS_MODES = ("auto", "bar", "plain", "off")
NONFINITE_MODES = ("stop", "warn")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (each = grad_accum micro-batches per rank)
    batch_size: int = 32  # per rank, per micro-batch
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # stepped once per optimizer step
    warmup_frac: float = 0.05  # onecycle pct_start; cosine/constant linear warm-up fraction
    min_lr_frac: float = 0.0  # cosine: final lr = lr * min_lr_frac
    no_decay_on_norm_and_bias: bool = True  # parameters with ndim <= 1 get weight_decay 0
    grad_accum: int = 1
    # CUDA: split batch_size into micro-batches (grad_accum) that fit the card, keeping the
    # effective batch (stages that know their model's memory: SimVP full)
    auto_micro_batch: bool = False
    clip_grad: float = 1.0  # max global grad norm; 0 disables
    # fast / None = the device's fast path (hpcvp.train.fastpath: bf16 on CUDA cc >= 8 and on CPUs
    # with AMX, fp16 + GradScaler on cc 7.x; channels_last and compile per fast_path_model, as
    # tools/bench_models.py shows); auto = the fast path's amp on CUDA, fp32 on CPU
    amp: str = "auto"
    channels_last: bool | None = False
    compile: bool | None = False  # a compile failure falls back to eager with one warning
    compile_backend: str = "inductor"
    # which model's measurements pick channels_last / compile on CUDA (hpcvp.train.fastpath
    # CUDA_FAST_PATHS: unet, simvp; default = bf16 only, what RAFT's row shows)
    fast_path_model: str = "default"
    deterministic: bool = False  # deterministic CUDA kernels (slower); CPU runs are anyway
    sync_batchnorm: bool = False
    find_unused_parameters: bool = False
    eval_every: int = 0  # steps; 0 = only at the end
    eval_at_end: bool = True
    save_every_steps: int = 500  # 0 disables step-based saves
    save_every_minutes: float = 10.0  # 0 disables time-based saves (rank 0's clock decides)
    keep_last: int = 3  # complete checkpoints kept (>= 2 so a corrupt latest has a fallback)
    # K > 0: also save at 1/K, 2/K, ..., K/K of max_steps and never prune those checkpoints
    # (predict's checkpoint ensemble averages them: weights far apart in the run differ most)
    snapshots: int = 0
    seed: int = 0
    shuffle: bool = True
    seed_samples: bool = True  # reseed RNGs per sample from (seed, epoch, index)
    num_workers: int = 2
    prefetch_factor: int = 2
    log_every: int = 50  # steps between metrics.jsonl lines / progress updates
    progress: str = "auto"  # auto: rich bar on a TTY, plain lines otherwise
    wandb: bool = False  # metrics also to Weights & Biases when wandb is installed (offline on compute nodes)
    wandb_project: str = "hpcvp"  # the W&B project; the run is named <stage>/<run name>
    preempt_signal: str = "USR2"  # plus SIGTERM; never USR1 (NCCL uses it)
    dist_timeout_minutes: float = 30.0
    # a NaN/inf training loss: stop (every rank raises, no checkpoint of the broken weights is
    # written, the job ends FAILED) or warn and train on
    nonfinite_loss: str = "stop"

    def __post_init__(self) -> None:
        self.validate()

    def snapshot_steps(self) -> frozenset[int]:
        """The steps whose checkpoints ``snapshots`` keeps: round(i * max_steps / K), i = 1..K."""
        k = int(self.snapshots)
        return frozenset(max(1, round(i * self.max_steps / k)) for i in range(1, k + 1)) if k > 0 else frozenset()

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{key}={getattr(self, key)!r}: {why}")

        for key in ("max_steps", "batch_size", "grad_accum", "prefetch_factor"):
            if int(getattr(self, key)) < 1:
                raise bad(key, "must be >= 1")
        for key in ("eval_every", "save_every_steps", "num_workers", "log_every", "snapshots"):
            if int(getattr(self, key)) < 0:
                raise bad(key, "must be >= 0")
        if self.log_every < 1:
            raise bad("log_every", "must be >= 1")
        if self.keep_last < 2:
            raise bad("keep_last", "must be >= 2 (the previous checkpoint is the fallback)")
        if self.lr <= 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0 or self.clip_grad < 0 or self.save_every_minutes < 0:
            raise ValueError("TrainConfig: weight_decay, clip_grad, save_every_minutes must be >= 0")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise bad("warmup_frac", "must be in [0, 1)")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise bad("min_lr_frac", "must be in [0, 1]")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"choose one of {SCHEDULES}")
        if self.amp not in AMP_MODES:
            raise bad("amp", f"choose one of {AMP_MODES}")
        from .fastpath import CUDA_FAST_PATHS

        if self.fast_path_model not in CUDA_FAST_PATHS:
            raise bad("fast_path_model", f"choose one of {tuple(CUDA_FAST_PATHS)}")
        if self.progress not in PROGRESS_MODES:
            raise bad("progress", f"choose one of {PROGRESS_MODES}")
        if self.nonfinite_loss not in NONFINITE_MODES:
            raise bad("nonfinite_loss", f"choose one of {NONFINITE_MODES}")
        try:
            parse_signal(self.preempt_signal)
        except ValueError as exc:
            raise ValueError(f"TrainConfig.{exc}") from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def with_overrides(self, overrides: Iterable[str] | dict[str, Any]) -> TrainConfig:
        """New config with ``["lr=3e-4", "amp=off"]`` (or a dict) applied; values are parsed by
        the field's type (bools accept true/false/1/0/yes/no). The package's one override parser."""
        return apply_overrides(self, overrides, source="override")
