"""What stages show: pictures (frames, masks) under the run dir, result tables, and rank-0 log lines."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcvp.eval.pictures import colorize_mask, image_to_uint8, save_grid


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


def log(env, message: str) -> None:
    if env is None or env.rank == 0:
        print(f"[hpcvp] {message}", file=sys.stderr, flush=True)
