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
- every pre-flight refusal, with nothing submitted; ``--status`` over all of it;
- issue 10: ``scontrol requeue`` with DataLoader workers, and a run with workers stopped at seeded
  random steps by five mixed graceful interruptions (requeue, USR2 to the batch shell, TERM,
  preemption-style TERM, scancel + relaunch): no step redone, final training state bitwise equal.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from slurm_helpers import (
    assert_same_weights,
    job_id_of,
    launch_args,
    logs_of,
    metric_steps,
    sacct_attempts,
    sacct_states,
    sbatch_template,
    squeue_count,
    template_env,
    wait_for_step,
    wait_until_done,
)

from hpcvp.cluster import launch
from hpcvp.cluster.status import collect_status, read_events

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Small enough for 2 shared cores, long enough (60 steps) to be interrupted in the middle.
SEG_SETTINGS = ["train.max_steps=60", "train.batch_size=4", "train.log_every=2", "eval_max_frames=8"]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-runs")


@pytest.fixture(scope="module")
def packed(slurm_cluster, default_dataset_dir) -> Path:
    return default_dataset_dir


def seg_args(packed: Path, run_root: Path, run: str) -> list[str]:
    return launch_args("seg", packed, run_root, run, SEG_SETTINGS, "--gpus", "2")


def final_weights(run_dir: Path) -> tuple[int, dict]:
    from hpcvp.train.checkpoint import load_model_state

    return load_model_state(run_dir)


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
    states = sacct_states(job_id)
    assert states == ["REQUEUED", "COMPLETED"], states
    logs = logs_of(run_dir)
    assert "saved; job requeued" in logs and "resumed from step" in logs
    resumed_from = int(logs.split("resumed from step ")[1].split()[0])
    assert 6 <= resumed_from < 60
    assert_same_weights(run_dir, reference_run, 60, "the uninterrupted run")


def test_usr2_to_the_batch_shell_of_a_launcher_job_saves_requeues_and_resumes(packed, run_root):
    """``scancel --batch -s USR2`` (what ``--signal=B:USR2@S`` does) on a submitit job: the batch
    shell's trap passes it on to the tasks, which save; rank 0 requeues; the run resumes."""
    assert launch.main(seg_args(packed, run_root, "batch-usr2")) == 0
    run_dir = run_root / "seg" / "batch-usr2"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 6)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True)
    assert wait_until_done(job_id) == "COMPLETED", logs_of(run_dir)[-4000:]
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    logs = logs_of(run_dir)
    assert "the batch shell got SIGUSR2: passing it on to the tasks" in logs, logs[-4000:]
    assert "saved; job requeued" in logs and "resumed from step" in logs
    resumed_from = int(logs.split("resumed from step ")[1].split()[0])
    assert 6 <= resumed_from < 60
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps  # every step logged once: none redone
    assert final_weights(run_dir)[0] == 60


def test_sbatch_template_forwards_signal_requeues_and_matches(packed, run_root, reference_run):
    env = template_env(packed, run_root, "sbatch", SEG_SETTINGS, SBATCH_MEM_PER_NODE="6G")
    output = run_root / "sbatch-%j.out"
    job_id = sbatch_template(["--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}"], env, run_root)
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
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    restarts = [e.get("restart") for e in read_events(run_dir) if e.get("event") == "started"]
    assert restarts == [0, 1]
    assert_same_weights(run_dir, reference_run, 60, "the uninterrupted run")


