"""Multi-node jobs on a real two-node Slurm cluster: ``tools/slurm_local_cluster.sh up --nodes 2``.

Each node is a slurmd in its own network and UTS namespace (hosts hpcvp2n1 = 10.213.0.11 and
hpcvp2n2 = 10.213.0.12 on bridge hpcvp2br), so the ranks of a 2-node job run on two hosts with two
addresses, and every byte of gloo traffic between them crosses the nodes' veth links. The
``two_node_cluster`` fixture (tests/conftest.py) brings that cluster up when needed and points
SLURM_CONF at it; it skips without root or Slurm, except under CI=true where it must run.

- ``launch.py --nodes 2 --gpus 1 --stage-local``: ranks on two hosts, rendezvous at the first node's
  address, shards staged once per node into that node's $SLURM_TMPDIR and read from there, final
  weights equal to a 1-node x 2-task run of the same config;
- the same through ``sbatch slurm/seg.sbatch``;
- ``scontrol requeue`` mid-run: both ranks save at one step, the job runs again on both nodes and
  ends with the same weights.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import (
    REPO,
    assert_same_weights,
    job_id_of,
    launch_args,
    logs_of,
    sacct_field,
    sacct_states,
    sbatch_template,
    template_env,
    wait_for_step,
    wait_until_done,
)

from hpcvp.cluster import launch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = {"hpcvp2n1": "10.213.0.11", "hpcvp2n2": "10.213.0.12"}
LINKS = ("hpcvp2v1", "hpcvp2v2")  # the host ends of the nodes' veth links
NODE_TMP = Path("/var/tmp/hpcvp2")  # $SLURM_TMPDIR = NODE_TMP/<node>/<job id> (the cluster's TaskProlog)
STEPS = 40
SEG_SETTINGS = [f"train.max_steps={STEPS}", "train.batch_size=4", "train.log_every=2", "eval_max_frames=8"]
JOB_TIMEOUT_S = 240
ONE_NODE = "the 1-node x 2-task run"  # the reference, in messages
RANK_LINE = re.compile(r"rank (\d+)/(\d+) on host (\S+) \| master (\S+):(\d+) \| data (\S+)")


def seg_args(data: Path, run_root: Path, run: str, *extra: str) -> list[str]:
    return launch_args("seg", data, run_root, run, SEG_SETTINGS, *extra)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("two-node-runs")


@pytest.fixture(scope="module")
def one_node_reference(default_dataset_dir, run_root) -> Path:
    """The same seg run as 1 node x 2 tasks (local processes, gloo): the weights to match."""
    status = launch.main(
        seg_args(default_dataset_dir, run_root, "one-node", "--cluster", "local", "--gpus", "2", "--wait")
    )
    assert status == 0
    return run_root / "seg" / "one-node"


def rank_lines(log: str) -> list[dict]:
    return [
        {"rank": int(m[1]), "world": int(m[2]), "host": m[3], "master": m[4], "port": int(m[5]), "data": m[6]}
        for m in RANK_LINE.finditer(log)
    ]


def link_bytes() -> dict[str, int]:
    stats = Path("/sys/class/net")
    return {
        link: sum(int((stats / link / "statistics" / f"{way}_bytes").read_text()) for way in ("rx", "tx"))
        for link in LINKS
    }


def assert_one_rank_per_node(log: str, job_id: str, staged: bool) -> list[dict]:
    ranks = {r["rank"]: r for r in rank_lines(log)}
    assert sorted(ranks) == [0, 1], log[-3000:]
    assert {r["rank"]: r["host"] for r in ranks.values()} == {0: "hpcvp2n1", 1: "hpcvp2n2"}
    # Rendezvous at the first node of the job's node list, which resolves to its own address.
    assert {r["master"] for r in ranks.values()} == {"hpcvp2n1"}
    assert socket.gethostbyname("hpcvp2n1") == NODES["hpcvp2n1"]
    if staged:
        for r in ranks.values():
            # Each rank reads the copy in its own node's $SLURM_TMPDIR, checked against the manifest.
            local = NODE_TMP / r["host"] / job_id
            assert Path(r["data"]).parent == local / "hpcvp-data", r
            assert (Path(r["data"]) / "manifest.json").exists()
    return list(ranks.values())


def assert_resumed_where_saved_on_both_nodes(log: str) -> None:
    """One graceful stop: saved at the step it stopped at, the next attempt resumed from that step,
    and both attempts ran rank 0 on hpcvp2n1 and rank 1 on hpcvp2n2."""
    saved = re.findall(r"preempted at step (\d+) \(SIGTERM received by at least one rank; saved at step (\d+)\)", log)
    assert saved and saved[0][0] == saved[0][1], log[-4000:]
    resumed = re.findall(r"resumed from step (\d+)", log)
    assert resumed and resumed[0] == saved[0][1], log[-4000:]
    hosts = sorted((r["rank"], r["host"]) for r in rank_lines(log))
    assert hosts == [(0, "hpcvp2n1"), (0, "hpcvp2n1"), (1, "hpcvp2n2"), (1, "hpcvp2n2")]


def test_launch_two_nodes_one_task_each_matches_one_node(
    two_node_cluster, default_dataset_dir, run_root, one_node_reference
):
    before = link_bytes()
    status = launch.main(
        seg_args(default_dataset_dir, run_root, "two-nodes", "--nodes", "2", "--gpus", "1", "--stage-local", "--wait")
    )
    run_dir = run_root / "seg" / "two-nodes"
    log = logs_of(run_dir)
    assert status == 0, log[-4000:]
    job_id = job_id_of(run_dir)
    assert sacct_states(job_id) == ["COMPLETED"]
    assert_one_rank_per_node(log, job_id, staged=True)
    # Staged once per node: one copy under each node's directory for this job, none elsewhere.
    copies = sorted(p.relative_to(NODE_TMP).parts[0] for p in NODE_TMP.glob(f"*/{job_id}/hpcvp-data/*/manifest.json"))
    assert copies == sorted(NODES)
    # The gradients crossed both nodes' links: per step each rank sends and receives about the
    # model's size (2-rank ring allreduce).
    from hpcvp.train.checkpoint import load_model_state

    model_bytes = sum(t.numel() * t.element_size() for t in load_model_state(run_dir)[1].values())
    grown = {link: after - before[link] for link, after in link_bytes().items()}
    assert all(g > STEPS * model_bytes for g in grown.values()), (grown, model_bytes)
    assert_same_weights(run_dir, one_node_reference, STEPS, ONE_NODE)


def test_sbatch_template_on_two_nodes_matches_one_node(
    two_node_cluster, default_dataset_dir, run_root, one_node_reference
):
    env = template_env(
        default_dataset_dir,
        run_root,
        "sbatch-two-nodes",
        SEG_SETTINGS,
        HPCVP_STAGE_LOCAL="1",
        SBATCH_MEM_PER_NODE="3G",
    )
    output = run_root / "sbatch-two-nodes-%j.out"
    options = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", f"--output={output}"]
    job_id = sbatch_template(options, env, run_root)
    state = wait_until_done(job_id, JOB_TIMEOUT_S, poll=1)
    log = Path(str(output).replace("%j", job_id)).read_text(errors="replace")
    assert state == "COMPLETED", log[-4000:]
    assert_one_rank_per_node(log, job_id, staged=True)
    assert_same_weights(run_root / "seg" / "sbatch-two-nodes", one_node_reference, STEPS, ONE_NODE)


def test_scontrol_requeue_saves_on_both_nodes_and_resumes_exactly(
    two_node_cluster, default_dataset_dir, run_root, one_node_reference
):
    assert launch.main(seg_args(default_dataset_dir, run_root, "requeued", "--nodes", "2", "--gpus", "1")) == 0
    run_dir = run_root / "seg" / "requeued"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 8, timeout=120)
    requeued_at = time.monotonic()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # Both ranks of the second attempt have joined the process group (each prints its line once).
    while len(rank_lines(logs_of(run_dir))) < 4:
        assert time.monotonic() < requeued_at + 120, "the requeued job did not start again on both nodes"
        time.sleep(0.2)
    restart_s = time.monotonic() - requeued_at
    print(f"requeue -> both ranks running again: {restart_s:.1f} s")
    assert wait_until_done(job_id, JOB_TIMEOUT_S, poll=1) == "COMPLETED", logs_of(run_dir)[-4000:]
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    log = logs_of(run_dir)
    assert_resumed_where_saved_on_both_nodes(log)
    assert_same_weights(run_dir, one_node_reference, STEPS, ONE_NODE)


# --------------------------------------------------------------------------- one node's tasks only

SLURMD_PID = "/run/slurmd-2node-{}.pid"
SCRIPT = REPO / "tools" / "slurm_local_cluster.sh"


def node_pids(node: str) -> list[int]:
    """Processes of a node: everything in its network namespace (its slurmd, slurmstepd, tasks)."""
    out = subprocess.run(["ip", "netns", "pids", f"hpcvp2-{node}"], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


def task_pids(node: str) -> list[int]:
    """The job's task processes on one node (submitit's python), not the node's Slurm daemons."""
    found = []
    for pid in node_pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline:
            found.append(pid)
    return found


