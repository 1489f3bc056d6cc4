"""Progress output for long jobs: a rich bar on a terminal, plain timestamped lines in batch logs.

Slurm writes stdout/stderr to files, where a redrawn bar becomes megabytes of carriage returns;
there we print plain lines instead. Two front ends share that choice and the bar:
``Progress`` counts items (packing, verifying, staging, generating) and prints a line every
``log_every_s`` seconds; ``TrainProgress`` follows training steps and prints a line per update
(the trainer updates every ``log_every`` steps). While a training bar is drawn on a terminal, an
item ``Progress`` (an evaluation inside training) prints its lines above that bar instead of
drawing a second one.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

# The console of the training bar being drawn, if any (one live display per terminal).
_active_bar_console = None


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def timestamp(with_date: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN / inf
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _rich_bar(stream: TextIO, description_style: str, *middle_columns: str, **options: Any):
    """A started-later rich Progress: description, bar, m/n, ``middle_columns``, elapsed, remaining."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn(description_style),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(text) for text in middle_columns),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(file=stream),
        **options,
    )


class Progress:
    """``with Progress(total, "pack", unit="videos") as p: p.advance(1)`` (stderr by default)."""

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "items",
        stream: TextIO | None = None,
        enabled: bool = True,
        log_every_s: float = 10.0,
        force_plain: bool = False,
    ):
        self.total = max(int(total), 0)
        self.description = description
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.log_every_s = log_every_s
        self.done = 0
        self._start = 0.0
        self._last_log = 0.0
        self._rich = None
        self._task = None
        self._use_rich = enabled and not force_plain and is_terminal(self.stream)
        self._console = None  # print lines through the training bar's console

    def __enter__(self) -> Progress:
        self._start = self._last_log = time.monotonic()
        if self._use_rich and _active_bar_console is not None:
            self._use_rich, self._console = False, _active_bar_console
        if self._use_rich:
            self._rich = _rich_bar(self.stream, "{task.description}", self.unit, transient=False)
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total)
        return self

    def advance(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            self._write_line(now)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and exc_type is None:
            self._write_line(time.monotonic())

    def _write_line(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        line = (
            f"[{timestamp()}] {self.description}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{rate:.1f} {self.unit}/s, elapsed {elapsed:.0f}s, eta {remaining:.0f}s"
        )
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False)
            return
        self.stream.write(line + "\n")
        self.stream.flush()


class TrainProgress:
    """``update(step, loss, samples_per_s)`` after each logged step; ``close()`` at the end (stdout)."""

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
            self.mode = "bar" if is_terminal(self.stream) else "plain"
        else:
            self.mode = mode
        self._t0 = time.monotonic()
        self._rich = None
        self._task = None
        if self.mode == "bar":
            self._rich = _rich_bar(
                self.stream,
                "[bold]{task.description}",
                "loss {task.fields[loss]}",
                "{task.fields[rate]} samples/s",
                refresh_per_second=4,
            )
            self._task = self._rich.add_task(
                description, total=self.total, completed=self.start_step, loss="-", rate="-"
            )
            self._rich.start()
            global _active_bar_console
            _active_bar_console = self._rich.console

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
            f"[{timestamp(with_date=True)}] {self.description} step {step}/{self.total} "
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
            print(f"[{timestamp(with_date=True)}] {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            global _active_bar_console
            if _active_bar_console is self._rich.console:
                _active_bar_console = None
            self._rich.stop()
            self._rich = None
