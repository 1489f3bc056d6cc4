"""A tiny deterministic TrainTask and worker CLI, for the engine's tests and for checking a cluster
set-up (srun / submitit / requeue) without the competition's data or models.

    python -m hpcvp.train.toy --run-dir runs/toy/a --set max_steps=50 --set num_workers=0

exits 0 when training completed and EXIT_REQUEUE (75) when it was preempted (state saved).
Its dataset uses python, numpy and torch randomness per sample and the model has dropout and
batch norm, so a resumed run only matches an uninterrupted one if every RNG is handled.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from hpcvp.atomic import atomic_write_text

from .config import TrainConfig
from .dist import DistEnv, init_distributed, teardown
from .loop import Trainer
from .rundir import RunDir
from .signals import parse_signal


class ToyDataset(Dataset):
    """Fixed points in ``dim`` dimensions with 4 classes; noisy (augmented) when ``augment``."""

    def __init__(self, size: int, dim: int, seed: int = 1234, augment: bool = True):
        gen = torch.Generator().manual_seed(seed)
        self.centers = torch.randn(4, dim, generator=gen) * 2.0
        self.labels = torch.randint(0, 4, (size,), generator=gen)
        self.points = self.centers[self.labels] + torch.randn(size, dim, generator=gen)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        x = self.points[index].clone()
        if self.augment:
            x += 0.1 * torch.randn_like(x)
            x += torch.from_numpy(np.random.normal(0.0, 0.05, size=x.shape).astype(np.float32))
            if random.random() < 0.1:
                x = -x
        return {"x": x, "y": self.labels[index], "index": index}


class ToyModel(nn.Module):
    def __init__(self, dim: int, width: int, ballast_mb: float = 0.0, batch_norm: bool = True, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(dim, width),
            nn.BatchNorm1d(width) if batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, 4),
        )
        # dead weight that only makes checkpoints big (for the kill-during-write test)
        numel = int(ballast_mb * (1 << 20) / 4)
        self.register_buffer("ballast", torch.randn(numel) if numel else torch.zeros(0))

    def forward(self, x):
        return self.body(x)


class _SlowPickle:
    """Pickling it sleeps: stretches a checkpoint write so a test can kill the writer inside."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __reduce__(self):
        time.sleep(self.seconds)
        return (str, ("slept",))  # unpickles as a plain string


class ToyTask:
    def __init__(
        self,
        width: int = 32,
        dim: int = 16,
        dataset_size: int = 96,
        eval_size: int = 40,
        ballast_mb: float = 0.0,
        slow_extra_s: float = 0.0,
        signal_at: dict[int, tuple[int | None, int]] | None = None,
        batch_norm: bool = True,
        dropout: float = 0.2,
        step_sleep_s: float = 0.0,
        nan_at: tuple[int, int, int | None] | None = None,
    ):
        self.width = width
        self.dim = dim
        self.dataset_size = dataset_size
        self.eval_size = eval_size
        self.ballast_mb = ballast_mb
        self.slow_extra_s = slow_extra_s
        self.signal_at = signal_at or {}  # step -> (rank or None for all, signal number)
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.step_sleep_s = step_sleep_s  # slows steps so a test can signal from outside
        self.nan_at = nan_at  # (first step, last step, rank or None for all): those losses are NaN
        self.seen_steps = 0

    def build_model(self) -> nn.Module:
        return ToyModel(self.dim, self.width, self.ballast_mb, self.batch_norm, self.dropout)

    def train_dataset(self) -> Dataset:
        return ToyDataset(self.dataset_size, self.dim)

    def loss(self, model, batch, device):
        x, y = batch["x"].to(device), batch["y"].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.nan_at is not None and self.nan_at[0] <= self.seen_steps + 1 <= self.nan_at[1]:
            rank = dist.get_rank() if dist.is_initialized() else 0
            if self.nan_at[2] in (None, rank):
                loss = loss * float("nan")
        return loss, {"acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(self, model, env: DistEnv, run: RunDir, step: int) -> dict[str, float]:
        data = ToyDataset(self.eval_size, self.dim, seed=99, augment=False)
        idx = list(range(env.rank, len(data), env.world_size))
        x = torch.stack([data[i]["x"] for i in idx]).to(env.device)
        y = torch.stack([data[i]["y"] for i in idx]).to(env.device)
        torch.rand(3)  # eval may draw random numbers; must not shift training's streams
        counts = torch.tensor([(model(x).argmax(1) == y).sum().item(), len(idx)], dtype=torch.float64)
        if env.distributed:
            dist.all_reduce(counts)
        acc = float(counts[0] / counts[1])
        if env.is_main:
            run.pictures.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run.pictures / f"eval_{step:08d}.json", json.dumps({"val_acc": acc}))
        return {"val_acc": acc}

    def identity(self) -> dict:
        return {
            "task": "toy",
            "model": {
                "width": self.width,
                "dim": self.dim,
                "ballast_mb": self.ballast_mb,
                "batch_norm": self.batch_norm,
                "dropout": self.dropout,
            },
            "data": {"dataset_size": self.dataset_size},
        }

    def extra_state(self):
        state = {"seen_steps": self.seen_steps}
        if self.slow_extra_s > 0:
            state["slow"] = _SlowPickle(self.slow_extra_s)
        return state

    def load_extra_state(self, state) -> None:
        self.seen_steps = int(state["seen_steps"])

    def after_step(self, model, step: int, env: DistEnv) -> None:
        self.seen_steps += 1
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if step in self.signal_at:
            rank, signum = self.signal_at[step]
            if rank is None or rank == env.rank:
                os.kill(os.getpid(), signum)


