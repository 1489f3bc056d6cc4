"""Cluster profiles, job rendering, pre-flight rules, launch records and status — no cluster needed.

Pre-flight rules are fed canned cluster facts here (a FakeFacts in place of sinfo/sacctmgr/squeue);
tests/test_cluster_slurm.py runs the same checks against the real local Slurm cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcvp.cluster import launch, preflight
from hpcvp.cluster.executor import EXIT_REQUEUE, HpcvpJob, JobNotRequeued
from hpcvp.cluster.profiles import ProfileError, load_profiles, resolve_profile
from hpcvp.cluster.sbatch import (
    JobRequest,
    container_prefix,
    python_command,
    render_submitit_script,
    submitit_parameters,
)
from hpcvp.cluster.slurm_units import format_minutes, parse_partition_limit_minutes, parse_time_minutes, slurm_mem
from hpcvp.cluster.status import find_runs, last_metric, read_events, record_event, run_status

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    """Tests see only the packaged profiles unless they write a user file themselves."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HPCVP_CLUSTERS", raising=False)


def request(tmp_path, **overrides) -> JobRequest:
    fields = dict(
        stage="seg",
        job_name="hpcvp-seg-t",
        run_dir=tmp_path / "runs" / "seg" / "t",
        module="hpcvp.stages.worker:run_worker",
        argv=["--stage", "seg"],
        gpus_per_node=4,
        time_minutes=120,
        mem_gb=64,
        cpus_per_task=8,
        signal_seconds=180,
    )
    fields.update(overrides)
    return JobRequest(**fields)


# --------------------------------------------------------------------------------------------- profiles


def test_packaged_profiles_describe_the_nyu_clusters():
    profiles = load_profiles()
    assert {"greene", "torch", "local", "slurm-local", "slurm"} <= set(profiles)
    greene, torch = profiles["greene"], profiles["torch"]
    assert greene.account_required and greene.gpu_type_via == "gres"
    assert set(greene.gpu_types) == {"rtx8000", "v100", "a100", "h100"}
    assert torch.account_required and torch.gpu_type_via == "constraint"
    assert torch.max_gpus_per_user == 24
    assert torch.preemptible_comment == "preemption=yes;requeue=true"
    assert profiles["local"].scheduler == "local"
    assert profiles["slurm-local"].gpus_are_cpus and "hpcvp" in profiles["slurm-local"].slurm_cluster_names


def test_user_file_overrides_and_adds_clusters(tmp_path, monkeypatch):
    user = tmp_path / "clusters.json"
    user.write_text(
        json.dumps(
            {
                "clusters": {
                    "greene": {"default_time": "02:00:00"},
                    "mylab": {"extends": "torch", "slurm_cluster_names": ["mylab"], "max_gpus_per_user": 8},
                }
            }
        )
    )
    monkeypatch.setenv("HPCVP_CLUSTERS", str(user))
    profiles = load_profiles()
    assert profiles["greene"].default_time == "02:00:00"
    assert profiles["greene"].account_required  # untouched keys stay
    assert profiles["mylab"].max_gpus_per_user == 8
    assert profiles["mylab"].gpu_type_via == "constraint"  # from torch
    assert profiles["mylab"].source == str(user)


