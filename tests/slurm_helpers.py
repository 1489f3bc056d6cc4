"""Helpers of the tests on real Slurm clusters (test_cluster_slurm*.py, test_cluster_two_nodes.py).

Every Slurm command here runs with this process's environment: on the two-node cluster the
``two_node_cluster`` fixture (conftest.py) has set SLURM_CONF=/etc/slurm-2node/slurm.conf in it, so
the same helpers serve both clusters. What differs between the test files (settings, step counts,
timeouts, the template's environment) is passed in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcvp.cluster import launch
from hpcvp.cluster.status import read_events, slurm_job_states

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 420  # a job of the single-node cluster's tests; the two-node tests pass their own


def launch_args(stage: str, data: Path, run_root: Path, run: str, settings: list[str], *extra: str) -> list[str]:
    """launch.py arguments for a tiny-preset run with ``--set`` for each of ``settings``, then ``extra``."""
    args = ["--stage", stage, "--data", str(data), "--run-root", str(run_root), "--run", run, "--preset", "tiny"]
    for item in settings:
        args += ["--set", item]
    return args + list(extra)


def job_id_of(run_dir: Path) -> str:
    ids = [e["job_id"] for e in read_events(run_dir) if e.get("job_id")]
    assert ids, f"{run_dir}/jobs.jsonl names no job"
    return ids[-1]


def logs_of(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").rglob("*_log.*")))


def metric_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl, in order (a line still being written is left out)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def wait_until_done(job_id: str, timeout: float = JOB_TIMEOUT_S, poll: float = 2) -> str:
    """The job's terminal state; a job still running after ``timeout`` s is cancelled and the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = slurm_job_states([job_id]).get(job_id)
        if state and state.state in launch.TERMINAL_STATES:
            return state.state
        time.sleep(poll)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} did not end within {timeout:.0f}s (cancelled)")


def wait_for_step(run_dir: Path, job_id: str, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl has a line at or past ``step`` (the job is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = metric_steps(run_dir)
        if steps and max(steps) >= step:
            return
        state = slurm_job_states([job_id]).get(job_id)
        if state and state.state in launch.TERMINAL_STATES:
            pytest.fail(f"job {job_id} ended ({state.state}) before reaching step {step}: {logs_of(run_dir)[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"job {job_id} did not reach step {step} within {timeout}s: {logs_of(run_dir)[-3000:]}")


def sacct_attempts(job_id: str) -> list[dict[str, str]]:
    """Every attempt of the job (requeues included), as accounting has it: id, state, start, end."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-D", "-X", "-j", job_id, "-o", "JobIDRaw,State,Start,End"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [dict(zip(("id", "state", "start", "end"), line.split("|"))) for line in out.splitlines() if line.strip()]
    for row in rows:
        row["state"] = row["state"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return [r for r in rows if r["id"] == job_id]


def sacct_states(job_id: str) -> list[str]:
    """The state of every attempt of the job, e.g. ["REQUEUED", "COMPLETED"]."""
    return [a["state"] for a in sacct_attempts(job_id)]


def sacct_field(job_id: str, field: str) -> str:
    """One field (or several, "A,B" -> "a|b") of the job's last attempt in accounting; "" when none."""
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", field], capture_output=True, text=True, check=True
    ).stdout
    return out.strip().splitlines()[0] if out.strip() else ""


def squeue_count() -> int:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return len(out.split())


def assert_same_weights(run_dir: Path, reference_dir: Path, step: int, reference: str) -> None:
    """Both runs ended at ``step`` with bitwise equal model weights (``reference`` names the other run)."""
    from hpcvp.train.checkpoint import load_model_state

    run_step, state = load_model_state(run_dir)
    ref_step, ref_state = load_model_state(reference_dir)
    assert run_step == ref_step == step
    assert state.keys() == ref_state.keys()
    different = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not different, f"weights of {run_dir.name} differ from {reference} in {different[:5]}"


def template_env(data: Path, run_root: Path, run: str, settings: list[str], **extra: str) -> dict[str, str]:
    """This process's environment plus what slurm/seg.sbatch reads for a tiny run on CPU tasks."""
    env = dict(os.environ)
    env.update(
        HPCVP_DATA=str(data),
        HPCVP_RUN_ROOT=str(run_root),
        HPCVP_RUN=run,
        HPCVP_PRESET="tiny",
        HPCVP_SET=" ".join(settings),
        HPCVP_GPUS_ARE_CPUS="1",
        HPCVP_PYTHON=sys.executable,
        HPCVP_HOME=str(REPO),
        SBATCH_GRES="none",
        **extra,
    )
    return env


def sbatch_template(options: list[str], env: dict[str, str], cwd: Path) -> str:
    """``sbatch --parsable OPTIONS slurm/seg.sbatch`` run in ``cwd`` with ``env``: the job id."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", *options, str(REPO / "slurm" / "seg.sbatch")],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return submitted.stdout.strip().split(";")[0]
