"""Launcher environment parsing (Slurm/submitit, torchrun, single), node lists, config, signals."""

import signal

import pytest
import torch

from hpcvp.train.config import TrainConfig
from hpcvp.train.dist import (
    PORT_BASE,
    PORT_SPAN,
    DistSetupError,
    detect_launch,
    expand_nodelist,
    first_host,
    init_distributed,
    port_from_job_id,
)
from hpcvp.train.signals import EXIT_REQUEUE, PreemptionFlag, parse_signal


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gr001", ["gr001"]),
        ("gr[001-004,010]", ["gr001", "gr002", "gr003", "gr004", "gr010"]),
        ("gr[008-011]", ["gr008", "gr009", "gr010", "gr011"]),
        ("ga[1-2],gv013", ["ga1", "ga2", "gv013"]),
        ("cs[098-101]-ib", ["cs098-ib", "cs099-ib", "cs100-ib", "cs101-ib"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("node7,node3", ["node7", "node3"]),
        ("localhost", ["localhost"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["gr[001-004", "gr001]", "gr[a-b]", "gr[5-3]", ""])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_port_is_stable_per_job_and_in_range():
    assert port_from_job_id("123456") == port_from_job_id(123456)
    assert port_from_job_id("123456") != port_from_job_id("123457")
    for job in ("1", "99999999", "4242_7"):
        assert PORT_BASE <= port_from_job_id(job) < PORT_BASE + PORT_SPAN


def test_detect_slurm_srun_task():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gr[003-004,010]",
        "SLURM_TASKS_PER_NODE": "4(x2)",
    }
    info = detect_launch(env)
    assert info.launcher == "slurm"
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert info.master_addr == "gr003"
    assert info.master_port == port_from_job_id("4242")


def test_detect_slurm_prefers_step_variables_and_explicit_master():
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "16",  # the allocation
        "SLURM_STEP_NUM_TASKS": "2",  # what this srun started
        "SLURM_JOB_NODELIST": "gr[001-008]",
        "SLURM_STEP_NODELIST": "gr[005-006]",
    }
    info = detect_launch(env)
    assert info.world_size == 2 and info.master_addr == "gr005"
    info = detect_launch({**env, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "23456"})
    assert (info.master_addr, info.master_port) == ("10.0.0.9", 23456)


def test_detect_torchrun_takes_precedence_over_slurm():
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NODELIST": "gr001",
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gr001",
        "MASTER_PORT": "29500",
    }
    info = detect_launch(env)
    assert info.launcher == "torchrun"
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.master_addr, info.master_port) == ("gr001", 29500)


def test_detect_single_and_errors():
    assert detect_launch({}).launcher == "single"
    assert detect_launch({"SLURM_JOB_ID": "5"}).world_size == 1  # sbatch shell, no srun task vars
    with pytest.raises(DistSetupError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistSetupError, match="SLURM_PROCID"):
        detect_launch({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"})
    with pytest.raises(DistSetupError, match="outside world size"):
        detect_launch({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a"})
    with pytest.raises(DistSetupError, match="NODELIST"):
        detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})


def test_init_distributed_single_process_has_no_group():
    env = init_distributed(env={}, use_cuda=False)
    assert (env.rank, env.world_size, env.backend) == (0, 1, None)
    assert env.device == torch.device("cpu") and env.is_main and not env.distributed


def test_signals_and_exit_code():
    assert EXIT_REQUEUE == 75
    assert parse_signal("USR2") == parse_signal("SIGUSR2") == signal.SIGUSR2
    assert parse_signal("term") == signal.SIGTERM
    with pytest.raises(ValueError, match="NCCL"):
        parse_signal("USR1")
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("NOPE")
    flag = PreemptionFlag("USR2")
    previous = signal.getsignal(signal.SIGUSR2)
    with flag:
        assert not flag.requested
        signal.raise_signal(signal.SIGUSR2)
        assert flag.requested and flag.signum == signal.SIGUSR2
        signal.raise_signal(signal.SIGTERM)  # the first signal is the one reported
        assert flag.signum == signal.SIGUSR2
    assert signal.getsignal(signal.SIGUSR2) == previous


def test_train_config_validation_and_overrides():
    cfg = TrainConfig().with_overrides(["lr=3e-4", "amp=off", "channels_last=true", "max_steps=7"])
    assert (cfg.lr, cfg.amp, cfg.channels_last, cfg.max_steps) == (3e-4, "off", True, 7)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="keep_last"):
        TrainConfig(keep_last=1)
    with pytest.raises(ValueError, match="USR1"):
        TrainConfig(preempt_signal="USR1")
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig().with_overrides(["learning_rate=1"])
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig().with_overrides(["max_steps=ten"])
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"max_step": 3})


def test_lost_peer_names_the_rank_host_and_first_sentence(monkeypatch):
    from hpcvp.train import dist as hdist

    monkeypatch.setattr(hdist, "_rank_hosts", ["hpcvp2n1", "hpcvp2n2"])
    monkeypatch.setattr(hdist.socket, "gethostbyaddr", lambda a: ("hpcvp2n2", [], [a]))
    error = RuntimeError(
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
        "[10.213.0.12]:17094. This is typically caused by a remote worker crashing."
    )
    try:
        raise ValueError("wrapped") from error
    except ValueError as wrapped:
        lost = hdist.lost_peer(wrapped)
    assert lost is not None
    assert lost.describe() == "rank 1 on hpcvp2n2 (10.213.0.12)"
    assert lost.error == "Connection closed by peer [10.213.0.12]:17094"
    assert hdist.lost_peer(RuntimeError("CUDA out of memory")) is None
    assert hdist.lost_peer(ValueError("Connection closed by peer")) is None
