"""The launcher on a real Slurm cluster: the single-node one from tools/slurm_local_cluster.sh.

Runs (never skips) when CI=true; elsewhere it skips unless that cluster (ClusterName "hpcvp")
answers — it never submits to any other cluster. Jobs are the seg stage (tiny preset, 2 CPU tasks
with gloo standing for 2 GPUs) on the embedded synthetic dataset:

- an uninterrupted ``launch.py --stage seg --gpus 2`` run (the reference);
- the same job sent submitit's USR2 mid-run: every rank saves, rank 0 requeues, the job resumes and
  ends with weights equal to the reference; sacct shows the REQUEUED attempt;
- ``sbatch slurm/seg.sbatch`` with the pre-timeout USR2 sent to the batch shell (what
  ``--signal=B:USR2@S`` does): forwarded to the tasks, requeued by the script, same weights;
- ``--stage all``: pack -> seg -> pseudo-label -> simvp -> predict run by Slurm in order;
- ``scancel``: every rank saves, and the job stays cancelled (no requeue of a cancelled job);
- every pre-flight refusal, with nothing submitted; ``--status`` over all of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcvp.cluster import launch
from hpcvp.cluster.profiles import running_slurm_cluster_name
from hpcvp.cluster.status import collect_status, read_events, slurm_job_states

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER_NAME = "hpcvp"
# Small enough for 2 shared cores, long enough (60 steps) to be interrupted in the middle.
SEG_SETTINGS = ["train.max_steps=60", "train.batch_size=4", "train.log_every=2", "eval_max_frames=8"]
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def slurm_cluster() -> str:
    name = running_slurm_cluster_name() if shutil.which("sbatch") else None
    if name != LOCAL_CLUSTER_NAME:
        why = (
            "no Slurm cluster answers"
            if name is None
            else f"the Slurm cluster here is {name!r}, not the local test cluster {LOCAL_CLUSTER_NAME!r}"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}: bring it up with `bash tools/slurm_local_cluster.sh up`")
        pytest.skip(f"{why} (bash tools/slurm_local_cluster.sh up)")
    return name


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-runs")


@pytest.fixture(scope="module")
def packed(slurm_cluster, default_dataset_dir) -> Path:
    return default_dataset_dir


def seg_args(packed: Path, run_root: Path, run: str) -> list[str]:
    args = [
        "--stage",
        "seg",
        "--gpus",
        "2",
        "--data",
        str(packed),
        "--run-root",
        str(run_root),
        "--run",
        run,
        "--preset",
        "tiny",
    ]
    for item in SEG_SETTINGS:
        args += ["--set", item]
    return args


def job_id_of(run_dir: Path) -> str:
    ids = [e["job_id"] for e in read_events(run_dir) if e.get("job_id")]
    assert ids, f"{run_dir}/jobs.jsonl names no job"
    return ids[-1]


def sacct_attempts(job_id: str) -> list[dict[str, str]]:
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


def wait_until_done(job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = slurm_job_states([job_id]).get(job_id)
        if state and state.state in launch.TERMINAL_STATES:
            return state.state
        time.sleep(2)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} did not end within {timeout:.0f}s (cancelled)")


def wait_for_step(run_dir: Path, job_id: str, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl has a line at or past ``step`` (the job is mid-training)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            steps = [
                json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip().endswith("}")
            ]
            if steps and max(steps) >= step:
                return
        state = slurm_job_states([job_id]).get(job_id)
        if state and state.state in launch.TERMINAL_STATES:
            pytest.fail(f"job {job_id} ended ({state.state}) before reaching step {step}")
        time.sleep(0.25)
    pytest.fail(f"job {job_id} did not reach step {step} within {timeout}s")


def final_weights(run_dir: Path) -> tuple[int, dict]:
    from hpcvp.train.checkpoint import load_model_state

    return load_model_state(run_dir)


def assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    step, state = final_weights(run_dir)
    ref_step, ref_state = final_weights(reference_dir)
    assert step == ref_step == 60
    assert state.keys() == ref_state.keys()
    different = [k for k in state if not torch.equal(state[k], ref_state[k])]
    assert not different, f"weights differ from the uninterrupted run in {different[:5]}"


def logs_of(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").rglob("*_log.*")))


@pytest.fixture(scope="module")
def reference_run(packed, run_root) -> Path:
    """An uninterrupted 2-task seg run through launch.py (submitit), waited for with --wait."""
    status = launch.main(seg_args(packed, run_root, "reference") + ["--wait"])
    run_dir = run_root / "seg" / "reference"
    assert status == 0, logs_of(run_dir)[-4000:]
    return run_dir


def test_stage_on_two_cpu_tasks_completes(reference_run):
    job_id = job_id_of(reference_run)
    attempts = sacct_attempts(job_id)
    assert [a["state"] for a in attempts] == ["COMPLETED"]
    assert final_weights(reference_run)[0] == 60
    # submitit ran one task per "GPU", both ranks of one gloo group; their results say completed.
    folder = reference_run / "slurm" / job_id
    assert sorted(p.name for p in folder.glob("*_result.pkl")) == [f"{job_id}_0_result.pkl", f"{job_id}_1_result.pkl"]
    assert "2 rank(s) on cpu via slurm" in logs_of(reference_run)
    script = (folder / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --requeue" in script


def test_interrupted_submitit_job_requeues_resumes_and_matches(packed, run_root, reference_run):
    import submitit

    assert launch.main(seg_args(packed, run_root, "interrupted")) == 0
    run_dir = run_root / "seg" / "interrupted"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 6)
    # What Slurm does before the time limit with submitit's --signal=USR2@S: USR2 to every task.
    submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=(0, 1))._interrupt(timeout=True)
    assert wait_until_done(job_id) == "COMPLETED", logs_of(run_dir)[-4000:]
    states = [a["state"] for a in sacct_attempts(job_id)]
    assert states == ["REQUEUED", "COMPLETED"], states
    logs = logs_of(run_dir)
    assert "saved; job requeued" in logs and "resumed from step" in logs
    resumed_from = int(logs.split("resumed from step ")[1].split()[0])
    assert 6 <= resumed_from < 60
    assert_same_weights(run_dir, reference_run)


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_usr2_to_the_batch_shell_of_a_launcher_job_saves_requeues_and_resumes(packed, run_root):
    """``scancel --batch -s USR2`` (what ``--signal=B:USR2@S`` does) on a submitit job: the batch
    shell's trap passes it on to the tasks, which save; rank 0 requeues; the run resumes."""
    assert launch.main(seg_args(packed, run_root, "batch-usr2")) == 0
    run_dir = run_root / "seg" / "batch-usr2"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 6)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    assert wait_until_done(job_id) == "COMPLETED", logs_of(run_dir)[-4000:]
    assert [a["state"] for a in sacct_attempts(job_id)] == ["REQUEUED", "COMPLETED"]
    logs = logs_of(run_dir)
    assert "the batch shell got SIGUSR2: passing it on to the tasks" in logs, logs[-4000:]
    assert "saved; job requeued" in logs and "resumed from step" in logs
    resumed_from = int(logs.split("resumed from step ")[1].split()[0])
    assert 6 <= resumed_from < 60
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps  # every step logged once: none redone
    assert final_weights(run_dir)[0] == 60


