"""A distributed sampler that can start in the middle of an epoch.

The epoch's order is a pure function of (seed, epoch); rank r takes every world_size-th index of
it (like torch's DistributedSampler).  ``position`` is the number of this rank's samples already
*consumed by the training loop* (not merely prefetched by the DataLoader), so a resume skips
exactly those and never replays them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .rng import TAG_SAMPLE, mix_seed, mix_seed_many, seed_globals


class ResumableDistributedSampler(Sampler):
    def __init__(
        self,
        dataset_len: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        with_sample_seeds: bool = False,
    ):
        if dataset_len < num_replicas:
            raise ValueError(f"dataset has {dataset_len} samples, fewer than the {num_replicas} ranks")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.dataset_len = int(dataset_len)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.with_sample_seeds = with_sample_seeds
        if drop_last:
            self.per_rank = self.dataset_len // self.num_replicas
        else:
            self.per_rank = -(-self.dataset_len // self.num_replicas)
        self.epoch = 0
        self.position = 0

    # --------------------------------------------------------------- state
    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if not 0 <= position <= self.per_rank:
            raise ValueError(f"sampler position {position} outside [0, {self.per_rank}]")
        self.epoch = int(epoch)
        self.position = int(position)

    def advance(self, count: int) -> None:
        """Record that the loop consumed ``count`` more samples of this epoch."""
        self.position += int(count)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """``state`` may also say the ``world_size`` it was saved with: over another number of
        ranks the same global progress in the epoch's order is re-split (not bitwise exact)."""
        position = int(state["position"])
        saved_world = int(state.get("world_size", self.num_replicas))
        if saved_world != self.num_replicas:
            position = min(self.per_rank, position * saved_world // self.num_replicas)
        self.set_epoch(state["epoch"], position)

    # --------------------------------------------------------------- order
    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of epoch ``epoch`` (before the split between ranks)."""
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(mix_seed(TAG_SAMPLE, self.seed, epoch) >> 1)
            order = torch.randperm(self.dataset_len, generator=gen).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.per_rank * self.num_replicas
        if total <= len(order):
            return order[:total]
        # pad by wrapping around so every rank gets per_rank samples (drop_last=False)
        return (order * (-(-total // len(order))))[:total]

    def rank_indices(self, epoch: int) -> list[int]:
        return self.epoch_order(epoch)[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator:
        indices = self.rank_indices(self.epoch)[self.position :]
        if not self.with_sample_seeds:
            return iter(indices)
        seeds = mix_seed_many((TAG_SAMPLE, self.seed, self.epoch), np.asarray(indices, dtype=np.int64))
        return zip(indices, seeds.tolist())

    def __len__(self) -> int:
        return self.per_rank - self.position


class SeededSamples(Dataset):
    """Wraps a map-style dataset; ``dataset[(index, seed)]`` seeds python/numpy/torch with the
    sample's seed, then returns ``dataset[index]``.  The sample's randomness (augmentation) is
    then the same whichever process loads it and however the run was interrupted."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, seed = key
        seed_globals(seed)
        return self.dataset[index]
