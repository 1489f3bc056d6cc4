"""Resumable distributed sampler and per-sample seeding."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hpcvp.train.sampler import ResumableDistributedSampler, SeededSamples


def test_ranks_partition_the_epoch_and_epochs_differ():
    n, world = 103, 4
    samplers = [ResumableDistributedSampler(n, world, r, seed=5) for r in range(world)]
    for s in samplers:
        s.set_epoch(3)
    parts = [list(s) for s in samplers]
    assert all(len(p) == n // world for p in parts)
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat)  # disjoint
    again = [list(s) for s in samplers]
    assert parts == again  # pure function of (seed, epoch)
    samplers[0].set_epoch(4)
    assert list(samplers[0]) != parts[0]
    other_seed = ResumableDistributedSampler(n, world, 0, seed=6)
    other_seed.set_epoch(3)
    assert list(other_seed) != parts[0]


def test_resume_mid_epoch_yields_exactly_the_unconsumed_tail():
    s = ResumableDistributedSampler(50, 2, 1, seed=0)
    s.set_epoch(2)
    full = list(s)
    for position in (0, 1, 7, 24, 25):
        t = ResumableDistributedSampler(50, 2, 1, seed=0)
        t.load_state_dict({"epoch": 2, "position": position})
        assert list(t) == full[position:]
        assert len(t) == 25 - position
    with pytest.raises(ValueError):
        t.set_epoch(2, 26)


def test_no_drop_last_pads_by_wrapping():
    s = ResumableDistributedSampler(5, 2, 1, seed=0, drop_last=False)
    assert s.per_rank == 3 and len(list(s)) == 3
    with pytest.raises(ValueError, match="fewer than"):
        ResumableDistributedSampler(1, 2, 0)


def test_unshuffled_order():
    s = ResumableDistributedSampler(10, 2, 0, shuffle=False)
    assert list(s) == [0, 2, 4, 6, 8]


class _NoisyDataset(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()), random.random()])


def _load(num_workers, position):
    sampler = ResumableDistributedSampler(40, 2, 0, seed=3, with_sample_seeds=True)
    sampler.set_epoch(1, position)
    loader = DataLoader(SeededSamples(_NoisyDataset()), batch_size=4, sampler=sampler, num_workers=num_workers)
    return torch.cat(list(loader))


def test_sample_randomness_depends_only_on_seed_epoch_index():
    whole = _load(0, 0)
    assert whole[:, 1:].std() > 0  # the noise is there
    # resumed mid-epoch, and loaded by 2 worker processes: the same samples, bit for bit
    assert torch.equal(_load(0, 8), whole[8:])
    assert torch.equal(_load(2, 12), whole[12:])


def test_vectorised_seed_mix_equals_the_scalar_one():
    from hpcvp.train.rng import TAG_SAMPLE, mix_seed, mix_seed_many

    last = np.array([0, 1, 7, 2**31 - 1, 2**62 + 5, -1, -12345], dtype=np.int64)
    for prefix in [(), (TAG_SAMPLE,), (TAG_SAMPLE, 0, 3), (TAG_SAMPLE, 2**40, 17)]:
        assert mix_seed_many(prefix, last).tolist() == [mix_seed(*prefix, int(x)) for x in last]