def _parse_signal_at(text: str, rank: str, name: str) -> dict[int, tuple[int | None, int]]:
    if not text:
        return {}
    signum = int(parse_signal(name))
    which = None if rank == "all" else int(rank)
    return {int(s): (which, signum) for s in text.split(",") if s.strip()}


def _parse_nan_at(text: str) -> tuple[int, int, int | None] | None:
    """ "FIRST[-LAST][:RANK]" -> (first, last, rank or None)."""
    if not text:
        return None
    steps, _, rank = text.partition(":")
    first, _, last = steps.partition("-")
    return int(first), int(last or first), (int(rank) if rank else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcvp.train.toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--dataset-size", type=int, default=96)
    parser.add_argument("--ballast-mb", type=float, default=0.0)
    parser.add_argument("--slow-extra-s", type=float, default=0.0)
    parser.add_argument("--signal-at", default="", help="steps after which to signal ourselves")
    parser.add_argument("--signal-rank", default="all", help="rank that signals itself, or 'all'")
    parser.add_argument("--signal", default="USR2", help="USR2, TERM, ...")
    parser.add_argument("--no-batch-norm", action="store_true")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--step-sleep-s", type=float, default=0.0)
    parser.add_argument("--nan-at", default="", metavar="FIRST[-LAST][:RANK]", help="NaN losses")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override (repeatable)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = TrainConfig().with_overrides(args.set)
    env = init_distributed(timeout_minutes=cfg.dist_timeout_minutes)
    try:
        task = ToyTask(
            width=args.width,
            dim=args.dim,
            dataset_size=args.dataset_size,
            ballast_mb=args.ballast_mb,
            slow_extra_s=args.slow_extra_s,
            signal_at=_parse_signal_at(args.signal_at, args.signal_rank, args.signal),
            batch_norm=not args.no_batch_norm,
            dropout=args.dropout,
            step_sleep_s=args.step_sleep_s,
            nan_at=_parse_nan_at(args.nan_at),
        )
        result = Trainer(task, cfg, RunDir(args.run_dir), env).fit()
    except Exception:
        traceback.print_exc()
        teardown(sync=False)
        return 1
    print("HPCVP_RESULT " + json.dumps({"rank": env.rank, "backend": env.backend, **result.__dict__}), flush=True)
    teardown()
    return result.exit_code


if __name__ == "__main__":
    # run the importable module's main so pickled classes resolve as hpcvp.train.toy.*
    from hpcvp.train.toy import main as _main

    sys.exit(_main())


def tree_differences(a, b, prefix: str = "") -> list[str]:
    """Paths where two nested dict/list/tensor structures differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [prefix or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{prefix}.{key}")
            else:
                out.extend(tree_differences(a[key], b[key], f"{prefix}.{key}"))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{prefix}<len {len(a)} != {len(b)}>"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(tree_differences(x, y, f"{prefix}[{i}]"))
        return out
    return [] if a == b else [prefix or "<root>"]