def test_scancel_saves_and_stays_cancelled(packed, run_root):
    """SIGTERM from scancel makes every rank save (like a preemption), but the job is not requeued."""
    assert launch.main(seg_args(packed, run_root, "cancelled")) == 0
    run_dir = run_root / "seg" / "cancelled"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 2)
    subprocess.run(["scancel", job_id], check=True)
    assert wait_until_done(job_id) == "CANCELLED"
    time.sleep(3)  # had it been requeued, a second attempt would be listed by now
    assert sacct_states(job_id) == ["CANCELLED"]
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
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    logs = logs_of(run_dir)
    assert "DataLoader worker" not in logs and "killed by signal" not in logs, logs[-4000:]
    resumed_from = int(logs.split("resumed from step ")[1].split()[0])
    assert 6 <= resumed_from < 60  # the state saved at the signal, not a fresh start
    engine_logs = [(run_dir / "logs" / f"engine.rank{r}.log").read_text() for r in (0, 1)]
    for text in engine_logs:  # both ranks stopped gracefully at that same step
        assert f"SIGTERM received by at least one rank; saved at step {resumed_from}" in text, text[-2000:]
    assert_same_weights(run_dir, reference_run, 60, "the uninterrupted run")


# --------------------------------------------------------------------------------------------
# Issue 10: mixed interruptions with DataLoader workers, each a graceful stop at a step boundary.

# kind -> what is sent. All of them make every rank save at the next step boundary; all but
# "cancel" leave the job to be requeued (by Slurm, or by rank 0 when the job is still RUNNING).
INTERRUPTIONS = {
    # Slurm TERMs every process of the job, then requeues it itself.
    "requeue": [["scontrol", "requeue"]],
    # What --signal=B:USR2@S does before the time limit: the batch shell's trap passes it on.
    "batch-usr2": [["scancel", "--batch", "--signal=USR2"]],
    # TERM to the tasks only; the job stays RUNNING, so rank 0 requeues it.
    "term": [["scancel", "--signal=TERM"]],
    # Preemption with PreemptMode=REQUEUE and a GraceTime: Slurm TERMs the job's tasks, then
    # requeues the job (rank 0 sees it is no longer RUNNING). Not --full: an srun that gets TERM
    # itself SIGKILLs its tasks at once (srun(1), "forcing job termination"), which Slurm's
    # preemption does not do and no job can survive (README, "sbatch templates").
    "preempt-term": [["scancel", "--signal=TERM"], ["scontrol", "requeue"]],
    # A cancel ends the job (CANCELLED, after every rank saved); the user launches the run again.
    "cancel": [["scancel"]],
}
MIXED_SEED = 10  # the order and the steps of the interruptions; change it to try another mix


def mixed_plan(seed: int = MIXED_SEED, max_step: int = 48) -> list[tuple[str, int]]:
    """(kind, step) pairs: every kind once, in a seeded random order, at seeded random steps."""
    import random

    rng = random.Random(seed)
    kinds = list(INTERRUPTIONS)
    rng.shuffle(kinds)
    steps = sorted(rng.sample(range(4, max_step), len(kinds)))
    return list(zip(kinds, steps))


def interrupt(kind: str, job_id: str) -> None:
    for command in INTERRUPTIONS[kind]:
        subprocess.run([*command, job_id], check=True, capture_output=True)


def engine_steps(run_dir: Path, rank: int, what: str) -> list[int]:
    """Steps of every "<what> N" line of a rank's engine log ("saved at step", "resumed from step")."""
    import re

    text = (run_dir / "logs" / f"engine.rank{rank}.log").read_text()
    return [int(n) for n in re.findall(rf"{what} (\d+)", text)]


def deep_differences(a, b, path: str = "") -> list[str]:
    """Paths at which two checkpoint states differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and a.shape == b.shape and torch.equal(a, b) else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in deep_differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in deep_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def assert_same_training_state(run_dir: Path, reference_dir: Path) -> None:
    """Model, optimizer, scheduler, sampler position and every rank's RNG states: bitwise equal."""
    from hpcvp.train.checkpoint import load_latest

    ckpt, ref = load_latest(run_dir), load_latest(reference_dir)
    assert ckpt.step == ref.step == 60
    # The recorded settings differ (train.num_workers); everything the training computes may not.
    settings = ("train_config", "identity", "num_threads")
    state = {k: v for k, v in ckpt.state.items() if k not in settings}
    ref_state = {k: v for k, v in ref.state.items() if k not in settings}
    assert {"model", "optimizer", "scheduler"} <= state.keys()
    different = deep_differences(state, ref_state, "state")
    assert not different, f"differs from the uninterrupted run at {different[:5]}"
    assert len(ckpt.ranks) == len(ref.ranks) == 2
    for rank, (mine, theirs) in enumerate(zip(ckpt.ranks, ref.ranks)):
        different = deep_differences(mine["rng"], theirs["rng"], f"rank{rank}.rng")
        assert not different, f"RNG states differ from the uninterrupted run at {different[:5]}"


