"""Run directory ``runs/<stage>/<name>/``: stable across requeues, so a resumed job appends to the
same metrics and finds its checkpoints.

    config.json      what the run was started with (rewritten atomically on each start)
    checkpoints/     step_00001000/ ... (see checkpoint.py)
    metrics.jsonl    one JSON object per line, each with "step"
    pictures/        evaluation images; curves.png (loss and metric curves, redrawn at each
                     evaluation when matplotlib is installed)
    logs/            per-rank engine logs (and whatever the launcher puts there)
    tensorboard/     the same metrics as TensorBoard event files, when tensorboard is installed
                     (``tensorboard --logdir runs`` shows every run under the run root)
    wandb/           Weights & Biases files with ``train.wandb=true`` (offline runs to sync)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
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
CURVES_PICTURE = "curves.png"
# Columns of a metrics line that are bookkeeping, not curves.
_NOT_CURVES = ("step", "time", "epoch")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        key: value
        for key, value in record.items()
        if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class MetricsSink:
    """Where the numbers of a metrics line go besides metrics.jsonl (TensorBoard, W&B)."""

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoardSink(MetricsSink):
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tensorboard_sink(log_dir: Path) -> MetricsSink | None:
    """A SummaryWriter sink, or None (one line says why) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("hpcvp: tensorboard is not installed: metrics go to metrics.jsonl only", flush=True)
        return None
    return _TensorBoardSink(SummaryWriter(log_dir=str(log_dir)))


@dataclass
class WandbSettings:
    """``train.wandb=true``: the run's metrics also go to Weights & Biases (when installed)."""

    project: str
    name: str  # the run's label, <stage>/<name>
    config: dict[str, Any] = field(default_factory=dict)


def _on_compute_node() -> bool:
    return "SLURM_JOB_ID" in os.environ


class _WandbSink(MetricsSink):
    def __init__(self, wandb, settings: WandbSettings, run_dir: Path):
        self.wandb = wandb
        self.run_dir = run_dir
        if "WANDB_MODE" not in os.environ and _on_compute_node():
            # compute nodes usually have no network: log offline, sync from a login node
            os.environ["WANDB_MODE"] = "offline"
            print("hpcvp: wandb: WANDB_MODE=offline on this Slurm compute node (set WANDB_MODE to change)", flush=True)
        self.offline = os.environ.get("WANDB_MODE", "") in ("offline", "dryrun")
        # a stable id: a requeued job resumes the same W&B run
        digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", settings.name) + "-" + digest
        self.run = wandb.init(
            project=settings.project,
            name=settings.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=settings.config,
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.wandb.finish()
        if self.offline:
            print(
                f"hpcvp: wandb: offline run kept in {self.run_dir / 'wandb'}; upload it from a login node with: "
                f"wandb sync {self.run_dir / 'wandb'}/offline-run-*",
                flush=True,
            )


def _wandb_sink(settings: WandbSettings, run_dir: Path) -> MetricsSink | None:
    try:
        import wandb
    except ImportError:
        print("hpcvp: train.wandb=true but wandb is not installed (pip install wandb): not logging to W&B", flush=True)
        return None
    return _WandbSink(wandb, settings, run_dir)


def plot_curves(metrics_path: Path, out: Path) -> bool:
    """PNG of the loss curves (left) and the other metrics (right) from metrics.jsonl; False (one
    line says why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a login or compute node
        import matplotlib.pyplot as plt
    except ImportError:
        print("hpcvp: matplotlib is not installed (the plots extra): no curves.png", flush=True)
        return False
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in _iter_metrics(metrics_path):
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in _scalars(record).items():
            if key in _NOT_CURVES or value != value:  # NaN
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    losses = sorted(k for k in series if "loss" in k)
    others = sorted(k for k in series if "loss" not in k and k not in ("lr", "samples_per_s", "grad_norm"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title in ((axes[0], losses, "loss"), (axes[1], others, "metrics")):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(f"{title} ({metrics_path.parent.name})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)  # a reader on the login node never sees half a PNG
    return True


class MetricsWriter:
    """Appends one JSON line per call and flushes it (rank 0 only). The numbers also go to the
    sinks: TensorBoard event files in ``<run dir>/tensorboard/`` when tensorboard is importable,
    Weights & Biases when ``wandb`` settings are given and wandb is importable. ``write(...,
    evaluation=True)`` also redraws ``<run dir>/pictures/curves.png`` from metrics.jsonl."""

    def __init__(
        self,
        path: Path,
        tensorboard: bool = True,
        wandb: WandbSettings | None = None,
        sinks: list[MetricsSink] | None = None,
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._sinks: list[MetricsSink] = list(sinks or [])
        for sink in (
            _tensorboard_sink(path.parent / TENSORBOARD_DIR) if tensorboard else None,
            _wandb_sink(wandb, path.parent) if wandb is not None else None,
        ):
            if sink is not None:
                self._sinks.append(sink)
        self._can_plot = True

    def write(self, record: dict[str, Any], evaluation: bool = False) -> None:
        self._file.write(json.dumps(record, sort_keys=False, default=float) + "\n")
        self._file.flush()
        step = record.get("step")
        if isinstance(step, int):
            scalars = _scalars(record)
            for sink in self._sinks:
                sink.log(scalars, step)
        if evaluation and self._can_plot:
            try:
                self._can_plot = plot_curves(self.path, self.path.parent / "pictures" / CURVES_PICTURE)
            except Exception as exc:  # a picture must never kill a training run
                print(f"hpcvp: could not draw {CURVES_PICTURE}: {type(exc).__name__}: {exc}", flush=True)

    def close(self) -> None:
        self._file.close()
        for sink in self._sinks:
            sink.close()
