"""Sweeps: ``--sweep KEY=V1,V2,...`` (repeatable: the grid of every combination) as one Slurm job array.

Each element of the grid is a run of its own, ``<run root>/<stage>/<run>__<k1=v1,k2=v2>``, with its
own checkpoints, so each array task requeues and resumes by itself (``scontrol requeue
<array id>_<task>``). The sweep's own folder ``<run root>/<stage>/<run>__sweep/`` holds
``sweep.json`` (the elements), submitit's files for the array, and the report: ``sweep.md`` (a table of
each element's final metrics, best first) and ``sweep.png`` (a bar chart, when matplotlib is there).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SWEEP_SUFFIX = "__sweep"
SWEEP_FILE = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class SweepError(ValueError):
    """A malformed --sweep; the message names the flag and the item."""


@dataclass(frozen=True)
class Element:
    name: str  # the run name: <run>__k1=v1,k2=v2
    overrides: tuple[str, ...]  # KEY=VALUE, one per swept key


def parse_sweep(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=1e-3,1e-4", "model.width=8,16"]`` -> [(key, values), ...] in the given order."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",")]
        if not sep or not _KEY_RE.match(key) or not text.strip() or any(not v for v in values):
            raise SweepError(f"--sweep {item}: expected KEY=V1,V2,... (e.g. train.lr=1e-3,3e-4)")
        if key in dict(axes):
            raise SweepError(f"--sweep {item}: key {key!r} is swept twice; give all its values in one --sweep")
        if len(set(values)) != len(values):
            raise SweepError(f"--sweep {item}: a value is listed twice")
        axes.append((key, values))
    return axes


def safe(text: str) -> str:
    """A file-name-safe form of ``text`` (no '/', spaces or shell specials)."""
    return _UNSAFE.sub("_", text)


def grid(run: str, axes: list[tuple[str, list[str]]]) -> list[Element]:
    elements = []
    for combo in itertools.product(*(values for _, values in axes)):
        pairs = [f"{key}={value}" for (key, _), value in zip(axes, combo)]
        elements.append(Element(f"{run}__{safe(','.join(pairs))}", tuple(pairs)))
    names = [e.name for e in elements]
    if len(set(names)) != len(names):
        raise SweepError("--sweep: two elements would share a run dir name; use values that differ in [A-Za-z0-9._+-]")
    return elements


def sweep_dir(run_root: Path, stage: str, run: str) -> Path:
    return Path(run_root) / stage / f"{run}{SWEEP_SUFFIX}"


def write_sweep_file(folder: Path, stage: str, run: str, axes, elements: list[Element], job_id: str = "") -> None:
    from hpcvp.atomic import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "stage": stage,
        "run": run,
        "axes": [[key, values] for key, values in axes],
        "elements": [{"name": e.name, "overrides": list(e.overrides)} for e in elements],
        "job_id": job_id,
    }
    atomic_write_text(folder / SWEEP_FILE, json.dumps(payload, indent=2) + "\n")


def read_sweep_file(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / SWEEP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def find_sweeps(run_root: Path) -> list[Path]:
    root = Path(run_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"*/*{SWEEP_SUFFIX}") if (p / SWEEP_FILE).is_file())


# --------------------------------------------------------------------------------------------- report


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The newest value of every scalar in the run's metrics.jsonl (later lines win)."""
    values: dict[str, float] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return values
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            for key, value in record.items():
                if key not in ("time", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[key] = value
    return values


def ranking_metric(rows: list[dict[str, float]]) -> tuple[str | None, bool]:
    """(the metric to rank by, higher is better): a Jaccard/IoU/accuracy if any, else a loss."""
    keys = {k for row in rows for k in row}
    for words, higher in ((("jaccard", "iou", "ari", "acc"), True), (("val_loss", "mse", "loss"), False)):
        for word in words:
            matches = sorted(k for k in keys if word in k and k.startswith("val")) or sorted(
                k for k in keys if word in k
            )
            if matches:
                return matches[0], higher
    return None, True


def write_report(folder: Path) -> tuple[Path, Path | None] | None:
    """Write ``sweep.md`` (and ``sweep.png`` when matplotlib is importable); None without sweep.json."""
    from hpcvp.atomic import atomic_write_text

    info = read_sweep_file(folder)
    if info is None:
        return None
    stage_dir = Path(folder).parent
    rows = [(e["name"], e["overrides"], final_metrics(stage_dir / e["name"])) for e in info["elements"]]
    metric, higher = ranking_metric([m for _, _, m in rows])

    def sort_key(row):
        value = row[2].get(metric) if metric else None
        return (value is None, -(value or 0) if higher else (value or 0))

    rows.sort(key=sort_key)
    keys = [key for key, _ in info["axes"]]
    shown = [k for k in ("step", metric) if k] + sorted(
        {k for _, _, m in rows for k in m} - {"step", metric, "lr", "grad_norm", "samples_per_s"}
    )
    lines = [
        f"# Sweep {info['run']} ({info['stage']})",
        "",
        f"{len(rows)} element(s), ranked by `{metric or 'nothing yet'}` ({'higher' if higher else 'lower'} is better).",
        "",
        "| rank | " + " | ".join(keys) + " | " + " | ".join(shown) + " | run dir |",
        "|---" * (len(keys) + len(shown) + 2) + "|",
    ]
    for rank, (name, overrides, metrics) in enumerate(rows, 1):
        values = [o.partition("=")[2] for o in overrides]
        cells = [f"{metrics[k]:.4g}" if isinstance(metrics.get(k), float) else str(metrics.get(k, "-")) for k in shown]
        lines.append(f"| {rank} | " + " | ".join(values + cells) + f" | {name} |")
    md = Path(folder) / "sweep.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    png = _bar_chart(Path(folder) / "sweep.png", rows, metric) if metric else None
    return md, png


def _bar_chart(path: Path, rows, metric: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a login or compute node
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [",".join(o.partition("=")[2] for o in overrides) for _, overrides, _ in rows]
    values = [m.get(metric, 0.0) for _, _, m in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.5))
    ax.bar(range(len(rows)), values, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{path.parent.name}: {metric} (best first)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
