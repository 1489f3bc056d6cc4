"""The environment a multi-node GPU job gets in its batch script (sbatch.multinode_gpu_setup).

It cannot run here (no GPUs, no InfiniBand), so the rendered text is what is checked: the lines
appear for nodes > 1 on GPU clusters only, the port rule is the engine's, the profile's
socket_ifname reaches NCCL (and gloo for plain names), and a shell computes the same address and
port as hpcvp.train.dist does from the same Slurm variables.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from hpcvp.cluster.profiles import load_profiles
from hpcvp.cluster.sbatch import MASTER_PORT_BASE, MASTER_PORT_SPAN, JobRequest, multinode_gpu_setup
from hpcvp.train import dist


def request(nodes: int, gpus: int = 4) -> JobRequest:
    return JobRequest("simvp", "hpcvp-simvp", Path("/scratch/r"), "m", [], gpus_per_node=gpus, nodes=nodes)


@pytest.fixture
def profiles(monkeypatch):
    monkeypatch.delenv("HPCVP_CLUSTERS", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    return load_profiles()


def test_port_rule_is_the_engines():
    assert (MASTER_PORT_BASE, MASTER_PORT_SPAN) == (dist.PORT_BASE, dist.PORT_SPAN)


@pytest.mark.parametrize("cluster", ["greene", "torch"])
def test_lines_only_for_several_gpu_nodes(profiles, cluster):
    profile = profiles[cluster]
    assert multinode_gpu_setup(profile, request(1)) == []
    text = "\n".join(multinode_gpu_setup(profile, request(2)))
    for needle in (
        'export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"',
        "SLURM_JOB_ID % 20000",
        'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"',
        'export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"',
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
    ):
        assert needle in text
    assert "export NCCL_SOCKET_IFNAME" not in text  # NCCL's own choice (ib* first) unless the profile says


def test_gpu_less_clusters_get_none(profiles):
    for name in ("slurm-local", "slurm-local-2node"):
        assert multinode_gpu_setup(profiles[name], request(2, gpus=1)) == []


def test_socket_ifname_reaches_nccl_and_gloo(profiles):
    plain = dataclasses.replace(profiles["greene"], socket_ifname="ib0")
    text = "\n".join(multinode_gpu_setup(plain, request(2)))
    assert 'export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-ib0}"' in text
    assert 'export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-ib0}"' in text
    pattern = dataclasses.replace(profiles["greene"], socket_ifname="^lo,docker")
    text = "\n".join(multinode_gpu_setup(pattern, request(2)))
    assert 'export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"' in text
    assert "GLOO_SOCKET_IFNAME" not in text  # gloo takes exact names only


def test_shell_and_engine_agree_on_address_and_port(profiles, tmp_path):
    # A stand-in scontrol expands the node list as Slurm would; the engine parses it itself.
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gv013\\ngv014\\n"\n')
    fake.chmod(0o755)
    lines = multinode_gpu_setup(profiles["torch"], request(2))
    script = "\n".join([*lines, 'echo "$MASTER_ADDR $MASTER_PORT"'])
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gv[013-014]", "SLURM_JOB_ID": "4242421"}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout.split()
    info = dist.detect_launch({**env, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert out == [info.master_addr, str(info.master_port)] == ["gv013", str(dist.port_from_job_id("4242421"))]


def test_plain_sbatch_body_exports_the_same(profiles):
    body = (Path(__file__).resolve().parents[1] / "slurm" / "stage_body.sh").read_text()
    for line in multinode_gpu_setup(profiles["torch"], request(2)):
        if line.startswith("export "):
            assert line in body, line


def test_pending_reason_names_the_nodes(monkeypatch):
    from hpcvp.cluster import status

    fields = {"JobState": "PENDING", "Reason": "ReqNodeNotAvail,_UnavailableNodes:hpcvp2n2", "ReqNodeList": "(null)"}
    monkeypatch.setattr(status, "scontrol_job_fields", lambda job_id: fields)
    assert status.pending_reason("7") == "ReqNodeNotAvail,_UnavailableNodes:hpcvp2n2"
    fields.update(Reason="NodeDown", ReqNodeList="hpcvp2n[1-2]")
    assert status.pending_reason("7") == "NodeDown (nodes hpcvp2n[1-2])"
    fields.update(Reason="None")
    assert status.pending_reason("7") == ""