def test_default_user_file_location(tmp_path):
    config = Path(os.environ["HOME"]) / ".config" / "hpcvp"
    config.mkdir(parents=True)
    (config / "clusters.json").write_text(json.dumps({"clusters": {"local": {"default_preset": "full"}}}))
    assert load_profiles()["local"].default_preset == "full"


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"clusters": {"greene": {"acount_required": true}}}', "unknown key 'acount_required'"),
        ('{"clusters": {"greene": {"max_gpus_per_node": "4"}}}', "must be a positive integer"),
        ('{"clusters": {"x": {"extends": "nowhere"}}}', "extends unknown cluster 'nowhere'"),
        ('{"clusters": {"greene": {"gpu_request": "mig"}}}', "must be one of"),
        ('{"clusters": {"greene": {"default_time": "soon"}}}', "default_time"),
        ('{"clusters": [1, 2]}', "expected an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_user_file_names_file_and_key(tmp_path, monkeypatch, content, expected):
    user = tmp_path / "clusters.json"
    user.write_text(content)
    monkeypatch.setenv("HPCVP_CLUSTERS", str(user))
    with pytest.raises(ProfileError) as info:
        load_profiles()
    assert str(user) in str(info.value) and expected in str(info.value)


def test_missing_user_file_named_by_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCVP_CLUSTERS", str(tmp_path / "absent.json"))
    with pytest.raises(ProfileError, match="absent.json"):
        load_profiles()


def test_auto_picks_local_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    profile, why = resolve_profile("auto")
    assert profile.name == "local" and "no sbatch" in why


def test_auto_maps_cluster_name_to_profile(tmp_path, monkeypatch):
    # A fake sbatch/scontrol pair answering like Greene's controller.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'ClusterName             = greene'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert resolve_profile("auto")[0].name == "greene"
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'ClusterName = elsewhere'\n")
    profile, why = resolve_profile("auto")
    assert profile.name == "slurm" and "elsewhere" in why


def test_unknown_cluster_is_refused():
    with pytest.raises(ProfileError, match="--cluster nowhere: unknown cluster"):
        resolve_profile("nowhere")


# --------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    "text, minutes",
    [
        ("90", 90),
        ("01:30", 2),
        ("02:00:00", 120),
        ("1-00", 1440),
        ("1-02:30", 1590),
        ("2-00:00:00", 2880),
        ("90m", 90),
        ("2h", 120),
        ("1.5h", 90),
        ("2d", 2880),
        ("30s", 1),
    ],
)
def test_parse_time(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "0", "-5", ""])
def test_parse_time_rejects(text):
    with pytest.raises(ValueError):
        parse_time_minutes(text)


def test_partition_limits_and_formatting():
    assert parse_partition_limit_minutes("infinite") is None
    assert parse_partition_limit_minutes("1:00:00") == 60
    assert parse_partition_limit_minutes("2-00:00:00") == 2880
    assert format_minutes(60) == "01:00:00" and format_minutes(2880 + 90) == "2-01:30:00"
    assert slurm_mem(64) == "64G" and slurm_mem(1.5) == "1536M"


def test_greene_gpu_type_goes_into_gres(tmp_path):
    greene = load_profiles()["greene"]
    params = submitit_parameters(greene, request(tmp_path, gpu_type="a100", account="pr_123_general"))
    assert params["gres"] == "gpu:a100:4"
    assert params["ntasks_per_node"] == 4  # one task per GPU
    assert params["account"] == "pr_123_general"
    assert params["additional_parameters"]["requeue"] is True
    assert "constraint" not in params


def test_torch_gpu_type_goes_into_constraint_and_preemptible_comment(tmp_path):
    torch_profile = load_profiles()["torch"]
    params = submitit_parameters(
        torch_profile,
        request(tmp_path, gpu_type="h200", account="torch_pr_1", comment=torch_profile.preemptible_comment),
    )
    assert params["gres"] == "gpu:4" and params["constraint"] == "h200"
    assert params["comment"] == "preemption=yes;requeue=true"
    user_constraint = submitit_parameters(torch_profile, request(tmp_path, constraint="h200|l40s"))
    assert user_constraint["constraint"] == "h200|l40s"


def test_cpu_cluster_asks_for_tasks_not_gpus(tmp_path):
    local = load_profiles()["slurm-local"]
    params = submitit_parameters(local, request(tmp_path, gpus_per_node=2, cpus_per_task=1))
    assert "gres" not in params and params["ntasks_per_node"] == 2 and params["cpus_per_task"] == 1


def test_dependency_cancels_chain_on_failure(tmp_path):
    params = submitit_parameters(load_profiles()["slurm"], request(tmp_path, dependency="afterok:12"))
    assert params["dependency"] == "afterok:12"
    assert params["additional_parameters"]["kill-on-invalid-dep"] == "yes"