def test_sigterm_to_one_node_saves_on_both_and_resumes_exactly(
    two_node_cluster, default_dataset_dir, run_root, one_node_reference
):
    assert launch.main(seg_args(default_dataset_dir, run_root, "one-node-term", "--nodes", "2", "--gpus", "1")) == 0
    run_dir = run_root / "seg" / "one-node-term"
    job_id = job_id_of(run_dir)
    wait_for_step(run_dir, job_id, 8, timeout=150)
    pids = task_pids("hpcvp2n2")
    assert pids, "no task process of the job in hpcvp2n2's namespace"
    for pid in pids:  # preemption-style: SIGTERM to the tasks of node 2 only
        os.kill(pid, 15)
    assert wait_until_done(job_id, JOB_TIMEOUT_S, poll=1) == "COMPLETED", logs_of(run_dir)[-4000:]
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"]
    log = logs_of(run_dir)
    # The flag was all-reduced: rank 0 (node 1, never signalled) stopped at the same step and saved
    # one checkpoint holding both ranks' state; rank 1 said it saved too.
    assert "rank 1 saved; stopping" in log
    assert_resumed_where_saved_on_both_nodes(log)
    assert_same_weights(run_dir, one_node_reference, STEPS, ONE_NODE)


def test_node_lost_for_good_ends_with_one_line_and_relaunch_resumes(
    two_node_cluster, default_dataset_dir, run_root, one_node_reference
):
    from hpcvp.train.checkpoint import list_checkpoints, verify_checkpoint

    every = "train.save_every_steps=5"
    run_dir = run_root / "seg" / "node-lost"
    try:
        assert (
            launch.main(
                seg_args(default_dataset_dir, run_root, "node-lost", "--nodes", "2", "--gpus", "1", "--set", every)
            )
            == 0
        )
        job_id = job_id_of(run_dir)
        wait_for_step(run_dir, job_id, 12, timeout=150)
        # Node 2 is gone: its slurmd first (it would otherwise report the tasks' deaths), then
        # everything else in its namespace (slurmstepd, the task).
        os.kill(int(Path(SLURMD_PID.format("hpcvp2n2")).read_text()), 9)
        for pid in node_pids("hpcvp2n2"):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        state = wait_until_done(job_id, 180, poll=1)
        log = logs_of(run_dir)
        assert state in ("FAILED", "NODE_FAIL"), (state, log[-4000:])
        assert "REQUEUED" not in sacct_states(job_id), "the job was requeued onto the lost node"
        lines = re.findall(r"rank 0 on hpcvp2n1: lost rank 1 on hpcvp2n2 \(10\.213\.0\.12\) .*", log)
        assert len(lines) == 1, log[-4000:]
        assert "Traceback" not in log, log[-4000:]
        step, path = list_checkpoints(run_dir)[-1]
        assert f"last checkpoint step {step} ({path}) is intact" in lines[0]
        verify_checkpoint(path)
        # Relaunch on what is left: node 1 alone, 2 tasks (same world size): resumes from it exactly.
        status = launch.main(
            seg_args(
                default_dataset_dir, run_root, "node-lost", "--nodes", "1", "--gpus", "2", "--set", every, "--wait"
            )
        )
        log = logs_of(run_dir)
        assert status == 0, log[-4000:]
        assert re.findall(r"resumed from step (\d+)", log) == [str(step)], log[-4000:]
        assert_same_weights(run_dir, one_node_reference, STEPS, ONE_NODE)
    finally:
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
        subprocess.run(["bash", str(SCRIPT), "up", "--nodes", "2"], env=env, capture_output=True, timeout=300)


