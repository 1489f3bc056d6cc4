"""Progress for long data jobs: a rich bar on a terminal, plain timestamped lines in batch logs.

Slurm writes stdout/stderr to files, where a redrawn bar becomes megabytes of carriage returns;
there we print one line every ``log_every_s`` seconds (and at the end) instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "pack", unit="videos") as p: p.advance(1)``."""

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
        self._use_rich = enabled and not force_plain and _is_terminal(self.stream)

    def __enter__(self) -> Progress:
        self._start = self._last_log = time.monotonic()
        if self._use_rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
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
        stamp = time.strftime("%H:%M:%S")
        self.stream.write(
            f"[{stamp}] {self.description}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{rate:.1f} {self.unit}/s, elapsed {elapsed:.0f}s, eta {remaining:.0f}s\n"
        )
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
