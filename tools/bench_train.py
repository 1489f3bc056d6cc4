#!/usr/bin/env python
"""Benchmark the training engine.

1. Loop overhead: hpcvp's Trainer against a bare hand-written PyTorch loop doing the same work
   (same model, data, optimizer, OneCycle schedule, grad clipping, data order style), timed per
   optimizer step in steady state, interleaved A/B rounds (order alternates each round).
   Single process, and optionally 2-process DDP (gloo) where the Trainer also pays its
   per-step stop/save agreement collective.
2. Checkpoint save/load time against checkpoint size (atomic save with fsync + CRC32; verified
   load), next to plain torch.save/torch.load of the same state.

    python tools/bench_train.py --out /work/bench_results/train.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcvp.train import (
    RunDir,
    TrainConfig,
    Trainer,
    init_distributed,
    single_process_env,
)
from hpcvp.train.checkpoint import load_checkpoint, save_checkpoint
from hpcvp.train.rng import seed_everything

# --------------------------------------------------------------------------- workload


class ImageMaskData(Dataset):
    """In-memory uint8 images and integer masks (like the competition's frames, smaller)."""

    def __init__(self, size: int, hw: int, classes: int = 8):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (size, 3, hw, hw), dtype=torch.uint8, generator=gen)
        self.masks = torch.randint(0, classes, (size, hw, hw), generator=gen)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


def make_net(kind: str = "conv", classes: int = 8, width: int = 32) -> nn.Module:
    if kind == "null":
        # next to no compute: what remains is the loop's own per-step cost
        return nn.Conv2d(3, classes, 1)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, classes, 1),
    )


def compute_loss(model, batch, device):
    x = batch["image"].to(device).float().div_(255)
    y = batch["mask"].to(device)
    return F.cross_entropy(model(x), y)


class BenchTask:
    def __init__(self, args, stamps: list):
        self.args = args
        self.stamps = stamps

    def build_model(self):
        return make_net(self.args.kind)

    def train_dataset(self):
        return ImageMaskData(self.args.samples, self.args.hw)

    def loss(self, model, batch, device):
        return compute_loss(model, batch, device), {}

    def evaluate(self, model, env, run, step):
        return {}

    def identity(self):
        return {"bench": 1}

    def after_step(self, model, step, env):
        self.stamps.append(_stamp())


def train_cfg(args) -> TrainConfig:
    return TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch,
        lr=1e-3,
        schedule="onecycle",
        clip_grad=1.0,
        num_workers=0,
        save_every_steps=0,
        save_every_minutes=0,
        eval_every=0,
        eval_at_end=False,
        log_every=50,
        progress="off",
        amp="off",
    )


def run_engine(args, env, workdir: Path) -> list[float]:
    stamps: list[float] = []
    run = RunDir(workdir / f"engine-{time.monotonic_ns()}")
    Trainer(BenchTask(args, stamps), train_cfg(args), run, env).fit()
    if env.is_main:
        shutil.rmtree(run.path, ignore_errors=True)
    return stamps


