"""Optimizer and per-iteration learning-rate schedules built from a TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from .config import TrainConfig


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay on matrices/kernels only; biases and norm scales (ndim <= 1) get none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.no_decay_on_norm_and_bias or cfg.weight_decay == 0:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "adamw":
        # fused kernels on CUDA: one launch for all parameters instead of several per tensor;
        # on CPU the foreach (multi-tensor) path instead of the per-parameter loop
        if device.type == "cuda":
            return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ValueError(f"TrainConfig.optimizer={cfg.optimizer!r}: unknown")


class WarmupCosine:
    """lr factor at iteration t: linear warm-up to 1, then cosine down to ``min_frac``.
    A class (not a lambda) so LambdaLR can put its fields into the scheduler's state_dict."""

    def __init__(self, total_steps: int, warmup_steps: int, min_frac: float):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_frac = min_frac

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (t - self.warmup_steps) / span)
        return self.min_frac + (1.0 - self.min_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupConstant:
    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LRScheduler:
    warmup_steps = round(cfg.warmup_frac * cfg.max_steps)
    if cfg.schedule == "onecycle":
        # OneCycleLR needs a non-empty warm-up phase; cycle momentum only where there is one
        total_steps = max(4, cfg.max_steps)
        pct_start = max(cfg.warmup_frac, 2.0 / total_steps)
        cycle_momentum = cfg.optimizer == "adamw" or cfg.momentum > 0
        return OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=min(pct_start, 0.99),
            cycle_momentum=cycle_momentum,
        )
    if cfg.schedule == "cosine":
        return LambdaLR(optimizer, WarmupCosine(cfg.max_steps, warmup_steps, cfg.min_lr_frac))
    if cfg.schedule == "constant":
        return LambdaLR(optimizer, WarmupConstant(warmup_steps))
    raise ValueError(f"TrainConfig.schedule={cfg.schedule!r}: unknown")