def test_sbatch_template_forwards_signal_requeues_and_matches(packed, run_root, reference_run):
    env = dict(os.environ)
    env.update(
        HPCVP_DATA=str(packed),
        HPCVP_RUN_ROOT=str(run_root),
        HPCVP_RUN="sbatch",
        HPCVP_PRESET="tiny",
        HPCVP_SET=" ".join(SEG_SETTINGS),
        HPCVP_GPUS_ARE_CPUS="1",
        HPCVP_PYTHON=sys.executable,
        HPCVP_HOME=str(REPO),
        SBATCH_GRES="none",
        SBATCH_MEM_PER_NODE="6G",
    )
    output = run_root / "sbatch-%j.out"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={output}",
            str(REPO / "slurm" / "seg.sbatch"),
        ],
        env=env,
        cwd=run_root,
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    run_dir = run_root / "seg" / "sbatch"
    deadline = time.monotonic() + 120
    while not (run_dir / "jobs.jsonl").exists():
        assert time.monotonic() < deadline, "the batch script never started"
        time.sleep(0.5)
    wait_for_step(run_dir, job_id, 6)
    # --signal=B:USR2@S signals the batch shell only; the script must pass it on to the srun tasks.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    assert wait_until_done(job_id) == "COMPLETED"
    log = Path(str(output).replace("%j", job_id)).read_text(errors="replace")
    assert "forwarded SIGUSR2 to the job steps" in log, log[-3000:]
    assert "srun exited with status 75" in log and "requeued (every rank saved" in log
    assert "resumed from step" in log
    assert [a["state"] for a in sacct_attempts(job_id)] == ["REQUEUED", "COMPLETED"]
    restarts = [e.get("restart") for e in read_events(run_dir) if e.get("event") == "started"]
    assert restarts == [0, 1]
    assert_same_weights(run_dir, reference_run)