def test_container_wraps_python(tmp_path):
    greene = load_profiles()["greene"]
    sif, overlay = tmp_path / "cuda.sif", tmp_path / "env.ext3"
    words = container_prefix(greene, sif, overlay, use_gpus=True)
    assert words[:3] == ["singularity", "exec", "--nv"]
    assert words[3:5] == ["--overlay", f"{overlay}:ro"]
    assert str(sif) in words and words[-3] == "-c" and words[-2].startswith("source /ext3/env.sh && exec")
    command = python_command(greene, request(tmp_path, container=sif, overlay=overlay))
    argv = shlex.split(command) + ["-c", "print(1)"]
    assert argv[-3] == "python"  # the container's python, not the host's interpreter path
    # The bash -c wrapper really passes the words after it through ("$@"), as the shell sees them.
    inner = argv[argv.index("/bin/bash") :]
    inner[2] = inner[2].replace("source /ext3/env.sh && ", "")
    out = subprocess.run([*inner[:4], sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr
    no_gpu = container_prefix(load_profiles()["slurm-local"], sif, None, use_gpus=False)
    assert "--nv" not in no_gpu and "--overlay" not in no_gpu


def test_rendered_script_is_submitits(tmp_path):
    greene = load_profiles()["greene"]
    script = render_submitit_script(greene, request(tmp_path, gpu_type="v100", account="pr_1_general", nodes=2))
    lines = script.splitlines()
    for expected in (
        "#SBATCH --gres=gpu:v100:4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --nodes=2",
        "#SBATCH --account=pr_1_general",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --time=120",
        "#SBATCH --mem=64G",
        "#SBATCH --cpus-per-task=8",
    ):
        assert expected in lines, expected
    assert any(line.startswith("srun ") and "-m submitit.core._submit" in line for line in lines)
    assert str(tmp_path / "runs" / "seg" / "t" / "slurm" / "%j") in script  # job folder under the run dir


@pytest.mark.parametrize("signame", ["USR2", "TERM"])
def test_batch_shell_passes_signals_on_to_srun(tmp_path, signame):
    """The trap in submitit scripts: a signal to the batch shell reaches the tasks (here a fake srun,
    reached through kill when scancel fails) and the shell waits for srun's own exit status."""
    from hpcvp.cluster.sbatch import BATCH_SIGNAL_SETUP

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scancel").write_text("#!/bin/bash\nexit 1\n")
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\ntrap 'echo \"$*\" > {tmp_path}/got; exit 75' {signame}\n"
        f"touch {tmp_path}/ready\nwhile :; do sleep 0.05; done\n"
    )
    for tool in ("scancel", "srun"):
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text("\n".join([*BATCH_SIGNAL_SETUP, "srun --unbuffered task", 'echo "after srun: $?"']) + "\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1"}
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and shell.poll() is None, shell.communicate()
        time.sleep(0.05)
    shell.send_signal(getattr(signal, f"SIG{signame}"))
    out, err = shell.communicate(timeout=20)
    assert f"the batch shell got SIG{signame}: passing it on to the tasks" in err
    assert (tmp_path / "got").read_text().strip() == "--unbuffered task"
    assert out.strip() == "after srun: 75"  # the shell outlived the signal and kept srun's status


# --------------------------------------------------------------------------------------------- pre-flight


class FakeFacts(preflight.SlurmFacts):
    def __init__(self, accounts=("pr_1_general",), partitions=None, queued=0):
        super().__init__(user="alice")
        self._accounts = set(accounts) if accounts is not None else None
        self._accounts_error = None if accounts is not None else "sacctmgr: connection refused"
        self._partitions = (
            partitions
            if partitions is not None
            else {
                "gpu": preflight.PartitionInfo("gpu", True, 48 * 60, 48, 4, {"a100", "v100"}),
                "short": preflight.PartitionInfo("short", False, 60, 48, 4, {"a100"}),
                "cpu": preflight.PartitionInfo("cpu", False, None, 64, 0, set()),
            }
        )
        self._queued = queued

    def queued_gpus(self) -> int:
        return self._queued


def messages(problems):
    return "\n".join(str(p) for p in problems)


def test_account_rules(tmp_path):
    greene, facts = load_profiles()["greene"], FakeFacts()
    assert "requires --account" in messages(preflight.check_account(greene, request(tmp_path), facts))
    assert "match '^pr_[0-9]+_'" in messages(preflight.check_account(greene, request(tmp_path, account="lab"), facts))
    unknown = messages(preflight.check_account(greene, request(tmp_path, account="pr_9_general"), facts))
    assert "no association" in unknown and "pr_1_general" in unknown
    assert preflight.check_account(greene, request(tmp_path, account="pr_1_general"), facts) == []
    torch_profile = load_profiles()["torch"]
    assert "torch_pr_" in messages(
        preflight.check_account(
            torch_profile, request(tmp_path, account="pr_1_general"), FakeFacts(accounts=("pr_1_general",))
        )
    )
    down = messages(
        preflight.check_account(greene, request(tmp_path, account="pr_1_general"), FakeFacts(accounts=None))
    )
    assert "cannot ask sacctmgr" in down


def test_partition_and_constraint_rules(tmp_path):
    slurm, facts = load_profiles()["slurm"], FakeFacts()
    assert "no such partition" in messages(
        preflight.check_partition_and_constraint(slurm, request(tmp_path, partition="gpuu"), facts)
    )
    bad = messages(preflight.check_partition_and_constraint(slurm, request(tmp_path, constraint="a100|h200"), facts))
    assert "'h200'" in bad and "'a100'" not in bad.split("sinfo")[0]
    assert preflight.check_partition_and_constraint(slurm, request(tmp_path, constraint="[a100&v100]*2"), facts) == []
    assert preflight.constraint_features("h200|l40s") == ["h200", "l40s"]


def test_gpu_rules(tmp_path):
    profiles, facts = load_profiles(), FakeFacts()
    greene = profiles["greene"]
    too_many = messages(preflight.check_gpus(greene, request(tmp_path, gpus_per_node=8), facts))
    assert "at most 4 per node" in too_many and "--nodes 2 --gpus 4" in too_many
    assert "rtx8000" in messages(preflight.check_gpus(greene, request(tmp_path, gpu_type="k80"), facts))
    assert "allows at most 4" in messages(preflight.check_gpus(greene, request(tmp_path, nodes=9), facts))
    # Generic profile: the limit comes from the partition's GRES.
    generic = profiles["slurm"]
    assert "sinfo GRES" in messages(preflight.check_gpus(generic, request(tmp_path, gpus_per_node=5), facts))
    assert "at most 0" in messages(preflight.check_gpus(generic, request(tmp_path, partition="cpu"), facts))
    # Torch: 24 GPUs per user, counting what is already queued.
    torch_profile = profiles["torch"]
    assert preflight.check_gpus(torch_profile, request(tmp_path, gpus_per_node=8, nodes=2), FakeFacts(queued=8)) == []
    capped = messages(
        preflight.check_gpus(torch_profile, request(tmp_path, gpus_per_node=8, nodes=2), FakeFacts(queued=9))
    )
    assert "cap of 24 GPUs per user" in capped and "9 already queued" in capped
    assert "at least 1" in messages(preflight.check_gpus(greene, request(tmp_path, gpus_per_node=0), facts))


def test_time_rules(tmp_path):
    slurm, facts = load_profiles()["slurm"], FakeFacts()
    assert preflight.check_time(slurm, request(tmp_path, time_minutes=60, partition="short"), facts) == []
    over = messages(preflight.check_time(slurm, request(tmp_path, time_minutes=61, partition="short"), facts))
    assert "01:01:00 exceeds the MaxTime of partition 'short'" in over
    assert "shorter" not in over
    assert "pre-timeout signal" in messages(
        preflight.check_time(slurm, request(tmp_path, time_minutes=2, signal_seconds=180), facts)
    )
    # No partition limit known: the profile's max_time.
    greene = load_profiles()["greene"]
    no_limits = FakeFacts(partitions={})
    assert "profile max_time" in messages(
        preflight.check_time(greene, request(tmp_path, time_minutes=49 * 60), no_limits)
    )


def test_memory_rule(tmp_path):
    facts = FakeFacts(partitions={"gpu": preflight.PartitionInfo("gpu", True, None, 48, 4, set(), max_mem_mb=384000)})
    assert preflight.check_memory(request(tmp_path, mem_gb=256), facts) == []
    assert "exceeds the largest node of partition 'gpu' (384000 MB" in messages(
        preflight.check_memory(request(tmp_path, mem_gb=512), facts)
    )


def test_preemptible_only_where_offered():
    assert preflight.check_preemptible(load_profiles()["torch"], True) == []
    assert "no preemptible" in messages(preflight.check_preemptible(load_profiles()["greene"], True))


def test_data_rules(tmp_path, synthetic_packed):
    assert "no manifest" in messages(preflight.check_data(tmp_path))
    assert preflight.check_data(synthetic_packed, ["train", "hidden"]) == []
    import shutil

    copy = tmp_path / "packed"
    shutil.copytree(synthetic_packed, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = copy / manifest["shards"][0]["path"]
    with open(first, "ab") as handle:
        handle.write(b"x")
    (copy / manifest["shards"][1]["path"]).unlink()
    problems = messages(preflight.check_data(copy))
    assert "bytes, the manifest says" in problems and "which is missing" in problems
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "hidden"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "no 'hidden' shards" in messages(preflight.check_data(copy, ["hidden"]))


def test_run_root_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not writable" in messages(preflight.check_run_dir_writable(blocker / "runs"))
    assert preflight.check_run_dir_writable(tmp_path / "runs") == []


def test_launch_refuses_with_every_problem_and_submits_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "SlurmFacts", lambda: FakeFacts(accounts=("pr_1_general",)))
    blocker = tmp_path / "file"
    blocker.write_text("")
    status = launch.main(
        [
            "--cluster",
            "greene",
            "--stage",
            "seg",
            "--gpus",
            "8",
            "--data",
            str(tmp_path),
            "--time",
            "50:00:00",
            "--run-root",
            str(blocker / "runs"),
            "--partition",
            "gpuu",
            "--set",
            "train.nope=1",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    for check in ("[account]", "[partition]", "[gpus]", "[time]", "[data]", "[run-dir]", "[config]"):
        assert check in err, check
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_script_and_parameters(tmp_path, monkeypatch, capsys, synthetic_packed):
    monkeypatch.setattr(
        preflight,
        "SlurmFacts",
        lambda: FakeFacts(
            accounts=("torch_pr_7",),
            partitions={"gpu": preflight.PartitionInfo("gpu", True, 2880, 128, 8, {"h200", "l40s"})},
        ),
    )
    status = launch.main(
        [
            "--cluster",
            "torch",
            "--stage",
            "seg",
            "--gpus",
            "4",
            "--account",
            "torch_pr_7",
            "--gpu-type",
            "h200",
            "--preemptible",
            "--data",
            str(synthetic_packed),
            "--run-root",
            str(tmp_path / "runs"),
            "--run",
            "r1",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "#SBATCH --constraint=h200" in out and "#SBATCH --gres=gpu:4" in out
    assert "#SBATCH --comment='preemption=yes;requeue=true'" in out
    assert '"ntasks_per_node": 4' in out and "max_num_timeout=5" in out
    assert "HpcvpJob('hpcvp.stages.worker:run_worker'" in out
    assert not (tmp_path / "runs" / "seg").exists()  # nothing submitted, no run dir made


def test_dry_run_of_the_chain_shows_dependencies(tmp_path, monkeypatch, capsys, synthetic_raw):
    monkeypatch.setattr(preflight, "SlurmFacts", lambda: FakeFacts(accounts=("pr_1_general",)))
    status = launch.main(
        [
            "--cluster",
            "greene",
            "--stage",
            "all",
            "--gpus",
            "2",
            "--account",
            "pr_1_general",
            "--src",
            str(synthetic_raw),
            "--data",
            str(tmp_path / "packed"),
            "--run-root",
            str(tmp_path / "runs"),
            "--dry-run",
            "--set",
            "seg:train.max_steps=7",
            "--set",
            "train.lr=0.01",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    jobs = out.split("# ---- job ")[1:]
    assert [j.split(":", 1)[1].split()[0] for j in jobs] == ["pack", "seg", "pseudo-label", "simvp", "predict"]
    assert "dependency" not in jobs[0]
    assert "#SBATCH --dependency=afterok:PACK_JOB_ID" in jobs[1]
    assert "train.max_steps=7" in jobs[1] and "train.max_steps=7" not in jobs[3]
    assert "train.lr=0.01" in jobs[1] and "train.lr=0.01" in jobs[3]  # the stages that have the key
    assert f"seg_run={tmp_path / 'runs' / 'seg' / 'default'}" in jobs[2]
    assert "mode=masks" in jobs[3] and f"simvp_masks_run={tmp_path / 'runs' / 'simvp' / 'default'}" in jobs[4]
    assert "#SBATCH --gres" not in jobs[0]  # pack is a CPU job


def test_scoped_overrides_must_name_a_stage_of_the_launch():
    with pytest.raises(launch.LaunchError, match="not part of this launch"):
        launch.split_overrides(["raft:train.lr=1"], ["seg", "simvp"])
    with pytest.raises(launch.LaunchError, match="no stage of this launch"):
        launch.split_overrides(["nope=1"], ["seg", "simvp"])


def test_slurm_cluster_needs_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "SlurmFacts", lambda: FakeFacts())
    assert (
        launch.main(["--cluster", "greene", "--stage", "seg", "--account", "pr_1_general", "--run-root", str(tmp_path)])
        == 2
    )
    assert "--data is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- requeue logic


class FakeJobEnvironment:
    calls: list[int] = []

    def _requeue(self, countdown: int) -> None:
        FakeJobEnvironment.calls.append(countdown)


def test_saved_job_requeues_once_on_rank_zero(monkeypatch):
    import submitit

    from hpcvp.cluster import executor

    FakeJobEnvironment.calls = []
    monkeypatch.setattr(submitit, "JobEnvironment", FakeJobEnvironment)
    monkeypatch.setattr(executor, "scontrol_job_fields", lambda job_id: {"JobState": "RUNNING"})
    job = HpcvpJob("json:dumps", [], max_requeues=3)
    with pytest.raises(SystemExit) as leave:
        job._requeue_after_save(rank=1, restarts=0)
    assert leave.value.code == 0 and FakeJobEnvironment.calls == []  # only rank 0 requeues
    with pytest.raises(SystemExit) as leave:
        job._requeue_after_save(rank=0, restarts=1)
    assert leave.value.code == EXIT_REQUEUE and FakeJobEnvironment.calls == [1]
    with pytest.raises(JobNotRequeued, match="--max-requeues 3"):
        job._requeue_after_save(rank=0, restarts=3)
    assert FakeJobEnvironment.calls == [1]
    resubmitted = job.checkpoint()
    assert resubmitted.function is job
    # Cancelled (or being requeued by a preempting scheduler): saved, but not requeued from here.
    monkeypatch.setattr(executor, "scontrol_job_fields", lambda job_id: {"JobState": "COMPLETING"})
    with pytest.raises(SystemExit) as leave:
        job._requeue_after_save(rank=0, restarts=0)
    assert leave.value.code == EXIT_REQUEUE and FakeJobEnvironment.calls == [1]


def test_requeue_killed_by_slurms_own_preemption_leaves_without_error(monkeypatch, capsys):
    """The job was RUNNING at the check, then a preemption's SIGTERM killed `scontrol requeue`:
    Slurm requeues (or not) by itself, so no JobNotRequeued traceback; still RUNNING = an error."""
    import subprocess

    import submitit

    from hpcvp.cluster import executor

    states = iter(["RUNNING", "PREEMPTED"])

    class KilledRequeue:
        def _requeue(self, countdown: int) -> None:
            raise subprocess.CalledProcessError(-15, ["scontrol", "requeue", "1"])

    monkeypatch.setattr(submitit, "JobEnvironment", KilledRequeue)
    monkeypatch.setattr(executor, "scontrol_job_fields", lambda job_id: {"JobState": next(states)})
    job = HpcvpJob("json:dumps", [], max_requeues=3)
    with pytest.raises(SystemExit) as leave:
        job._requeue_after_save(rank=0, restarts=0)
    assert leave.value.code == EXIT_REQUEUE
    assert "job is PREEMPTED, so Slurm decides its requeue" in capsys.readouterr().out
    monkeypatch.setattr(executor, "scontrol_job_fields", lambda job_id: {"JobState": "RUNNING"})
    with pytest.raises(JobNotRequeued, match="scontrol requeue failed"):
        job._requeue_after_save(rank=0, restarts=0)


def test_job_failure_is_an_error(monkeypatch):
    job = HpcvpJob("hpcvp.stages.worker:run_worker", ["--stage", "nope"], max_requeues=1)
    with pytest.raises(RuntimeError, match="exited with status 2"):
        job()


# --------------------------------------------------------------------------------------------- status


def test_records_and_local_status(tmp_path):
    run_dir = tmp_path / "runs" / "seg" / "a"
    record_event(run_dir, event="started", via="local", stage="seg", pid=os.getpid())
    assert run_status(run_dir).state == "RUNNING"
    record_event(run_dir, event="finished", via="local", stage="seg", state="COMPLETED")
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 1.5})
        + "\n"
        + json.dumps({"step": 10, "loss": 1.25, "val_jaccard": 0.5})
        + "\n{torn"
    )
    status = run_status(run_dir)
    assert (status.stage, status.run, status.state) == ("seg", "a", "COMPLETED")
    assert last_metric(run_dir) == "step 10: val_jaccard=0.5 loss=1.25"
    assert last_metric(run_dir, max_keys=1) == "step 10: val_jaccard=0.5"
    assert [e["event"] for e in read_events(run_dir)] == ["started", "finished"]
    assert find_runs(tmp_path / "runs") == [run_dir]


def test_slurm_status_uses_sacct_state(tmp_path):
    from hpcvp.cluster.status import SlurmJobState

    run_dir = tmp_path / "runs" / "simvp" / "b"
    record_event(run_dir, event="submitted", job_id="41", via="submitit")
    record_event(run_dir, event="submitted", job_id="42", via="submitit")
    status = run_status(run_dir, {"42": SlurmJobState("42", "RUNNING", 2)})
    # 42 is a relaunch of the run (41 came first): one restart more than 42's own two requeues.
    assert (status.job_id, status.state, status.restarts) == ("42", "RUNNING", 3)


# A run of three jobs (two relaunches): 41 requeued twice, then timed out for good; 42 preempted
# once; 43 running. sacct -D lists every attempt of a requeued job as a row of its own.
FAKE_SACCT = """\
41|REQUEUED|0:0|2024-05-01T10:00:00|2024-05-01T11:00:00
41|REQUEUED|0:0|2024-05-01T11:02:00|2024-05-01T12:00:00
41|TIMEOUT|0:0|2024-05-01T12:10:00|2024-05-01T13:00:00
42|PREEMPTED|0:0|2024-05-01T14:00:00|2024-05-01T15:00:00
42|CANCELLED by 0|0:0|2024-05-01T15:30:00|2024-05-01T16:00:00
43|RUNNING|0:0|2024-05-01T16:05:00|Unknown
7|COMPLETED|0:0|2024-05-01T09:00:00|2024-05-01T09:30:00
"""


def test_status_counts_every_requeue_and_relaunch_of_the_run(tmp_path, monkeypatch, capsys):
    from hpcvp.cluster import status as status_module

    run_dir = tmp_path / "runs" / "simvp" / "long"
    for job_id in ("41", "42", "43"):
        record_event(run_dir, event="submitted", job_id=job_id, via="submitit")
    record_event(run_dir, event="started", job_id="43", via="sbatch", restart=0)  # the same job again
    calls = []

    def fake_run(args):
        calls.append(args)
        return FAKE_SACCT if args[0] == "sacct" else None

    monkeypatch.setattr(status_module, "_run", fake_run)
    (row,) = status_module.collect_status(tmp_path / "runs")
    assert calls[0][calls[0].index("-j") + 1] == "41,42,43"  # every job of the run, in one sacct call
    # 2 relaunches + 41's 2 requeues + 42's requeue after preemption = 5 (41's final timeout and
    # 42's cancel are ends, not restarts: the relaunches after them are counted).
    assert (row.job_id, row.state, row.restarts) == ("43", "RUNNING", 5)
    # Gaps: 2 + 10 min (41's requeues), 60 (41 -> 42), 30 (42's requeue), 5 (42 -> 43) = 107 min.
    assert row.lost_seconds == 107 * 60
    assert status_module.format_duration(row.lost_seconds) == "1h47m"
    status_module.print_status(tmp_path / "runs", console=rich_console())
    out = capsys.readouterr().out
    assert "time lost" in out and "1h47m" in out and " 5 " in out


def rich_console():
    from rich.console import Console

    return Console(width=200, force_terminal=False)


def test_local_time_lost_is_the_gap_between_attempts(tmp_path):
    run_dir = tmp_path / "runs" / "seg" / "l"
    lines = [
        {"event": "started", "via": "local", "time": "2024-05-01T10:00:00+00:00", "pid": 0},
        {"event": "finished", "via": "local", "state": "PREEMPTED", "time": "2024-05-01T10:30:00+00:00"},
        {"event": "started", "via": "local", "time": "2024-05-01T10:45:00+00:00", "pid": 0},
        {"event": "finished", "via": "local", "state": "COMPLETED", "time": "2024-05-01T11:00:00+00:00"},
    ]
    run_dir.mkdir(parents=True)
    (run_dir / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    row = run_status(run_dir)
    assert (row.state, row.restarts, row.lost_seconds) == ("COMPLETED", 1, 15 * 60)


def test_scoped_override_for_a_single_stage():
    assert launch.split_overrides(["seg:train.lr=1", "train.nope=2"], ["seg"]) == {
        "seg": ["train.lr=1", "train.nope=2"]
    }


def test_user_mistakes_end_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    user_file = tmp_path / "clusters.json"
    user_file.write_text(json.dumps({"clusters": {"mine": {"extends": ["greene"]}}}))
    with pytest.raises(ProfileError, match=r"clusters.json: cluster 'mine': key 'extends' must name a cluster"):
        load_profiles(user_file)
    user_file.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ProfileError, match=r"clusters.json: not a UTF-8 text file"):
        load_profiles(user_file)
    monkeypatch.setenv("HPCVP_CLUSTERS", str(user_file))
    assert launch.main(["--stage", "seg", "--cluster", "local", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: {user_file}: not a UTF-8") and "Traceback" not in err


def test_status_shows_an_unreadable_run_as_a_row(tmp_path, capsys):
    good, bad = tmp_path / "runs" / "seg" / "good", tmp_path / "runs" / "seg" / "bad"
    record_event(good, event="finished", via="local", state="COMPLETED")
    (bad / "jobs.jsonl").mkdir(parents=True)  # unreadable as a file
    from hpcvp.cluster.status import collect_status

    rows = {r.run: r for r in collect_status(tmp_path / "runs")}
    assert rows["good"].state == "COMPLETED"
    assert rows["bad"].state == "UNREADABLE" and f"cannot read {bad / 'jobs.jsonl'}" in rows["bad"].metric
    assert launch.main(["--status", "--run-root", str(tmp_path / "runs")]) == 0
    assert "UNREADABLE" in capsys.readouterr().out


def test_local_run_with_unwritable_log_dir_says_so(tmp_path, capsys):
    from hpcvp.cluster.executor import run_local

    blocker = tmp_path / "file"
    blocker.write_text("")
    status = run_local("hpcvp.cluster.profiles:slurm_available", [], 2, log_dir=blocker / "logs")
    assert status == 2
    assert f"error: cannot write the rank logs in {blocker / 'logs'}" in capsys.readouterr().err
