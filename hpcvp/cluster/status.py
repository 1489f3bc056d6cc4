"""Launch records and the ``--status`` table.

Each run dir ``<run root>/<stage>/<name>/`` carries ``jobs.jsonl``: one JSON object per line,
written by the launcher when it submits (``"event": "submitted"``), by the ``slurm/`` batch script
when a job (re)starts (``"event": "started"``), and by local runs when they end
(``"event": "finished"``). ``--status`` reads those, asks ``sacct`` (falling back to ``squeue``)
for the state of the newest Slurm job of each run, and adds the engine's newest checkpoint step
and the last line of ``metrics.jsonl``.

Restarts and time lost count the whole run, not only its newest job: every job id the run dir
records (a relaunch of the same run is a new job id: one restart each) and every requeue of each
(``sacct --duplicates`` lists each requeued attempt as a row). Time lost is the sum, over every gap
between one attempt's end and the next attempt's start (requeues and relaunches, in time order), of
that gap: the wall time the run spent stopped between its first start and its newest. It leaves out
the work redone after a hard stop (the steps since the last checkpoint; none after a graceful
stop, which saves at a step boundary). Local runs take the same gaps from their started/finished
records.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOBS_FILE = "jobs.jsonl"
STATE_STYLES = {
    "RUNNING": "green",
    "PENDING": "yellow",
    "REQUEUED": "yellow",
    "PREEMPTED": "magenta",
    "TIMEOUT": "red",
    "COMPLETED": "bold green",
    "FAILED": "bold red",
    "CANCELLED": "red",
    "OUT_OF_MEMORY": "bold red",
    "NODE_FAIL": "red",
}


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def record_event(run_dir: Path, **fields: Any) -> None:
    """Append one launch record (a single small write with O_APPEND: lines never interleave)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"time": now_iso(), **fields}
    line = (json.dumps(payload, sort_keys=True) + "\n").encode()
    fd = os.open(run_dir / JOBS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / JOBS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer
        if isinstance(record, dict):
            events.append(record)
    return events


def find_runs(run_root: Path) -> list[Path]:
    """Run dirs under the root: ``<root>/<stage>/<name>/`` holding a launch record or metrics."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        return []
    runs = []
    for stage_dir in sorted(p for p in run_root.iterdir() if p.is_dir()):
        for run_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            if (run_dir / JOBS_FILE).exists() or (run_dir / "metrics.jsonl").exists():
                runs.append(run_dir)
    return runs


@dataclass
class SlurmJobState:
    job_id: str
    state: str
    restarts: int
    exit_code: str = ""
    # (start, end) of every attempt, oldest first; None where sacct has no time (pending, running).
    attempts: list[tuple[_dt.datetime | None, _dt.datetime | None]] = field(default_factory=list)


def _parse_time(text: str | None) -> _dt.datetime | None:
    """sacct's or jobs.jsonl's time -> an aware datetime (local time when it names no zone)."""
    try:
        parsed = _dt.datetime.fromisoformat(str(text).strip())
    except ValueError:
        return None  # "Unknown", "None", ""
    return parsed if parsed.tzinfo else parsed.astimezone()


def stopped_seconds(attempts: Iterable[tuple[_dt.datetime | None, _dt.datetime | None]]) -> float:
    """Sum of the gaps between one attempt's end and the next one's start (see the module doc)."""
    spans = sorted((start, end) for start, end in attempts if start is not None)
    lost = 0.0
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        if end is not None:
            lost += max(0.0, (next_start - end).total_seconds())
    return lost


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = round(seconds / 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m"


def _run(args: list[str]) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def scontrol_job_fields(job_id: str) -> dict[str, str]:
    """``scontrol -o show job`` as KEY -> value (JobState, Restarts, ExitCode, ...); {} when unknown."""
    info = _run(["scontrol", "-o", "show", "job", str(job_id)]) if job_id else None
    return dict(item.split("=", 1) for item in (info or "").split() if "=" in item)


def slurm_job_states(job_ids: Iterable[str]) -> dict[str, SlurmJobState]:
    """Job id -> newest state and number of requeues, from ``sacct -D`` (every requeued attempt is a
    row of its own), else from ``squeue``/``scontrol`` for jobs sacct does not know (no accounting)."""
    ids = sorted({str(j) for j in job_ids if j})
    states: dict[str, SlurmJobState] = {}
    if not ids:
        return states
    out = _run(["sacct", "-n", "-P", "-D", "-X", "-j", ",".join(ids), "-o", "JobIDRaw,State,ExitCode,Start,End,JobID"])
    if out:
        states.update(parse_sacct_attempts(out, ids))
    missing = [j for j in ids if j not in states]
    for job_id in missing:
        fields = scontrol_job_fields(job_id)
        if not fields:
            continue
        states[job_id] = SlurmJobState(
            job_id, fields.get("JobState", "UNKNOWN"), int(fields.get("Restarts", "0") or 0), fields.get("ExitCode", "")
        )
    return states


def parse_sacct_attempts(out: str, ids: Iterable[str]) -> dict[str, SlurmJobState]:
    """``sacct -n -P -D -X -o JobIDRaw,State,ExitCode,Start,End`` -> job id -> state, requeues, attempts."""
    wanted = set(ids)
    rows: dict[str, list[list[str]]] = {}
    for line in out.splitlines():
        fields = line.split("|")
        # An array task is known by "<array id>_<index>" (the JobID column), not by its raw id.
        key = fields[0] if fields[0] in wanted else (fields[5] if len(fields) > 5 and fields[5] in wanted else None)
        if len(fields) >= 3 and key is not None:
            rows.setdefault(key, []).append(fields[:5] + ["", ""])
    states = {}
    for job_id, attempts in rows.items():
        names = [a[1].split()[0] if a[1] else "" for a in attempts]  # "CANCELLED by 0" -> "CANCELLED"
        # Every row after the first is a requeued attempt; a last row still REQUEUED has its next
        # attempt pending (no row yet). A final TIMEOUT or PREEMPTED without a next row is an end.
        requeues = len(attempts) - 1 + (names[-1] in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"))
        states[job_id] = SlurmJobState(
            job_id,
            names[-1],
            requeues,
            attempts[-1][2],
            [(_parse_time(a[3]), _parse_time(a[4])) for a in attempts],
        )
    return states


def last_metric(run_dir: Path, max_keys: int = 2) -> str:
    """The last metrics.jsonl line as 'step N: key=value ...' (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return ""
    record = None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(tail):
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            record = parsed
            break
    if record is None:
        return ""
    scalars = {k: v for k, v in record.items() if k not in ("step", "time", "epoch") and isinstance(v, (int, float))}
    # Evaluation numbers first (what one wants to see), then the rest in file order.
    ordered = sorted(
        scalars, key=lambda k: (not any(w in k for w in ("jaccard", "iou", "val")), list(scalars).index(k))
    )
    parts = [
        f"{k}={scalars[k]:.4g}" if isinstance(scalars[k], float) else f"{k}={scalars[k]}" for k in ordered[:max_keys]
    ]
    step = record.get("step")
    return (f"step {step}: " if step is not None else "") + " ".join(parts)


@dataclass
class RunStatus:
    stage: str
    run: str
    run_dir: Path
    job_id: str
    via: str
    state: str
    restarts: int
    checkpoint_step: int | None
    metric: str
    # Seconds the run spent stopped between attempts (module doc); None when not known.
    lost_seconds: float | None = None
    sweep: str = ""  # the sweep folder's name when the run is one element of a sweep
    log: str = ""  # where the newest job's output goes
    reason: str = ""  # Slurm's Reason for a pending job


def run_status(run_dir: Path, slurm_states: dict[str, SlurmJobState] | None = None) -> RunStatus:
    from hpcvp.train.checkpoint import latest_step

    run_dir = Path(run_dir)
    events = read_events(run_dir)
    submissions = [e for e in events if e.get("job_id")]
    latest = submissions[-1] if submissions else (events[-1] if events else {})
    job_id = str(latest.get("job_id") or "")
    via = str(latest.get("via") or "")
    state, restarts, lost = "", 0, None
    if job_id and slurm_states is not None and job_id in slurm_states:
        state = slurm_states[job_id].state
        job_ids = run_job_ids(events)
        known = [slurm_states[j] for j in job_ids if j in slurm_states]
        # Each job after the first is a relaunch; each job's requeues are restarts of their own.
        restarts = len(job_ids) - 1 + sum(j.restarts for j in known)
        if len(known) == len(job_ids) and all(j.attempts for j in known):
            lost = stopped_seconds(span for j in known for span in j.attempts)
    elif via == "local" or not job_id:
        finished = [e for e in events if e.get("event") == "finished"]
        started = [e for e in events if e.get("event") in ("started", "submitted")]
        if finished and (not started or str(finished[-1].get("time")) >= str(started[-1].get("time"))):
            state = str(finished[-1].get("state", "")).upper()
        elif started:
            state = "RUNNING" if _pid_alive(started[-1].get("pid")) else "FAILED"
        restarts = max(0, len([e for e in events if e.get("event") == "started"]) - 1)
        lost = stopped_seconds(_local_attempts(events))
    else:
        state = "UNKNOWN"
    sweep = next((str(e["sweep"]) for e in reversed(events) if e.get("sweep")), "")
    reason = pending_reason(job_id) if state in ("PENDING", "REQUEUED") and job_id else ""
    return RunStatus(
        stage=run_dir.parent.name,
        run=run_dir.name,
        run_dir=run_dir,
        job_id=job_id or "-",
        via=via or "-",
        state=state or "-",
        restarts=restarts,
        checkpoint_step=latest_step(run_dir),
        metric=last_metric(run_dir),
        lost_seconds=lost,
        sweep=sweep,
        log=log_path(run_dir, job_id, via, sweep),
        reason=reason,
    )


def pending_reason(job_id: str) -> str:
    """Slurm's reason a job is pending, with the nodes it waits for when it names some (a job
    requeued onto a node that went down waits there: "ReqNodeNotAvail, UnavailableNodes:n2");
    "" when it waits for nothing in particular."""
    fields = scontrol_job_fields(job_id)
    reason = fields.get("Reason", "")
    if reason in ("", "None"):
        return ""
    nodes = fields.get("ReqNodeList") or fields.get("SchedNodeList") or ""
    if nodes and nodes != "(null)":
        reason += f" (nodes {nodes})"
    return reason


def log_path(run_dir: Path, job_id: str, via: str, sweep: str = "") -> str:
    """The newest job's output file: submitit's task-0 log, the local rank logs, or what scontrol
    says (the slurm/ templates log where they were submitted from)."""
    if via == "local":
        return str(run_dir / "logs") if (run_dir / "logs").is_dir() else ""
    if not job_id:
        return ""
    if via == "submitit":
        folder = (run_dir.parent / sweep if sweep else run_dir) / "slurm" / job_id
        return str(folder / f"{job_id}_0_log.out")
    return scontrol_job_fields(job_id).get("StdOut", "")


def run_job_ids(events: list[dict[str, Any]]) -> list[str]:
    """Every Slurm job id a run dir records, oldest first, each once."""
    return list(dict.fromkeys(str(e["job_id"]) for e in events if e.get("job_id")))


def _local_attempts(events: list[dict[str, Any]]) -> list[tuple[_dt.datetime | None, _dt.datetime | None]]:
    """(start, end) of each local attempt, from its started and finished records."""
    attempts: list[tuple[_dt.datetime | None, _dt.datetime | None]] = []
    for event in events:
        if event.get("event") == "started":
            attempts.append((_parse_time(event.get("time")), None))
        elif event.get("event") == "finished" and attempts and attempts[-1][1] is None:
            attempts[-1] = (attempts[-1][0], _parse_time(event.get("time")))
    return attempts


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def collect_status(run_root: Path) -> list[RunStatus]:
    runs = find_runs(run_root)
    job_ids = []
    for run_dir in runs:
        try:
            job_ids += run_job_ids(read_events(run_dir))
        except OSError:
            pass  # its row says why (below)
    states = slurm_job_states(job_ids) if job_ids else {}
    rows = []
    for run_dir in runs:
        try:
            rows.append(run_status(run_dir, states))
        except OSError as exc:  # e.g. another user's run dir: one row says so, the table goes on
            rows.append(_unreadable(run_dir, exc))
    return rows


def _unreadable(run_dir: Path, exc: OSError) -> RunStatus:
    what = f"cannot read {exc.filename or run_dir}: {exc.strerror or exc}"
    return RunStatus(run_dir.parent.name, run_dir.name, run_dir, "-", "-", "UNREADABLE", 0, None, what)


STAGE_ORDER = ("pack", "seg", "pseudo-label", "slot", "raft", "simvp", "predict")


def status_table(rows: list[RunStatus], run_root: Path):
    from rich.table import Table

    table = Table(title=f"hpcvp runs under {run_root}")
    table.add_column("stage", no_wrap=True)
    table.add_column("run", overflow="fold")
    table.add_column("job id", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("restarts", justify="right")
    table.add_column("time lost", justify="right")
    table.add_column("ckpt step", justify="right")
    table.add_column("last metric", overflow="fold")
    table.add_column("log", overflow="fold")
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    previous_group = None
    # The elements of a sweep sit together, under their sweep's name.
    for row in sorted(rows, key=lambda r: (order.get(r.stage, len(order)), r.stage, r.sweep or r.run, r.run)):
        group = (row.stage, row.sweep)
        if row.sweep and group != previous_group:
            table.add_section()
            table.add_row(row.stage, f"[bold]{row.sweep}[/] (sweep)", "", "", "", "", "", "", "")
        elif not row.sweep and previous_group and previous_group[1]:
            table.add_section()
        previous_group = group
        style = STATE_STYLES.get(row.state, "")
        job = row.job_id if row.via in ("submitit", "-") else f"{row.job_id} ({row.via})"
        state = f"{row.state} ({row.reason})" if row.reason else row.state
        name = f"  {row.run.partition('__')[2]}" if row.sweep else row.run
        table.add_row(
            row.stage,
            name,
            job,
            f"[{style}]{state}[/]" if style else state,
            str(row.restarts),
            format_duration(row.lost_seconds),
            "-" if row.checkpoint_step is None else str(row.checkpoint_step),
            row.metric or "-",
            row.log or "-",
        )
    return table


def print_status(run_root: Path, console=None) -> list[RunStatus]:
    from rich.console import Console

    console = console or Console()
    try:
        rows = collect_status(run_root)
    except OSError as exc:
        console.print(f"error: --run-root {run_root}: cannot read {exc.filename or run_root}: {exc.strerror or exc}")
        return []
    if not rows:
        console.print(f"no runs under {run_root} (launch one, or pass --run-root)")
        return rows
    console.print(status_table(rows, run_root))
    return rows
