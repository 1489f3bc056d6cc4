#!/usr/bin/env python
"""Time lost per interruption on a real Slurm cluster (the local one from tools/slurm_local_cluster.sh).

One 2-task seg run (tiny preset, 2 DataLoader workers per rank, a metrics line every step, a
periodic checkpoint every ``--save-every`` steps) is interrupted once by each kind below, one after
another. For each: the step training had reached, the step the next attempt resumed from (steps
redone = the difference), and the seconds from the signal to the first step trained after the
resume (Slurm's requeue delay, start-up, data and checkpoint loading included).

Graceful stops (every rank saves at the next step boundary):
  requeue        scontrol requeue
  batch-usr2     scancel --batch --signal=USR2 (what --signal=B:USR2@S does before the time limit)
  term           scancel --signal=TERM (to the tasks; the job stays RUNNING, rank 0 requeues)
  preempt-term   scancel --signal=TERM (the tasks), then scontrol requeue (PreemptMode=REQUEUE)
  cancel         scancel; then the same launch.py --run again
Hard stops (nothing saved; back to the last periodic checkpoint):
  kill9-rank     kill -9 of rank 1's python process; then launch.py again if the job ended
  kill9-all      kill -9 of both ranks' python processes (a node lost); launch.py again
  scancel-kill   scancel --signal=KILL --full; then launch.py again if the job ended

    python tools/bench_interruptions.py --out bench-interruptions.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcvp.cluster import launch
from hpcvp.cluster.status import read_events, slurm_job_states

GRACEFUL = {
    "requeue": [["scontrol", "requeue"]],
    "batch-usr2": [["scancel", "--batch", "--signal=USR2"]],
    "term": [["scancel", "--signal=TERM"]],
    "preempt-term": [["scancel", "--signal=TERM"], ["scontrol", "requeue"]],
    "cancel": [["scancel"]],
}
# scancel --signal=KILL is listed with the hard stops, but Slurm turns it into a cancel: TERM first,
# KILL after KillWait, so the ranks save (measured). kill9-all is the hard stop of the whole job.
HARD = {"kill9-rank": None, "kill9-all": None, "scancel-kill": [["scancel", "--full", "--signal=KILL"]]}


def job_id(run_dir: Path) -> str:
    return [e["job_id"] for e in read_events(run_dir) if e.get("job_id")][-1]


def job_state(job: str) -> str:
    state = slurm_job_states([job]).get(job)
    return state.state if state else ""


def metric_times(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip().endswith("}"):
                record = json.loads(line)
                out[record["step"]] = record["time"]
    return out


def resumes(run_dir: Path) -> list[int]:
    log = run_dir / "logs" / "engine.rank0.log"
    return [int(n) for n in re.findall(r"resumed from step (\d+)", log.read_text())] if log.exists() else []


def rank_pid(job: str, rank: int) -> int:
    """The pid of a task's python process (not a DataLoader worker: its parent is not python)."""
    pids = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True, check=True).stdout
    for line in pids.splitlines()[1:]:
        pid = line.split()[0]
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if f"SLURM_PROCID={rank}".encode() in env and b"python" in cmd and b"python" not in parent_cmd:
            return int(pid)
    raise RuntimeError(f"no python task of rank {rank} in job {job}")


def interrupt(kind: str, job: str) -> None:
    if kind in ("kill9-rank", "kill9-all"):
        for rank in (1,) if kind == "kill9-rank" else (0, 1):
            os.kill(rank_pid(job, rank), 9)
        return
    for command in {**GRACEFUL, **HARD}[kind]:
        subprocess.run([*command, job], check=True, capture_output=True)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def measure(kind: str, run_dir: Path, launch_args: list[str], at_step: int) -> dict:
    job = job_id(run_dir)
    before = len(resumes(run_dir))
    wait_for(lambda: max(metric_times(run_dir), default=0) >= at_step, 600, f"{kind}: step {at_step}")
    signalled = time.time()
    interrupt(kind, job)
    reached, relaunched = 0, False
    while len(resumes(run_dir)) == before:  # until an attempt resumed
        # the furthest step trained before the stop (a resume truncates metrics.jsonl to its step)
        reached = max(reached, max(metric_times(run_dir), default=0))
        state = job_state(job)
        if state in launch.TERMINAL_STATES and not relaunched:
            if launch.main(launch_args) != 0:
                raise RuntimeError(f"{kind}: relaunch failed")
            relaunched = True
        time.sleep(0.1)
    resumed = resumes(run_dir)[-1]
    first = wait_for(lambda: metric_times(run_dir).get(resumed + 1), 600, f"{kind}: step {resumed + 1}")
    return {
        "kind": kind,
        "graceful": kind in GRACEFUL,
        "reached": reached,
        "resumed": resumed,
        "redone": max(0, reached - resumed),
        "seconds": first - signalled,
        "how": "relaunched" if relaunched else "requeued",
        "end_state": job_state(job),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join([*GRACEFUL, *HARD]), help="comma list, in this order")
    parser.add_argument("--data", type=Path, default=None, help="packed dataset (default: the embedded one)")
    parser.add_argument("--run-root", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--save-every", type=int, default=10, help="periodic checkpoint every N steps")
    parser.add_argument("--gap", type=int, default=6, help="steps trained between a resume and the next stop")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in GRACEFUL and k not in HARD]
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose among {[*GRACEFUL, *HARD]}")
    if args.data is None:
        from hpcvp.data.default import ensure_default_dataset

        args.data = ensure_default_dataset()
    run_root = args.run_root or Path(tempfile.mkdtemp(prefix="bench-interruptions-"))
    # Enough steps for every stop, a gap after each resume, and the steps a hard stop redoes.
    max_steps = (len(kinds) + 1) * (args.gap + args.save_every) + 10
    settings = [f"train.max_steps={max_steps}", "train.batch_size=4", "train.log_every=1", "eval_max_frames=8"]
    settings += ["train.num_workers=2", f"train.save_every_steps={args.save_every}", "train.save_every_minutes=0"]
    launch_args = ["--stage", "seg", "--gpus", "2", "--data", str(args.data), "--run-root", str(run_root)]
    launch_args += ["--run", "bench", "--preset", "tiny", "--max-requeues", "20"]
    for item in settings:
        launch_args += ["--set", item]
    run_dir = run_root / "seg" / "bench"
    if launch.main(launch_args) != 0:
        return 1
    rows, resumed = [], 0
    for kind in kinds:
        at = resumed + args.gap
        if kind in HARD:  # halfway between two periodic checkpoints
            # (after the first one: with none, a relaunch starts afresh and resumes from nothing)
            at = max(1, at // args.save_every) * args.save_every + args.save_every // 2
        row = measure(kind, run_dir, launch_args, at)
        resumed = row["resumed"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    subprocess.run(["scancel", job_id(run_dir)], check=False)
    lines = [
        f"{datetime.date.today()}, {platform.node()}, `python tools/bench_interruptions.py"
        f"{' ' + ' '.join(argv) if argv else ''}`",
        "",
        "| interruption | stop | step reached | resumed from | steps redone | signal → training again (s) | back by |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {'graceful' if r['graceful'] else 'hard'} | {r['reached']} | {r['resumed']} "
            f"| {r['redone']} | {r['seconds']:.1f} | {r['how']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
