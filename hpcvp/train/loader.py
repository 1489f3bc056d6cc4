"""DataLoaders whose worker processes outlive the signals that stop a job.

Slurm delivers SIGTERM (requeue, preemption, scancel) and the requeue signal to *every* process of
a step, DataLoader workers included. A worker killed by it makes its rank fail with "DataLoader
worker (pid N) is killed by signal" before the step boundary where the ranks agree to save. So
workers ignore those signals: the main process acts on them and shuts its workers down itself.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .rng import worker_init_fn as seed_worker
from .signals import parse_signal

# Stop signals a worker leaves to its main process (SIGINT: a Ctrl-C reaches the whole group).
WORKER_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class WorkerInit:
    """``worker_init_fn``: ignore the stop signals, seed numpy/python, then call the stage's own
    ``then`` (if any).  A class so that it pickles for spawn/forkserver worker contexts."""

    def __init__(self, then: Callable[[int], None] | None = None, preempt_signal: str | int = "USR2"):
        self.then = then
        self.signals = tuple(dict.fromkeys((*WORKER_IGNORED, parse_signal(preempt_signal))))

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        seed_worker(worker_id)
        if self.then is not None:
            self.then(worker_id)


def make_loader(
    dataset: Dataset,
    *,
    worker_init_fn: Callable[[int], None] | None = None,
    preempt_signal: str | int = "USR2",
    **kwargs: Any,
) -> DataLoader:
    """``DataLoader(dataset, **kwargs)`` with workers protected by :class:`WorkerInit` (composed
    with ``worker_init_fn``).  Every DataLoader built while a trainer runs should come from here."""
    return DataLoader(dataset, worker_init_fn=WorkerInit(worker_init_fn, preempt_signal), **kwargs)