def test_scancel_saves_and_stays_cancelled(packed, run_root):
    """SIGTERM from scancel makes every rank save (like a preemption), but the job is not requeued."""
    assert launch.main(seg_args(packed, run_root, "cancelled")) == 0
    run_dir = run_root / "seg" / "cancelled"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 2)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_until_done(job_id) == "CANCELLED"
    time.sleep(3)  # had it been requeued, a second attempt would be listed by now
    assert [a["state"] for a in sacct_attempts(job_id)] == ["CANCELLED"]
    assert "so it is not requeued here" in logs_of(run_dir)
    from hpcvp.train.checkpoint import latest_step

    assert latest_step(run_dir) is not None and latest_step(run_dir) >= 2  # the state was saved


def test_stage_all_runs_the_chain_in_order(packed, run_root, tmp_path):
    raw = packed.parent / "raw"
    assert (raw / "train").is_dir(), f"the default dataset keeps its raw layout next to {packed}"
    out = tmp_path / "packed"
    status = launch.main(
        [
            "--stage",
            "all",
            "--gpus",
            "2",
            "--src",
            str(raw),
            "--data",
            str(out),
            "--run-root",
            str(run_root),
            "--run",
            "chain",
            "--preset",
            "tiny",
            "--set",
            "seg:train.max_steps=4",
            "--set",
            "seg:eval_max_frames=8",
            "--set",
            "simvp:train.max_steps=2",
            "--set",
            "simvp:eval_max_videos=2",
            "--set",
            "predict:eval_max_videos=4",
            "--wait",
        ]
    )
    stages = ["pack", "seg", "pseudo-label", "simvp", "predict"]
    assert status == 0, "\n".join(logs_of(run_root / s / "chain")[-2000:] for s in stages)
    attempts = [sacct_attempts(job_id_of(run_root / s / "chain")) for s in stages]
    assert all([a["state"] for a in rows] == ["COMPLETED"] for rows in attempts)
    # Each job started only after the one it depends on had ended.
    for before, after in zip(attempts, attempts[1:]):
        assert after[0]["start"] >= before[0]["end"]
    events = [read_events(run_root / s / "chain")[-1] for s in stages]
    assert events[0]["dependency"] == ""
    for parent, child in zip(events, events[1:]):
        assert child["dependency"] == f"afterok:{parent['job_id']}"
    assert (out / "manifest.json").exists()
    assert json.loads((out / "manifest.json").read_text())["pseudo_masks"], "pseudo-label wrote no mask shards"
    assert (run_root / "predict" / "chain" / "submission.pt").exists()


def squeue_count() -> int:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return len(out.split())


