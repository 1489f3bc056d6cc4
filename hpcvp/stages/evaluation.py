"""Helpers for stages that run models outside the training step: evaluation data split over ranks
(each sample once), the engine's autocast policy, and the bare module under DDP/compile wrappers."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hpcvp.progress import Progress
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


def _batch_len(batch: Any) -> int:
    """Samples in a collated batch (the first tensor's leading size; 1 when there is none)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), None)
    elif isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.ndim else 1


class ProgressLoader:
    """A DataLoader whose iteration reports progress on rank 0 (hpcvp.progress: timestamped lines
    in a Slurm log, a bar on a terminal); every other attribute is the DataLoader's."""

    def __init__(self, loader: DataLoader, description: str, unit: str, enabled: bool):
        self.loader = loader
        self.description = description
        self.unit = unit
        self.enabled = enabled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        total = len(self.loader.sampler)  # type: ignore[arg-type]
        with Progress(total, self.description, self.unit, stream=sys.stdout, enabled=self.enabled) as progress:
            for batch in self.loader:
                yield batch
                progress.advance(_batch_len(batch))


def eval_loader(
    dataset: Dataset,
    env,
    batch_size: int,
    num_workers: int = 0,
    limit: int | None = None,
    progress: str = "evaluate",
    unit: str = "samples",
) -> ProgressLoader:
    """A DataLoader over this rank's share of ``limit`` items spread evenly over the dataset
    (all when limit is None or 0), in order; iterating it prints progress named ``progress`` on
    rank 0 (counting rank 0's share).

    Stages' ``evaluate`` hooks need no model-mode bookkeeping: the engine calls them with the
    model in eval mode, under no_grad and its autocast policy (Trainer._evaluate)."""
    indices = spread_indices(len(dataset), limit)  # type: ignore[arg-type]
    sampler = RankShardSampler(indices, env.rank, env.world_size)
    loader = make_loader(  # workers that survive Slurm's SIGTERM while the trainer decides to stop
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=False,
    )
    if env.world_size > 1:
        progress += f" (rank 0's share of {env.world_size})"
    return ProgressLoader(loader, progress, unit, enabled=env.rank == 0)


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
