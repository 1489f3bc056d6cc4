"""DataLoader workers under the signals Slurm sends to every process of a step (issue 10, item 1).

Two real gloo ranks with ``num_workers=2`` (persistent workers) share one process group, as the
tasks of a Slurm step do; SIGTERM goes to the whole group (ranks and their workers), like
``scontrol requeue`` / ``scancel`` / preemption. Every rank must save at the same step boundary and
exit with EXIT_REQUEUE, no worker may die with a traceback, and the resumed run must end bitwise
equal to an uninterrupted one (model, optimizer, every rank's RNG state).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcvp.train import EXIT_REQUEUE, RunDir, load_latest
from hpcvp.train.loader import WorkerInit, make_loader
from hpcvp.train.toy import tree_differences

REPO = Path(__file__).resolve().parents[1]
# 96 samples / 2 ranks / (batch 4 x accumulation 2) = 6 steps per epoch
CFG = dict(
    max_steps=24,
    batch_size=4,
    grad_accum=2,
    log_every=1,
    save_every_steps=10,
    save_every_minutes=0,
    eval_every=8,
    lr=0.01,
    prefetch_factor=4,
)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER_DIED = "DataLoader worker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, workers: int, extra_args=()) -> list[subprocess.Popen]:
    """Both ranks in one new process group (its id is rank 0's pid), like one Slurm step."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "hpcvp.train.toy", "--run-dir", str(run_dir), *extra_args]
    for k, v in {**CFG, "num_workers": workers}.items():
        cmd += ["--set", f"{k}={v}"]
    procs: list[subprocess.Popen] = []
    for rank in range(2):
        env = dict(base, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        group = {"process_group": 0} if rank == 0 else {"process_group": procs[0].pid}
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **group
            )
        )
    return procs


def _finish(procs, timeout=240) -> list[tuple[int, dict, str]]:
    out = []
    for proc in procs:
        text, _ = proc.communicate(timeout=timeout)
        lines = [line for line in text.splitlines() if line.startswith("HPCVP_RESULT ")]
        assert lines, f"rank exited {proc.returncode} without a result:\n{text}"
        out.append((proc.returncode, json.loads(lines[-1].split(" ", 1)[1]), text))
    return out


def _wait_for_step(run: RunDir, procs, step: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        steps = [r["step"] for r in run.read_metrics()] if run.metrics_path.exists() else []
        if steps and steps[-1] >= step:
            return
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    raise AssertionError(f"training never reached step {step}")


def _worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.mark.slow
def test_sigterm_to_ranks_and_workers_saves_at_one_step_and_resumes_exactly(tmp_path):
    ref, run = RunDir(tmp_path / "ref"), RunDir(tmp_path / "run")
    for code, res, _ in _finish(_launch(ref.path, workers=0)):
        assert (code, res["status"], res["step"]) == (0, "completed", 24)

    stops = []
    for wait_for in (4, 13):  # mid-epoch, before and after the periodic save at step 10
        procs = _launch(run.path, workers=2, extra_args=["--step-sleep-s", "0.05"])
        try:
            _wait_for_step(run, procs, wait_for)
            workers = [w for p in procs for w in _worker_pids(p.pid)]
            assert len(workers) >= 4, workers  # 2 persistent workers per rank are up
            os.killpg(procs[0].pid, signal.SIGTERM)  # ranks and workers alike, as Slurm does
            results = _finish(procs)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        steps = {res["step"] for _, res, _ in results}
        assert len(steps) == 1, results  # every rank stopped at the same step boundary
        for code, res, text in results:
            assert (code, res["status"], res["signal"]) == (EXIT_REQUEUE, "preempted", "SIGTERM"), text
            assert WORKER_DIED not in text and "Traceback" not in text, text
        stop = steps.pop()
        assert wait_for <= stop < CFG["max_steps"]
        assert load_latest(run.checkpoints).step == stop  # saved at the stop, not an older one
        stops.append(stop)

    for code, res, text in _finish(_launch(run.path, workers=2)):
        assert (code, res["status"], res["step"], res["resumed_from"]) == (0, "completed", 24, stops[-1]), text
    a, b = load_latest(ref.checkpoints), load_latest(run.checkpoints)
    assert not tree_differences(a.state["model"], b.state["model"]), "weights differ"
    assert not tree_differences(a.state["optimizer"], b.state["optimizer"]), "optimizer state differs"
    assert not tree_differences(a.ranks, b.ranks), "RNG states / metric windows differ"
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 25))  # no step redone or lost


_STAGE_INIT: list[int] = []


def _ignored_in_worker(item):
    ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)]
    return [*ignored, bool(_STAGE_INIT)]


class _Probe(list):
    def __getitem__(self, i):
        return _ignored_in_worker(i)

    def __len__(self):
        return 2


def _mark_worker(worker_id):
    _STAGE_INIT.append(worker_id)


def test_make_loader_workers_ignore_stop_signals_and_run_the_stage_init():
    loader = make_loader(_Probe(), batch_size=None, num_workers=1, worker_init_fn=_mark_worker)
    assert isinstance(loader.worker_init_fn, WorkerInit) and loader.worker_init_fn.then is _mark_worker
    assert [list(map(bool, x)) for x in loader] == [[True, True, True, True]] * 2
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process is untouched
