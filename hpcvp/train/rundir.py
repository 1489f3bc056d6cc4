"""Run directory ``runs/<stage>/<name>/``: stable across requeues, so a resumed job appends to the
same metrics and finds its checkpoints.

    config.json      what the run was started with (rewritten atomically on each start)
    checkpoints/     step_00001000/ ... (see checkpoint.py)
    metrics.jsonl    one JSON object per line, each with "step"
    pictures/        evaluation images
    logs/            per-rank engine logs (and whatever the launcher puts there)
    tensorboard/     the same metrics as TensorBoard event files, when tensorboard is installed
                     (``tensorboard --logdir runs`` shows every run under the run root)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpcvp.atomic import atomic_write_text


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_stage(cls, root: str | os.PathLike, stage: str, name: str) -> RunDir:
        return cls(Path(root) / stage / name)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def pictures(self) -> Path:
        return self.path / "pictures"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def ensure(self) -> RunDir:
        for d in (self.path, self.checkpoints, self.pictures, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Parsed metrics lines (a torn last line from a crash is skipped)."""
        return list(_iter_metrics(self.metrics_path))

    def truncate_metrics(self, max_step: int) -> int:
        """Keep only lines with step <= max_step (and drop torn lines); returns lines dropped.

        Called on resume from a checkpoint at ``max_step``: the steps after it will be trained
        (and logged) again, so each step ends up exactly once in the file."""
        path = self.metrics_path
        if not path.exists():
            return 0
        kept, dropped, changed = [], 0, False
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = _parse_line(line)
                step = None if record is None else record.get("step")
                if not isinstance(step, int) or step > max_step:
                    dropped += 1 if line.strip() else 0
                    changed = True
                    continue
                if not line.endswith("\n"):
                    line, changed = line + "\n", True
                kept.append(line)
        if changed:
            atomic_write_text(path, "".join(kept))
        return dropped

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)


def _parse_line(line: str) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _iter_metrics(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = _parse_line(line)
            if record is not None:
                yield record


TENSORBOARD_DIR = "tensorboard"


def _tensorboard_writer(log_dir: Path):
    """A SummaryWriter, or None (one line says why) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("hpcvp: tensorboard is not installed: metrics go to metrics.jsonl only", flush=True)
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsWriter:
    """Appends one JSON line per call and flushes it (rank 0 only); the numbers also go to
    TensorBoard event files in ``<run dir>/tensorboard/`` when tensorboard is importable."""

    def __init__(self, path: Path, tensorboard: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        self._board = _tensorboard_writer(path.parent / TENSORBOARD_DIR) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=False, default=float) + "\n")
        self._file.flush()
        step = record.get("step")
        if self._board is not None and isinstance(step, int):
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(key, value, step)
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()
