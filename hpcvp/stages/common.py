"""Pieces shared by the stages: evaluation data loading split over ranks, model loading from an
earlier stage's run dir, autocast, pictures, small tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hpcvp.eval.pictures import colorize_mask, image_to_uint8, save_grid
from hpcvp.train.loader import make_loader

DEFAULT_RUNS_ROOT = Path("runs")


def default_run(stage: str) -> str:
    return str(DEFAULT_RUNS_ROOT / stage / "default")


# ---------------------------------------------------------------------------------------------
# Distributed evaluation data


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum floats over ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


def barrier(env) -> None:
    if env.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, env) -> Any:
    if env.world_size > 1 and dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


# ---------------------------------------------------------------------------------------------
# Precision


def autocast(device: torch.device, amp: str):
    """The engine's amp policy for inference: auto = bf16 on CUDA, off on CPU."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
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


# ---------------------------------------------------------------------------------------------
# Earlier stages' models


class MissingRunError(FileNotFoundError):
    """An earlier stage's run dir (or its checkpoint) is absent."""


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_model_from_run(run_dir: str | os.PathLike, expected_stage: str | tuple[str, ...], device: torch.device):
    """Rebuild the model of an earlier stage's run dir and load its newest checkpoint.

    Returns (model in eval mode on ``device``, the run's stage config, checkpoint step). Raises
    MissingRunError when the run dir, its stage config or its checkpoints are absent.
    """
    from hpcvp.stages import get_stage, load_stage_config, read_stage_file
    from hpcvp.train.checkpoint import latest_step, load_model_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingRunError(f"{run_dir}: run dir not found")
    try:
        stage, cfg = load_stage_config(run_dir, expected_stage)
        data = read_stage_file(run_dir).get("data", {})
    except FileNotFoundError as exc:
        raise MissingRunError(str(exc)) from None
    if latest_step(run_dir) is None:
        raise MissingRunError(f"{run_dir}: no checkpoint yet (train the {stage} stage first)")
    spec = get_stage(stage)
    if spec.build_model is None:
        raise ValueError(f"{run_dir}: stage {stage!r} has no model to load")
    frame_size = tuple(data.get("frame_size") or ())
    if len(frame_size) != 2:
        raise ValueError(f"{run_dir}/stage_config.json: no data.frame_size recorded")
    model = spec.build_model(cfg, frame_size)
    step, state = load_model_state(run_dir)
    try:
        model.load_state_dict(_strip_prefixes(state), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{run_dir}: checkpoint does not fit the model its stage_config.json describes: {exc}"
        ) from None
    return model.to(device).eval(), cfg, step


def run_frame_size(run_dir: str | os.PathLike) -> tuple[int, int] | None:
    from hpcvp.stages import read_stage_file

    try:
        size = read_stage_file(Path(run_dir)).get("data", {}).get("frame_size")
    except (FileNotFoundError, ValueError):
        return None
    return tuple(size) if size else None


# ---------------------------------------------------------------------------------------------
# Pictures and tables


def picture_path(run, step: int, name: str) -> Path:
    return Path(run.pictures) / f"step{step:07d}_{name}.png"


def mask_image(mask: torch.Tensor) -> np.ndarray:
    return colorize_mask(mask.to(torch.uint8).cpu())


def frame_image(frame: torch.Tensor) -> np.ndarray:
    """uint8 (H,W,3) or float (3,H,W) in [0,1] -> (H,W,3) uint8."""
    if frame.dtype == torch.uint8:
        return image_to_uint8(frame.cpu())
    return image_to_uint8(frame.detach().float().cpu())


def save_picture(path: Path, rows: list[list], titles=None) -> None:
    try:
        save_grid(path, rows, titles)
    except Exception as exc:  # a picture must never kill a training run
        print(f"[hpcvp] could not write picture {path}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal, the markdown text otherwise (logs stay greppable)."""
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            for header in headers:
                table.add_column(str(header))
            for row in rows:
                table.add_row(
                    *[
                        ("n/a" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}")
                        if isinstance(v, float)
                        else str(v)
                        for v in row
                    ]
                )
            Console().print(table)
            return
        except ImportError:
            pass
    print(f"{title}\n{markdown_table(headers, rows)}", flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def log(env, message: str) -> None:
    if env is None or env.rank == 0:
        print(f"[hpcvp] {message}", file=sys.stderr, flush=True)
