"""Helpers for stages that run models outside the training step: evaluation data split over ranks
(each sample once), the engine's autocast policy, and the bare module under DDP/compile wrappers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hpcvp.train.loader import make_loader


class RankShardSampler(Sampler):
    """Every index exactly once over all ranks (rank r takes r, r+W, ...), no padding.

    torch's DistributedSampler pads the last round by repeating samples, which would count those
    pixels twice in a confusion matrix; evaluation must see each sample once.
    """

    def __init__(self, indices: Sequence[int], rank: int, world_size: int):
        self.indices = list(indices)[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def spread_indices(total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(total)`` (all when limit is None or >= total)."""
    if limit is None or limit <= 0 or limit >= total:
        return list(range(total))
    return sorted({int(i) for i in np.linspace(0, total - 1, limit).round()})


def eval_loader(
    dataset: Dataset,
    env,
    batch_size: int,
    num_workers: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """A DataLoader over this rank's share of ``limit`` items spread evenly over the dataset
    (all when limit is None or 0), in order.

    Stages' ``evaluate`` hooks need no model-mode bookkeeping: the engine calls them with the
    model in eval mode, under no_grad and its autocast policy (Trainer._evaluate)."""
    indices = spread_indices(len(dataset), limit)  # type: ignore[arg-type]
    sampler = RankShardSampler(indices, env.rank, env.world_size)
    return make_loader(  # workers that survive Slurm's SIGTERM while the trainer decides to stop
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=False,
    )


def autocast(device: torch.device, amp: str):
    """The engine's amp policy for inference (hpcvp.train.fastpath.resolve_amp): auto = bf16 on
    CUDA cc >= 8, fp16 on cc 7.x, off on CPU."""
    from hpcvp.train.fastpath import resolve_amp

    amp = resolve_amp(amp, device) if amp != "fp16" or device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