def test_mixed_interruptions_with_workers_redo_no_step_and_match(packed, run_root, reference_run):
    """Issue 10: a 2-task run with 2 persistent DataLoader workers per rank, stopped at seeded
    random steps by every graceful interruption (requeue, USR2 to the batch shell, TERM to the
    tasks, preemption-style TERM + requeue, scancel + relaunch of the same --run). Each stop saves
    at a step boundary and the next attempt resumes from exactly that step (no step redone);
    the run ends with model, optimizer, scheduler, sampler and RNG states equal to the
    uninterrupted reference's, bit for bit."""
    args = seg_args(packed, run_root, "mixed") + ["--set", "train.num_workers=2"]
    # No periodic checkpoint to fall back to: only the saves at the signals carry the run.
    args += ["--set", "train.save_every_steps=0", "--set", "train.save_every_minutes=0"]
    run_dir = run_root / "seg" / "mixed"
    assert launch.main(args) == 0
    plan = mixed_plan()
    done: list[tuple[str, int, str]] = []  # (kind, step aimed at, job id)
    last_saved = 0
    for kind, step in plan:
        job_id = job_id_of(run_dir)
        # At least two steps of this attempt run before the next stop.
        target = max(step, last_saved + 2)
        wait_for_step(run_dir, job_id, target)
        interrupt(kind, job_id)
        if kind == "cancel":
            assert wait_until_done(job_id) == "CANCELLED", logs_of(run_dir)[-4000:]
            assert launch.main(args) == 0, "relaunching the same --run failed"
            assert job_id_of(run_dir) != job_id
        # The stop is complete when rank 0 logged its save (then the next attempt may be waited for).
        deadline = time.monotonic() + 120
        while len(engine_steps(run_dir, 0, "saved at step")) < len(done) + 1:
            assert time.monotonic() < deadline, f"{kind}: no save within 120 s\n{logs_of(run_dir)[-4000:]}"
            time.sleep(0.25)
        last_saved = engine_steps(run_dir, 0, "saved at step")[-1]
        assert last_saved >= target, (kind, last_saved, target)
        done.append((kind, target, job_id))
    final_job = job_id_of(run_dir)
    assert wait_until_done(final_job) == "COMPLETED", logs_of(run_dir)[-4000:]

    saved = engine_steps(run_dir, 0, "saved at step")
    summary = [(kind, target, s) for (kind, target, _), s in zip(done, saved)]
    assert len(saved) == len(plan), summary
    for rank in (0, 1):
        # every stop saved on both ranks at the same step, and the next attempt resumed there
        assert engine_steps(run_dir, rank, "saved at step") == saved, (rank, summary)
        assert engine_steps(run_dir, rank, "resumed from step") == saved, (rank, summary)
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 60, steps  # every logged step once
    logs = logs_of(run_dir)
    for crash in ("DataLoader worker", "killed by signal", "Traceback"):
        assert crash not in logs, f"{crash!r} in the job logs:\n{logs[-4000:]}"
    # Slurm's own account: the cancelled job, and one REQUEUED attempt per requeueing stop.
    jobs = sorted({job for _, _, job in done} | {final_job}, key=int)
    assert len(jobs) == 2
    states = [a["state"] for job in jobs for a in sacct_attempts(job)]
    assert states.count("REQUEUED") == len(plan) - 1 and states.count("CANCELLED") == 1, states
    assert states[-1] == "COMPLETED", states
    row = {(r.stage, r.run): r for r in collect_status(run_root)}[("seg", "mixed")]
    assert row.restarts == len(plan) and row.checkpoint_step == 60  # 4 requeues + 1 relaunch
    assert_same_training_state(run_dir, reference_run)