def run_bare(args, env) -> list[float]:
    """What one would write by hand: same model/optimizer/schedule/clipping/data, nothing else."""
    seed_everything(0)  # the Trainer's initial weights (TrainConfig.seed=0), for a fair race
    device = env.device
    model = make_net(args.kind).to(device)
    train_model = DDP(model) if env.distributed else model
    data = ImageMaskData(args.samples, args.hw)
    if env.distributed:
        sampler = DistributedSampler(data, env.world_size, env.rank, shuffle=True, drop_last=True)
    else:
        sampler = torch.utils.data.RandomSampler(data)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    cfg = train_cfg(args)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.max_steps, pct_start=cfg.warmup_frac
    )
    stamps, step, epoch = [], 0, 0
    while step < cfg.max_steps:
        if env.distributed:
            sampler.set_epoch(epoch)
        for batch in loader:
            loss = compute_loss(train_model, batch, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            stamps.append(_stamp())
            if step >= cfg.max_steps:
                break
        epoch += 1
    return stamps


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def steady_step_time(stamps: list[tuple[float, float]], skip: int) -> tuple[float, float]:
    """(wall, CPU) median seconds per step after ``skip`` warm-up steps.  Medians shrug off the
    spikes other processes cause; CPU time (this process, all threads) is what the loop itself
    costs even when a shared machine slows the wall clock."""
    wall = [b[0] - a[0] for a, b in zip(stamps[skip:], stamps[skip + 1 :])]
    cpu = [b[1] - a[1] for a, b in zip(stamps[skip:], stamps[skip + 1 :])]
    return statistics.median(wall), statistics.median(cpu)


def overhead_rounds(args, env, workdir: Path) -> list[tuple[float, float]]:
    rounds = []
    for r in range(args.rounds):
        order = ("bare", "engine") if r % 2 == 0 else ("engine", "bare")
        times = {}
        for kind in order:
            stamps = run_bare(args, env) if kind == "bare" else run_engine(args, env, workdir)
            times[kind] = steady_step_time(stamps, args.skip)
        rounds.append((times["bare"], times["engine"]))
        if env.is_main:
            print(
                f"  round {r}: bare {times['bare'][0] * 1e3:.2f} ms/step "
                f"(cpu {times['bare'][1] * 1e3:.2f}), engine {times['engine'][0] * 1e3:.2f} "
                f"ms/step (cpu {times['engine'][1] * 1e3:.2f})",
                flush=True,
            )
    return rounds


def _ddp_worker(rank: int, args, port: int, workdir: str, queue) -> None:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    env = init_distributed(
        env={
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        },
        use_cuda=False,
    )
    rounds = overhead_rounds(args, env, Path(workdir))
    if rank == 0:
        queue.put(rounds)
    dist.destroy_process_group()


def summarize(rounds) -> dict:
    out = {}
    for i, clock in enumerate(("wall", "cpu")):
        bare = [b[i] for b, _ in rounds]
        engine = [e[i] for _, e in rounds]
        ratios = [e[i] / b[i] - 1.0 for b, e in rounds]
        out[clock] = {
            "bare_ms": statistics.median(bare) * 1e3,
            "engine_ms": statistics.median(engine) * 1e3,
            "overhead_pct": statistics.median(ratios) * 100,
            "best_pct": (min(engine) / min(bare) - 1.0) * 100,
            "min_pct": min(ratios) * 100,
            "max_pct": max(ratios) * 100,
        }
    return out


# --------------------------------------------------------------------------- checkpoints


def bench_checkpoints(sizes_mb: list[int], repeats: int, workdir: Path) -> list[dict]:
    rows = []
    for size_mb in sizes_mb:
        numel = size_mb * (1 << 20) // 4
        chunk = 1 << 22  # 16 MB tensors, like a model's larger weights
        tensors = {f"w{i}": torch.randn(min(chunk, numel - i * chunk)) for i in range((numel + chunk - 1) // chunk)}
        state = {"step": 1, "model": tensors}
        timings = {"save": [], "load": [], "torch_save": [], "torch_load": []}
        for _ in range(repeats):
            root = workdir / f"ckpt-{size_mb}"
            t0 = time.perf_counter()
            path = save_checkpoint(root, 1, state, ranks=[{"rng": torch.get_rng_state()}])
            timings["save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loaded = load_checkpoint(path)
            timings["load"].append(time.perf_counter() - t0)
            assert torch.equal(loaded.state["model"]["w0"], tensors["w0"])
            del loaded
            plain = workdir / f"plain-{size_mb}.pt"
            t0 = time.perf_counter()
            torch.save(state, plain)
            timings["torch_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.load(plain, weights_only=True)
            timings["torch_load"].append(time.perf_counter() - t0)
            shutil.rmtree(root)
            plain.unlink()
        row = {"size_mb": size_mb}
        row.update({k: statistics.median(v) for k, v in timings.items()})
        rows.append(row)
        print(
            f"  {size_mb} MB: save {row['save']:.3f}s load {row['load']:.3f}s "
            f"(torch.save {row['torch_save']:.3f}s, torch.load {row['torch_load']:.3f}s)",
            flush=True,
        )
        del tensors, state
    return rows


# --------------------------------------------------------------------------- report


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps not timed")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hw", type=int, default=48)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--null-steps", type=int, default=300)
    parser.add_argument("--ddp", action="store_true", help="also 2-process DDP over gloo")
    parser.add_argument("--sizes-mb", default="10,100,500")
    parser.add_argument("--ckpt-repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    args.kind = "conv"
    torch.set_num_threads(args.threads)
    # Denormal floats slow CPU math several-fold and appear or not depending on the weights'
    # trajectory: flushing them keeps the race about the loop, not about luck.
    torch.set_flush_denormal(True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_", dir=args.workdir))
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    try:
        print("per-step cost of the loop itself (null model):", flush=True)
        null_args = argparse.Namespace(
            **{**vars(args), "kind": "null", "hw": 4, "steps": args.null_steps, "skip": 50, "samples": 4096}
        )
        null = summarize(overhead_rounds(null_args, single_process_env(), workdir))
        print("loop overhead, 1 process:", flush=True)
        single = summarize(overhead_rounds(args, single_process_env(), workdir))
        ddp = None
        if args.ddp:
            print("loop overhead, 2 processes (DDP, gloo):", flush=True)
            import socket

            import torch.multiprocessing as mp

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ctx = mp.get_context("spawn")
            queue = ctx.SimpleQueue()
            mp.start_processes(_ddp_worker, args=(args, port, str(workdir), queue), nprocs=2, start_method="spawn")
            ddp = summarize(queue.get())
        print("checkpoint save/load:", flush=True)
        sizes = [int(s) for s in args.sizes_mb.split(",") if s]
        ckpt_rows = bench_checkpoints(sizes, args.ckpt_repeats, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    own_us = (null["cpu"]["engine_ms"] - null["cpu"]["bare_ms"]) * 1e3
    cmd = "python tools/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Training engine (`tools/bench_train.py`)",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine_line()}",
        f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in load_before)}, at end "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs share the machine: the "
        "spread between rounds below is theirs)",
        f"- Command: `{cmd.strip()}`",
        f"- Workload: conv net (~{sum(p.numel() for p in make_net().parameters()) / 1e3:.0f}k params) "
        f"on {args.batch}x3x{args.hw}x{args.hw} images with per-pixel cross-entropy, AdamW, "
        f"OneCycle, grad clipping, fp32 on CPU (denormals flushed), DataLoader num_workers=0, "
        f"same initial weights, {args.threads} torch thread(s) per process; {args.steps} steps per run, first {args.skip} untimed, "
        f"{args.rounds} interleaved rounds (order alternates).",
        "",
        "### Loop overhead vs a bare PyTorch loop",
        "",
        "| setting | clock | bare loop ms/step | hpcvp Trainer ms/step | overhead (median of rounds) | best vs best | range over rounds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in (
        ("null model (1x1 conv, 16x3x4x4), 1 process", null),
        ("conv net, 1 process", single),
        ("conv net, 2 processes, DDP gloo", ddp),
    ):
        if summary is None:
            continue
        for clock in ("cpu", "wall"):
            s = summary[clock]
            lines.append(
                f"| {name} | {clock} | {s['bare_ms']:.2f} | {s['engine_ms']:.2f} | "
                f"{s['overhead_pct']:+.2f}% | {s['best_pct']:+.2f}% | "
                f"{s['min_pct']:+.2f}% .. {s['max_pct']:+.2f}% |"
            )
    lines += [
        "",
        f"Absolute per-step cost of the Trainer's own work (null model, medians): "
        f"{own_us:+.0f} us CPU per step at batch {args.batch}, i.e. "
        f"{own_us / 1e3 / single['cpu']['bare_ms'] * 100:+.2f}% of the conv net's "
        f"{single['cpu']['bare_ms']:.1f} ms step (this estimate does not suffer from the "
        "machine's step-to-step noise the direct race above has).",
        "",
        "Per run: median over steps of the per-step time (wall clock, and CPU time of the "
        "process); per setting: medians over rounds, and the overhead is the median over rounds "
        "of (Trainer / bare - 1); 'best vs best' compares the fastest round of each. On a shared "
        "machine the CPU-time rows are the more reliable ones.",
        "",
        "The Trainer's extra per-step work: per-sample and per-micro-step RNG seeding, the loss "
        "kept on device for logging, one small CPU all-reduce (stop flag, save-by-minutes "
        "decision) per step when distributed, a metrics line every 50 steps.",
        "",
        "### Checkpoint save / load vs size",
        "",
        "| state size | hpcvp save (tmp dir, fsync, CRC32, rename) | hpcvp load (CRC32 verify + torch.load) | plain torch.save | plain torch.load |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in ckpt_rows:
        mb = row["size_mb"]
        lines.append(
            f"| {mb} MB | {row['save']:.3f} s ({mb / row['save']:.0f} MB/s) | "
            f"{row['load']:.3f} s ({mb / row['load']:.0f} MB/s) | {row['torch_save']:.3f} s | "
            f"{row['torch_load']:.3f} s |"
        )
    lines += [
        "",
        f"Median of {args.ckpt_repeats} repeats; loads read a warm page cache (just written), so "
        "they measure CPU cost (deserialisation, CRC), not the disk. Plain torch.save does not "
        "fsync.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(report)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