@pytest.mark.parametrize(
    "extra, check, expected",
    [
        (["--account", "pr_999_general"], "[account]", "sacctmgr knows no association"),
        (["--partition", "gpuu"], "[partition]", "no such partition (sinfo: cpu, gpu)"),
        (["--constraint", "cpu|h200"], "[constraint]", "feature 'h200' is on no node"),
        (["--gpus", "99"], "[gpus]", "CPUs per node, 1 per GPU task) allows at most"),
        (
            ["--partition", "gpu", "--time", "2:00:00"],
            "[time]",
            "exceeds the MaxTime of partition 'gpu' (sinfo) of 01:00:00",
        ),
        (["--mem", "100000"], "[mem]", "exceeds the largest node of partition 'cpu'"),
        (["--data", "MISSING"], "[data]", "no manifest"),
        (["--run-root", "BLOCKED"], "[run-dir]", "not writable"),
        (["--cluster", "strict-local"], "[account]", "requires --account"),
        (["--cluster", "strict-local", "--account", "pr_000_general"], "[account]", "match '^torch_pr_'"),
        (["--set", "train.nope=1"], "[config]", "unknown key 'nope'"),
    ],
)
def test_preflight_refuses_before_submitting(packed, run_root, tmp_path, monkeypatch, capsys, extra, check, expected):
    # A user profile for this cluster that requires Torch-style accounts.
    user_file = tmp_path / "clusters.json"
    user_file.write_text(
        json.dumps(
            {
                "clusters": {
                    "strict-local": {
                        "extends": "slurm-local",
                        "account_required": True,
                        "account_pattern": "^torch_pr_",
                    }
                }
            }
        )
    )
    monkeypatch.setenv("HPCVP_CLUSTERS", str(user_file))
    blocker = tmp_path / "file"
    blocker.write_text("")
    substitutions = {"MISSING": str(tmp_path / "nothing"), "BLOCKED": str(blocker / "runs")}
    extra = [substitutions.get(a, a) for a in extra]
    args = seg_args(packed, run_root, "refused") + extra
    before = squeue_count()
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert "nothing was submitted" in err
    assert check in err and expected in err, err
    assert squeue_count() == before
    assert not (run_root / "seg" / "refused").exists()
    # Accounts that exist pass the account check on the real sacctmgr.
    if extra[:2] == ["--cluster", "strict-local"] and len(extra) == 4:
        assert launch.main(args[:-2] + ["--account", "torch_pr_000", "--dry-run"]) == 0


def test_status_reports_every_run(run_root, reference_run, capsys, monkeypatch):
    rows = {(r.stage, r.run): r for r in collect_status(run_root)}
    assert rows[("seg", "reference")].state == "COMPLETED" and rows[("seg", "reference")].restarts == 0
    if ("seg", "cancelled") in rows:
        assert rows[("seg", "cancelled")].state == "CANCELLED"
    for name in ("interrupted", "sbatch", "batch-usr2"):
        if ("seg", name) in rows:  # (absent only when that test was deselected)
            assert rows[("seg", name)].state == "COMPLETED"
            assert rows[("seg", name)].restarts == 1
            assert rows[("seg", name)].checkpoint_step == 60
            # Slurm holds a requeued job back a little (BeginTime): the gap is time lost.
            assert rows[("seg", name)].lost_seconds is not None and rows[("seg", name)].lost_seconds > 0
    assert rows[("seg", "reference")].metric.startswith("step 60:")
    monkeypatch.setenv("COLUMNS", "200")
    assert launch.main(["--status", "--run-root", str(run_root)]) == 0
    out = capsys.readouterr().out
    assert "COMPLETED" in out and "reference" in out and job_id_of(reference_run) in out
    assert "time lost" in out


def test_scontrol_requeue_with_dataloader_workers_saves_resumes_and_matches(packed, run_root, reference_run):
    """Issue 10 item 1: ``scontrol requeue`` SIGTERMs every process of the step, DataLoader workers
    (2 per rank, persistent) included. The ranks must still save at a step boundary (no periodic
    checkpoint to fall back to here), Slurm requeues, and the run ends equal to the reference."""
    args = seg_args(packed, run_root, "workers") + ["--set", "train.num_workers=2"]
    args += ["--set", "train.save_every_steps=0", "--set", "train.save_every_minutes=0"]
    assert launch.main(args) == 0
    run_dir = run_root / "seg" / "workers"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 6)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    assert wait_until_done(job_id) == "COMPLETED", logs_of(run_dir)[-4000:]
    assert [a["state"] for a in sacct_attempts(job_id)] == ["REQUEUED", "COMPLETED"]
    logs = logs_of(run_dir)
    assert "DataLoader worker" not in logs and "killed by signal" not in logs, logs[-4000:]
    resumed_from = int(logs.split("resumed from step ")[1].split()[0])
    assert 6 <= resumed_from < 60  # the state saved at the signal, not a fresh start
    engine_logs = [(run_dir / "logs" / f"engine.rank{r}.log").read_text() for r in (0, 1)]
    for text in engine_logs:  # both ranks stopped gracefully at that same step
        assert f"SIGTERM received by at least one rank; saved at step {resumed_from}" in text, text[-2000:]
    assert_same_weights(run_dir, reference_run)