SIMVP_SETTINGS = ["mode=masks", "train.max_steps=6", "train.batch_size=2", "train.log_every=2", "eval_max_videos=2"]


def test_simvp_two_nodes_matches_one_node(two_node_cluster, default_dataset_dir, tmp_path):
    def args(run: str, *extra: str) -> list[str]:
        return launch_args("simvp", default_dataset_dir, tmp_path, run, SIMVP_SETTINGS, *extra)

    assert launch.main(args("one-node", "--cluster", "local", "--gpus", "2", "--wait")) == 0
    status = launch.main(args("two-nodes", "--nodes", "2", "--gpus", "1", "--wait"))
    run_dir = tmp_path / "simvp" / "two-nodes"
    log = logs_of(run_dir)
    assert status == 0, log[-4000:]
    ranks = {r["rank"]: r["host"] for r in rank_lines(log)}
    assert ranks == {0: "hpcvp2n1", 1: "hpcvp2n2"}
    assert_same_weights(run_dir, tmp_path / "simvp" / "one-node", 6, ONE_NODE)


def test_exclude_keeps_the_job_off_the_excluded_node(two_node_cluster, default_dataset_dir, run_root):
    """Issue 11: ``--exclude`` reaches Slurm (ExcNodeList) and the job runs on the other node only."""
    settings = ["--set", "train.max_steps=4"]
    status = launch.main(
        seg_args(default_dataset_dir, run_root, "exclude", "--gpus", "1", "--exclude", "hpcvp2n2", "--wait", *settings)
    )
    run_dir = run_root / "seg" / "exclude"
    log = logs_of(run_dir)
    assert status == 0, log[-4000:]
    job_id = job_id_of(run_dir)
    fields = sacct_field(job_id, "NodeList,State")
    assert fields == "hpcvp2n1|COMPLETED", fields
    assert "rank 0 on hpcvp2n1" in log and "hpcvp2n2" not in log, log[-3000:]
