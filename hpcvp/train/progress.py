"""Training progress on rank 0: a rich bar on a terminal, plain lines in batch logs.

A redrawn bar in a Slurm log file becomes megabytes of carriage returns, so when stdout is not a
TTY we print one line per update instead (the trainer updates every ``log_every`` steps).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN / inf
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class TrainProgress:
    """``update(step, loss, samples_per_s)`` after each logged step; ``close()`` at the end."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        description: str = "train",
        mode: str = "auto",
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.total = int(total_steps)
        self.start_step = int(start_step)
        self.description = description
        self.stream = stream if stream is not None else sys.stdout
        if not enabled or mode == "off":
            self.mode = "off"
        elif mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            self.mode = "bar" if isatty is not None and isatty() else "plain"
        else:
            self.mode = mode
        self._t0 = time.monotonic()
        self._rich = None
        self._task = None
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} samples/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                refresh_per_second=4,
            )
            self._task = self._rich.add_task(
                description, total=self.total, completed=self.start_step, loss="-", rate="-"
            )
            self._rich.start()

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self._t0) / done * (self.total - step)

    def update(self, step: int, loss: float | None = None, samples_per_s: float | None = None, extra: str = "") -> None:
        if self.mode == "off":
            return
        loss_text = "-" if loss is None else f"{loss:.4g}"
        rate_text = "-" if samples_per_s is None else f"{samples_per_s:.1f}"
        if self._rich is not None:
            self._rich.update(self._task, completed=step, loss=loss_text, rate=rate_text)
            return
        pct = 100.0 * step / max(1, self.total)
        line = (
            f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {self.description} step {step}/{self.total} "
            f"({pct:.1f}%) loss {loss_text} {rate_text} samples/s "
            f"eta {format_duration(self.eta_seconds(step))}"
        )
        if extra:
            line += " " + extra
        print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A one-off line (resume, save, preemption) that does not break the bar."""
        if self.mode == "off":
            return
        if self._rich is not None:
            self._rich.console.print(text)
        else:
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
