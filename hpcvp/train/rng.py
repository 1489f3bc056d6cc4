"""Seeding and RNG state capture.

Two rules make resumed runs bitwise equal to uninterrupted ones without depending on where a
random stream happened to be when the job was killed:
- every micro-step reseeds the global generators from (seed, rank, step, micro-step);
- every sample is loaded under generators seeded from (seed, epoch, index), whichever process
  (main or DataLoader worker) loads it.
RNG states are still captured per rank into checkpoints (and restored) for anything between.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic 64-bit hash of integers (splitmix64 finaliser chained over the parts)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def mix_seed_many(prefix: tuple[int, ...], last: np.ndarray) -> np.ndarray:
    """``[mix_seed(*prefix, x) for x in last]`` computed with numpy (uint64 wraps like & MASK)."""
    h = np.full(len(last), mix_seed(*prefix) if prefix else 0x9E3779B97F4A7C15, dtype=np.uint64)
    h ^= np.asarray(last, dtype=np.int64).astype(np.uint64)
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


# Domain tags keep the different seed families apart.
TAG_STEP = 1
TAG_SAMPLE = 2
TAG_LOADER = 3
TAG_INIT = 4


def seed_globals(seed64: int, cuda: bool = False) -> None:
    """Seed python, numpy and torch (CPU, and the current CUDA device when asked) quickly.

    torch.manual_seed walks every accelerator backend (~70 us); seeding the default CPU generator
    and the current CUDA device directly costs a few microseconds.
    """
    random.seed(seed64)
    np.random.seed(seed64 & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed64 >> 1)
    if cuda:
        torch.cuda.manual_seed(seed64 >> 1)


def seed_everything(seed: int) -> None:
    """Seed all generators including every CUDA device (used once, before building the model)."""
    seed64 = mix_seed(TAG_INIT, seed)
    random.seed(seed64)
    np.random.seed(seed64 & 0xFFFFFFFF)
    torch.manual_seed(seed64 >> 1)


def capture_rng_state() -> dict:
    """This process's generator states in a weights_only-loadable form (tensors, ints, tuples)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            # different GPU count per process after requeue: restore the current device only
            torch.cuda.set_rng_state(cuda_states[0])


class RngState:
    """This process's generators as a checkpoint part (per rank: each rank has its own)."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and python in a DataLoader worker from torch's per-worker seed (torch seeds only
    itself and `random`); per-sample seeding overrides this for every sample anyway."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
