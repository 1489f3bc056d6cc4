"""Real torch.distributed (gloo, 2 processes): coordinated preemption and bitwise-exact resume.

Each rank is a separate `python -m hpcvp.train.toy` process, launched with torchrun-style or
Slurm-style (SLURM_PROCID / SLURM_NTASKS / SLURM_JOB_NODELIST / SLURM_JOB_ID) environments.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcvp.train import EXIT_REQUEUE, RunDir, latest_step, load_latest
from hpcvp.train.dist import PORT_BASE, PORT_SPAN
from hpcvp.train.toy import tree_differences

REPO = Path(__file__).resolve().parents[1]
# 96 samples / 2 ranks / (batch 4 x accumulation 2) = 6 steps per epoch; saves every 4 steps
CFG = dict(
    max_steps=28,
    batch_size=4,
    grad_accum=2,
    log_every=1,
    num_workers=0,
    save_every_steps=4,
    save_every_minutes=0,
    eval_every=7,
    lr=0.01,
)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port_for_slurm() -> tuple[int, int]:
    """A free port p in the range port_from_job_id maps to, and a job id mapping to it."""
    rng = random.Random()
    for _ in range(200):
        port = PORT_BASE + rng.randrange(PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port, 3_000_000 + (port - PORT_BASE)  # (3_000_000 % PORT_SPAN == 0)
    raise RuntimeError("no free port")


def _launch(run_dir: Path, launcher: str, extra_args=(), stdout_rank0=False):
    port, job_id = _free_port_for_slurm()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "hpcvp.train.toy", "--run-dir", str(run_dir)]
    for k, v in CFG.items():
        cmd += ["--set", f"{k}={v}"]
    cmd += list(extra_args)  # after CFG: a --set here wins
    procs = []
    for rank in range(2):
        env = dict(base)
        if launcher == "torchrun":
            env.update(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        else:
            env.update(
                SLURM_JOB_ID=str(job_id),
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank),
                SLURM_JOB_NODELIST="localhost",
                SLURM_TASKS_PER_NODE="2",
            )
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    return procs


def _finish(procs, timeout=240):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("HPCVP_RESULT ")]
        assert lines, f"rank exited {proc.returncode} without a result:\n{out}\n{err}"
        results.append((proc.returncode, json.loads(lines[-1].split(" ", 1)[1])))
    return results


def _assert_stopped_together(results, step, signal_name):
    for code, res in results:
        assert code == EXIT_REQUEUE, results
        assert (res["status"], res["step"], res["signal"]) == ("preempted", step, signal_name)


def _metrics(run):
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in run.read_metrics()]


def test_one_rank_process_group_trains_under_ddp_and_resumes_exactly(tmp_path):
    """HPCVP_ONE_RANK_GROUP=1 (what tools/gpu_check.sh uses for its NCCL smoke on one GPU): one
    rank joins a process group and trains under DDP; preempted and resumed, it ends bitwise equal
    to a plain single-process run."""
    port, _ = _free_port_for_slurm()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    group = dict(
        base, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HPCVP_ONE_RANK_GROUP="1"
    )

    def toy(run, env, *extra):
        cmd = [sys.executable, "-m", "hpcvp.train.toy", "--run-dir", str(run.path)]
        for k, v in {**CFG, "max_steps": 12}.items():
            cmd += ["--set", f"{k}={v}"]
        done = subprocess.run([*cmd, *extra], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        results = [line for line in done.stdout.splitlines() if line.startswith("HPCVP_RESULT ")]
        assert results, f"exit {done.returncode} without a result:\n{done.stdout}\n{done.stderr}"
        return done.returncode, json.loads(results[-1].split(" ", 1)[1])

    ref, run = RunDir(tmp_path / "plain"), RunDir(tmp_path / "group")
    code, result = toy(ref, base)
    assert (code, result["status"], result["backend"]) == (0, "completed", None)
    code, result = toy(run, group, "--signal-at", "6")
    assert (code, result["status"], result["step"], result["backend"]) == (EXIT_REQUEUE, "preempted", 6, "gloo")
    code, result = toy(run, group)
    assert (code, result["status"], result["resumed_from"], result["backend"]) == (0, "completed", 6, "gloo")
    a, b = load_latest(ref.checkpoints).state, load_latest(run.checkpoints).state
    assert not tree_differences(a["model"], b["model"]) and not tree_differences(a["optimizer"], b["optimizer"])
    assert _metrics(ref) == _metrics(run)


@pytest.mark.slow
def test_interrupted_ddp_run_ends_bitwise_equal_to_uninterrupted(tmp_path):
    rng = random.Random(1337)
    ref = RunDir(tmp_path / "ref")
    run = RunDir(tmp_path / "run")
    # the interrupted run reads with 2 DataLoader workers per rank and keeps snapshots at steps 14
    # and 28; neither may change the training (the reference has neither)
    users = ["--set", "num_workers=2", "--set", "snapshots=2"]
    # the reference runs while the first interrupted segment runs (4 processes at most)
    ref_procs = _launch(ref.path, "torchrun")
    # 1) every rank signalled, right after the save at step 4
    first = _finish(_launch(run.path, "torchrun", [*users, "--signal-at", "5"]))
    _assert_stopped_together(first, 5, "SIGUSR2")
    for code, res in _finish(ref_procs):
        assert (code, res["status"], res["step"]) == (0, "completed", 28)
    # 2) only rank 1 signalled, at a save step (the save happens once)
    _assert_stopped_together(
        _finish(_launch(run.path, "torchrun", [*users, "--signal-at", "8", "--signal-rank", "1"])), 8, "SIGUSR2"
    )
    # 3) Slurm-style launch; only rank 0 gets SIGTERM at a random mid-epoch step
    mid = rng.choice([s for s in range(9, 20) if s % 4 and s % 6])
    _assert_stopped_together(
        _finish(
            _launch(run.path, "slurm", [*users, "--signal-at", str(mid), "--signal-rank", "0", "--signal", "TERM"])
        ),
        mid,
        "SIGTERM",
    )
    assert latest_step(run) == mid
    # 4) a signal from outside, at a random moment, to rank 1 only
    procs = _launch(run.path, "slurm", [*users, "--step-sleep-s", "0.05"])
    wait_for = mid + rng.randint(1, 4)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        steps = [r["step"] for r in run.read_metrics()] if run.metrics_path.exists() else []
        if steps and steps[-1] >= wait_for:
            break
        assert procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))
    procs[1].send_signal(signal.SIGUSR2)
    results = _finish(procs)
    stopped = results[0][1]["step"]
    assert wait_for <= stopped < CFG["max_steps"]
    _assert_stopped_together(results, stopped, "SIGUSR2")
    # 5) to the end
    for code, res in _finish(_launch(run.path, "torchrun", users)):
        assert (code, res["status"], res["step"], res["resumed_from"]) == (0, "completed", 28, stopped)

    final = load_latest(run.checkpoints)
    assert "step_00000014" in {p.name for p in run.checkpoints.iterdir()}  # the snapshot outlives pruning
    assert len(final.ranks) == 2  # every rank's RNG state, and they differ (per-rank seeding)
    assert not torch.equal(final.ranks[0]["rng"]["torch"], final.ranks[1]["rng"]["torch"])
    a, b = load_latest(ref.checkpoints).state, final.state
    assert not tree_differences(a["model"], b["model"]), "weights differ"
    assert not tree_differences(a["optimizer"], b["optimizer"]), "optimizer state differs"
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 29))
    assert _metrics(ref) == _metrics(run)
    assert sorted(p.name for p in run.pictures.iterdir()) == ["curves.png"] + [
        f"eval_{s:08d}.json" for s in (7, 14, 21, 28)
    ]


def test_nan_gradients_on_one_rank_are_skipped_or_stop_every_rank_together(tmp_path):
    """Rank 1's loss is NaN at step 5 only: DDP averages the NaN into both ranks' gradients, both
    skip that step and finish with equal, finite weights. NaN from step 5 on: both ranks stop at
    step 9 (five skipped in a row) with the error, and the last checkpoint is step 8's."""
    once = RunDir(tmp_path / "once")
    for code, res in _finish(_launch(once.path, "torchrun", ["--nan-at", "5:1"])):
        assert (code, res["status"], res["step"]) == (0, "completed", 28)
    assert [r["step"] for r in once.read_metrics() if r.get("skipped_steps")] == [5]
    state = load_latest(once.checkpoints).state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    always = RunDir(tmp_path / "always")
    for proc in _launch(always.path, "torchrun", ["--nan-at", "5-1000:1", "--set", "eval_every=0"]):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 1, (out, err)
        assert "NonFiniteLossError" in err and "step 9:" in err, err[-3000:]
    assert latest_step(always) == 8


