"""sbatch options and sweeps on the real local Slurm cluster (tools/slurm_local_cluster.sh).

Runs when CI=true (never skips then), else skips unless the cluster "hpcvp" answers. Jobs are tiny
seg runs (1 CPU task, a few steps) on the embedded synthetic dataset:

- --qos (a QoS made with sacctmgr), --mail-type/--mail-user, --sbatch-opt: the job runs with them
  (sacct's QOS, scontrol's MailUser/MailType; this machine has no MailProg, the job runs anyway);
- --exclude: in the script; sbatch refuses an unknown node, and so does pre-flight, first;
- the sbatch template: SBATCH_QOS and mail options reach the job, the log is hpcvp-seg-<id>.out;
- an unknown --qos is refused by pre-flight against the real sacctmgr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_helpers import (
    REPO,
    job_id_of,
    launch_args,
    logs_of,
    sacct_field,
    sbatch_template,
    squeue_count,
    wait_until_done,
)

from hpcvp.cluster import launch
from hpcvp.cluster.status import scontrol_job_fields

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TEST_QOS = "hpcvp_test"
TINY = ["train.max_steps=4", "train.batch_size=2", "train.log_every=2", "eval_max_frames=4"]


@pytest.fixture(scope="module")
def test_qos(slurm_cluster) -> str:
    """The QoS `tools/slurm_local_cluster.sh up` makes; made here too (idempotent) on an older cluster."""
    known = subprocess.run(["sacctmgr", "-n", "-P", "show", "qos", "format=name"], capture_output=True, text=True)
    if TEST_QOS not in known.stdout.split():
        subprocess.run(["bash", str(REPO / "tools" / "slurm_local_cluster.sh"), "qos"], check=True)
    return TEST_QOS


def tiny_seg(data: Path, run_root: Path, run: str, *extra: str) -> list[str]:
    return launch_args("seg", data, run_root, run, TINY, "--gpus", "1", *extra)


def sacct_qos(job_id: str, expected: str, timeout: float = 30.0) -> str:
    """The job's QoS as accounting has it once slurmdbd has caught up.

    slurmctld sends job records to slurmdbd asynchronously; right after `up` the first job's row can
    read QOS "Unknown" for a moment (seen in CI), so wait for the expected name, then give the last.
    """
    deadline = time.monotonic() + timeout
    while True:
        qos = sacct_field(job_id, "QOS")
        if qos == expected or time.monotonic() > deadline:
            return qos
        time.sleep(1)


def test_job_runs_with_qos_mail_and_extra_options(test_qos, default_dataset_dir, tmp_path):
    args = tiny_seg(
        default_dataset_dir,
        tmp_path,
        "options",
        "--qos",
        test_qos,
        "--mail-type",
        "END",
        "--mail-user",
        "root",
        "--sbatch-opt",
        "nice=10",
    )
    assert launch.main(args) == 0
    run_dir = tmp_path / "seg" / "options"
    job_id = job_id_of(run_dir)
    fields = scontrol_job_fields(job_id)
    assert fields.get("MailUser") == "root" and fields.get("MailType") == "END", fields
    assert fields.get("QOS") == test_qos and fields.get("Nice") == "10", fields
    assert wait_until_done(job_id) == "COMPLETED", logs_of(run_dir)[-3000:]
    assert sacct_qos(job_id, test_qos) == test_qos


def test_exclude_reaches_the_script_and_unknown_nodes_are_refused(slurm_cluster, default_dataset_dir, tmp_path, capsys):
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()[0]
    status = launch.main(tiny_seg(default_dataset_dir, tmp_path, "exclude", "--exclude", node, "--dry-run"))
    captured = capsys.readouterr()
    assert f"#SBATCH --exclude={node}" in captured.out
    # One node here: excluding it leaves nothing, which sbatch would refuse too.
    assert status == 2 and f"--exclude {node}: leaves no node" in captured.err
    refused = subprocess.run(
        ["sbatch", "--test-only", f"--exclude={node}", "--wrap", "true"], capture_output=True, text=True
    )
    assert refused.returncode != 0
    before = squeue_count()
    assert launch.main(tiny_seg(default_dataset_dir, tmp_path, "exclude", "--exclude", "nosuchnode")) == 2
    assert "[exclude] --exclude nosuchnode: no such node(s) nosuchnode" in capsys.readouterr().err
    assert squeue_count() == before


def test_unknown_qos_is_refused_by_preflight(slurm_cluster, default_dataset_dir, tmp_path, capsys):
    before = squeue_count()
    assert launch.main(tiny_seg(default_dataset_dir, tmp_path, "badqos", "--qos", "no_such_qos")) == 2
    err = capsys.readouterr().err
    assert "[qos] --qos no_such_qos: no such QoS" in err and "normal" in err
    assert squeue_count() == before and not (tmp_path / "seg").exists()


def test_sbatch_template_takes_qos_and_mail_and_logs_under_the_job_name(test_qos, tmp_path):
    env = dict(os.environ, SBATCH_QOS=test_qos, HPCVP_HOME=str(REPO), HPCVP_PYTHON=sys.executable)
    env.pop("HPCVP_DATA", None)  # the job stops at once, saying so: enough to see its options and log
    options = ["--gres=none", "--mem=1G", "--cpus-per-task=1", "--mail-type=END,FAIL", "--mail-user=root"]
    job_id = sbatch_template(options, env, tmp_path)
    fields = scontrol_job_fields(job_id)
    assert fields.get("MailUser") == "root" and fields.get("MailType") == "END,FAIL", fields
    assert wait_until_done(job_id, timeout=120) == "FAILED"
    assert sacct_qos(job_id, test_qos) == test_qos
    log = tmp_path / f"hpcvp-seg-{job_id}.out"  # the README's name for the templates' logs
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "set HPCVP_DATA" in log.read_text(), sorted(p.name for p in tmp_path.iterdir())


def test_sweep_runs_as_one_array_that_completes(slurm_cluster, default_dataset_dir, tmp_path, monkeypatch, capsys):
    args = tiny_seg(default_dataset_dir, tmp_path, "sw", "--sweep", "train.lr=1e-3,1e-2", "--max-parallel", "1")
    assert launch.main(args) == 0
    runs = [tmp_path / "seg" / f"sw__train.lr={lr}" for lr in ("1e-3", "1e-2")]
    ids = [job_id_of(run_dir) for run_dir in runs]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]  # one array, one task per element
    script = next((tmp_path / "seg" / "sw__sweep" / "slurm").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%1" in script
    for job_id, run_dir in zip(ids, runs):
        assert wait_until_done(job_id) == "COMPLETED", job_id
        assert (run_dir / "metrics.jsonl").exists()
    monkeypatch.setenv("COLUMNS", "250")
    assert launch.main(["--status", "--run-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sw__sweep (sweep)" in out and out.count("COMPLETED") >= 2
    assert (tmp_path / "seg" / "sw__sweep" / "sweep.md").exists()
