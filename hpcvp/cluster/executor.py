"""Running a job's python entry point under submitit (Slurm) or as local processes.

Preemption and time-outs, end to end (submitit path):

1. Slurm sends USR2 to every task ``signal_delay_s`` before the time limit (``--signal=USR2@S``), or
   a preempting scheduler / ``scancel --signal`` sends SIGTERM and/or USR2 to the tasks. A signal
   to the batch shell only (``scancel --batch``, ``--signal=B:``) is passed on to the tasks by the
   trap that heads every script (``sbatch.BATCH_SIGNAL_SETUP``).
2. While the trainer runs, its ``PreemptionFlag`` owns USR2 and SIGTERM on every rank: the ranks
   agree at the next step boundary, save one checkpoint, and the worker returns ``EXIT_REQUEUE``
   on every rank. :class:`HpcvpJob` then asks for the requeue on rank 0 only, through submitit's own
   ``JobEnvironment._requeue`` (``scontrol requeue``), and every rank leaves without writing a
   submitit result (as submitit's own handler does), so the job is not seen as finished.
3. Outside the trainer (start-up, data loading, after training) submitit's handler is in place:
   rank 0 calls :meth:`HpcvpJob.checkpoint` — the callable has no state of its own (all progress is
   in the run dir's checkpoints), so the same call is resubmitted — and requeues; other ranks are
   ended by Slurm's requeue.
4. The requeued job runs the same callable; the worker resumes from the latest checkpoint.

``--max-requeues`` caps this: submitit's ``max_num_timeout`` for time-outs, and
``SLURM_RESTART_COUNT`` (which Slurm increments on every requeue) for both paths here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit

from hpcvp.cluster.profiles import ClusterProfile
from hpcvp.cluster.sbatch import JobRequest, python_command, submitit_parameters
from hpcvp.cluster.status import scontrol_job_fields

# The exit status a worker uses for "state saved, please requeue" (hpcvp.train.signals.EXIT_REQUEUE);
# read from the engine when it is importable so the two never disagree.
try:
    from hpcvp.train.signals import EXIT_PEER_LOST, EXIT_REQUEUE
except ImportError:  # pragma: no cover - the engine is part of the package
    EXIT_REQUEUE, EXIT_PEER_LOST = 75, 76


class JobNotRequeued(RuntimeError):
    """The worker saved and asked for a requeue, but the requeue cap was reached or requeue failed."""


def _resolve_entry(entry: str) -> Callable[[list[str]], int]:
    module_name, _, function_name = entry.partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, function_name or "main")
    except AttributeError as exc:
        raise RuntimeError(f"{module_name} has no function {function_name or 'main'!r}") from exc


class HpcvpJob(submitit.helpers.Checkpointable):
    """A checkpointable submitit callable: runs ``entry(argv)`` ("module:function") on every task.

    ``entry`` returns an exit status: 0 done, EXIT_REQUEUE saved-and-stopped, EXIT_PEER_LOST a node was
    lost for good (no requeue), anything else failed.
    """

    def __init__(self, entry: str, argv: Sequence[str], max_requeues: int, description: str = "") -> None:
        self.entry = entry
        self.argv = list(argv)
        self.max_requeues = int(max_requeues)
        self.description = description or entry

    def __call__(self) -> dict[str, Any]:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        print(f"hpcvp: {self.description}: rank {rank} on {socket.gethostname()}, restart {restarts}", flush=True)
        status = int(_resolve_entry(self.entry)(list(self.argv)))
        if status == 0:
            return {"entry": self.entry, "argv": self.argv, "rank": rank, "restarts": restarts, "status": "completed"}
        if status == EXIT_PEER_LOST:
            # The worker said which peer was lost and where the last checkpoint is, and turned the
            # job's requeue off: leave with that status, without a traceback or a result pickle.
            raise SystemExit(EXIT_PEER_LOST)
        if status != EXIT_REQUEUE:
            raise RuntimeError(f"{self.description}: {self.entry} exited with status {status} on rank {rank}")
        self._requeue_after_save(rank, restarts)  # raises SystemExit or JobNotRequeued
        raise AssertionError("unreachable")

    def _requeue_after_save(self, rank: int, restarts: int) -> None:
        """Every rank saved (the worker said EXIT_REQUEUE). Rank 0 requeues; all ranks leave."""
        if restarts >= self.max_requeues:
            # An exception makes submitit write an "error" result: the job ends FAILED, visibly.
            raise JobNotRequeued(
                f"{self.description}: saved and stopped, but the job was already requeued {restarts} "
                f"time(s) (--max-requeues {self.max_requeues}); launch it again to resume from the checkpoint"
            )
        if rank == 0:
            state = scontrol_job_fields(os.environ.get("SLURM_JOB_ID", "")).get("JobState", "")
            if state != "RUNNING":
                # scancel (CANCELLED) must stay cancelled; a scheduler preempting with requeue
                # (PREEMPTED, REQUEUE*) requeues by itself. Only a job still RUNNING (pre-timeout
                # USR2, or an interrupt that Slurm did not act on) is requeued here.
                print(
                    f"hpcvp: {self.description}: saved; the job is {state or 'gone'}, so it is not requeued here",
                    flush=True,
                )
                raise SystemExit(EXIT_REQUEUE)
            job_env = submitit.JobEnvironment()
            try:
                job_env._requeue(self.max_requeues - restarts - 1)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                # Slurm may act between the state check and our requeue (a preemption's SIGTERM
                # reaches the scontrol child too): if the job is no longer RUNNING, Slurm decides.
                state = scontrol_job_fields(os.environ.get("SLURM_JOB_ID", "")).get("JobState", "")
                if state == "RUNNING":
                    raise JobNotRequeued(f"{self.description}: scontrol requeue failed ({exc})") from exc
                print(
                    f"hpcvp: {self.description}: saved; scontrol requeue did not finish ({exc}) and the job "
                    f"is {state or 'gone'}, so Slurm decides its requeue",
                    flush=True,
                )
                raise SystemExit(EXIT_REQUEUE) from None
            print(f"hpcvp: {self.description}: rank 0 saved; job requeued, leaving", flush=True)
        else:
            # only rank 0 knows whether the job was requeued (or cancelled / preempted by Slurm)
            print(f"hpcvp: {self.description}: rank {rank} saved; stopping (rank 0 decides the requeue)", flush=True)
        # Like submitit's own handler: leave without a result pickle (SystemExit passes through
        # submitit's `except Exception`), so the job is not "done". Ranks other than 0 leave with 0
        # so that a cluster with KillOnBadExit=1 cannot end the step before rank 0 has requeued.
        raise SystemExit(EXIT_REQUEUE if rank == 0 else 0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Called by submitit's USR2 handler on rank 0 outside the trainer: the checkpoints in the
        # run dir carry all progress, so the same call is resubmitted unchanged.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def make_executor(profile: ClusterProfile, request: JobRequest, python: str | None = None) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(
        folder=request.job_folder,
        max_num_timeout=request.max_requeues,
        python=python_command(profile, request, python),
    )
    executor.update_parameters(**submitit_parameters(profile, request))
    return executor


# sbatch lets these input variables override the script's #SBATCH lines; the launcher already
# folded them in below its own flags (plan.sbatch_settings), so they must not reach sbatch again.
RESOLVED_SBATCH_ENV = ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "SBATCH_QOS")


@contextlib.contextmanager
def without_resolved_sbatch_env():
    saved = {name: os.environ.pop(name) for name in RESOLVED_SBATCH_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def submit(profile: ClusterProfile, request: JobRequest, python: str | None = None) -> submitit.Job:
    """Submit one request through submitit; returns the submitit job (``.job_id``)."""
    request.run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(profile, request, python)
    job = HpcvpJob(request.module, request.argv, request.max_requeues, description=f"{request.stage} {request.run_dir}")
    with without_resolved_sbatch_env():
        return executor.submit(job)


def submit_array(profile: ClusterProfile, requests: Sequence[JobRequest], python: str | None = None) -> list[str]:
    """Submit a sweep's requests as one Slurm job array (they differ only in argv and run dir);
    returns the task ids ``<array id>_<index>``, in order. submitit requeues a task as
    ``scontrol requeue <array id>_<index>``: one element, never the others."""
    for request in requests:
        request.run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(profile, requests[0], python)
    with without_resolved_sbatch_env(), executor.batch():
        jobs = [
            executor.submit(HpcvpJob(r.module, r.argv, r.max_requeues, description=f"{r.stage} {r.run_dir}"))
            for r in requests
        ]
    return [str(job.job_id) for job in jobs]


# ---------------------------------------------------------------------------------------------
# Local runs (no Slurm): one process per "GPU", torchrun-style environment, gloo on CPU.


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_local(
    entry: str, argv: Sequence[str], processes: int, env: dict[str, str] | None = None, log_dir: Path | None = None
) -> int:
    """Run ``entry(argv)`` here: in this process for one, else ``processes`` child processes.

    Children get RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT, like torchrun.
    SIGINT/SIGTERM/SIGUSR2 that reach this process are passed on to every child (so a preempted
    local run also saves at a step boundary). Returns the worst exit status (EXIT_REQUEUE counts
    as worse than 0, any other failure worse than EXIT_REQUEUE).
    """
    if processes < 1:
        raise ValueError(f"--gpus {processes}: need at least one process")
    if processes == 1 and not env:
        return int(_resolve_entry(entry)(list(argv)))
    module_name, _, function_name = entry.partition(":")
    code = (
        "import sys, importlib; "
        f"sys.exit(int(getattr(importlib.import_module({module_name!r}), {function_name or 'main'!r})(sys.argv[1:])))"
    )
    port = free_port()
    # Share the cores: by default every torch process would start one thread per core.
    threads = str(
        max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // processes)
    )
    children: list[subprocess.Popen] = []
    logs = []
    for rank in range(processes):
        child_env = dict(os.environ)
        child_env.setdefault("OMP_NUM_THREADS", threads)
        child_env.update(env or {})
        child_env.update(
            RANK=str(rank),
            WORLD_SIZE=str(processes),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(processes),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        stdout = None
        if log_dir is not None and rank > 0:  # rank 0 talks to the terminal; the others to files
            try:
                log_dir.mkdir(parents=True, exist_ok=True)
                handle = open(log_dir / f"local_rank{rank}.log", "ab")
            except OSError as exc:
                for child in children:
                    child.kill()
                for opened in logs:
                    opened.close()
                print(f"error: cannot write the rank logs in {log_dir}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            logs.append(handle)
            stdout = handle
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *argv],
                env=child_env,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout else None,
            )
        )

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    try:
        statuses = []
        for child in children:
            while True:
                try:
                    statuses.append(child.wait())
                    break
                except KeyboardInterrupt:  # pragma: no cover - forwarded above; keep waiting
                    time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for handle in logs:
            handle.close()
    failures = [s for s in statuses if s not in (0, EXIT_REQUEUE)]
    if failures:
        return failures[0] if failures[0] > 0 else 1
    return EXIT_REQUEUE if EXIT_REQUEUE in statuses else 0