def _slurm_available() -> bool:
    if shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slurm
@pytest.mark.slow
def test_srun_tasks_stop_together_on_scancel_signal(tmp_path):
    """The deployment path: srun starts 2 tasks (Slurm env), Slurm delivers USR2 to both."""
    if not _slurm_available():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no Slurm cluster answers (tools/slurm_local_cluster.sh up)")
        pytest.skip("no Slurm cluster")
    run = RunDir(tmp_path / "srun")
    name = f"hpcvp-engine-test-{os.getpid()}"
    toy = [
        sys.executable,
        "-m",
        "hpcvp.train.toy",
        "--run-dir",
        str(run.path),
        "--set",
        "max_steps=200",
        "--set",
        "batch_size=8",
        "--set",
        "log_every=1",
        "--set",
        "num_workers=0",
    ]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    srun = ["srun", "-n", "2", "-c", "1", "-J", name]
    proc = subprocess.Popen(
        srun + toy + ["--step-sleep-s", "0.05"],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run.metrics_path.exists() and len(run.read_metrics()) >= 10):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "srun job did not start training"
            time.sleep(0.1)
        job = subprocess.run(
            ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(job) == 1, job
        subprocess.run(["scancel", "--signal=USR2", job[0]], check=True)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    results = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("HPCVP_RESULT ")]
    assert len(results) == 2, out
    assert {r["status"] for r in results} == {"preempted"}
    assert len({r["step"] for r in results}) == 1 and results[0]["step"] < 200
    assert proc.returncode == EXIT_REQUEUE, out  # srun passes the tasks' status on
    done = subprocess.run(srun + toy, env=env, cwd=REPO, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 201))
