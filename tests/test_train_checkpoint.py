"""The checkpoint format: atomic directories, verification, fallback, SIGKILL during a write."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcvp.train import TrainConfig, Trainer, single_process_env
from hpcvp.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    latest_step,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    load_model_state,
    save_checkpoint,
)
from hpcvp.train.rng import capture_rng_state, restore_rng_state
from hpcvp.train.rundir import RunDir
from hpcvp.train.toy import ToyTask, tree_differences

REPO = Path(__file__).resolve().parents[1]


def _state(step):
    gen = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"w": torch.randn(64, 64, generator=gen)}, "note": f"s{step}"}


def test_roundtrip_keep_last_and_latest_step(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    assert latest_step(tmp_path / "run") is None
    for step in (10, 20, 30, 40):
        save_checkpoint(ckpts, step, _state(step), ranks=[{"r": 0}, {"r": 1}], extra={"anything": [1, 2]}, keep_last=2)
    assert [s for s, _ in list_checkpoints(ckpts)] == [30, 40]
    assert latest_step(tmp_path / "run") == 40 == latest_step(RunDir(tmp_path / "run"))
    ckpt = load_latest(ckpts)
    assert ckpt.step == 40 and ckpt.ranks == [{"r": 0}, {"r": 1}] and ckpt.extra == {"anything": [1, 2]}
    assert not tree_differences(ckpt.state, _state(40))
    step, model = load_model_state(tmp_path / "run")
    assert step == 40 and torch.equal(model["w"], _state(40)["model"]["w"])
    # only renamed directories count; nothing else is left behind
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000030", "step_00000040"]


def test_unfinished_directories_are_ignored_and_cleaned(tmp_path):
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts, 5, _state(5))
    stale = ckpts / "step_00000010.tmp-999999"  # a writer killed mid-way
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert latest_step(ckpts) == 5 and load_latest(ckpts).step == 5
    save_checkpoint(ckpts, 6, _state(6))
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_meta", "drop_file"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, damage):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(ckpts, step, _state(step), ranks=[{}])
    latest = ckpts / "step_00000003"
    target = latest / "state.pt"
    data = bytearray(target.read_bytes())
    if damage == "flip_byte":  # torch.load alone would not notice this one
        data[len(data) // 2] ^= 0x55
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "drop_meta":
        (latest / "meta.json").unlink()
    else:
        (latest / "ranks.pt").unlink()
    with pytest.raises(CheckpointError, match="step_00000003"):
        load_checkpoint(latest)
    with pytest.warns(CheckpointWarning, match="falling back"):
        ckpt = load_latest(ckpts, quarantine=True)
    assert ckpt.step == 2 and not tree_differences(ckpt.state, _state(2))
    assert [s for s, _ in list_checkpoints(ckpts)] == [1, 2]  # set aside, kept for inspection
    assert any(p.name.startswith("step_00000003.corrupt-") for p in ckpts.iterdir())


def test_all_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(ckpts, step, _state(step))
        (ckpts / f"step_{step:08d}" / "state.pt").write_bytes(b"garbage")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(ckpts)


def _draw():
    return (random.random(), float(np.random.rand()), torch.rand(()).item(), torch.randn(3).tolist())


def test_rng_states_survive_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy's cached gaussian is part of the state too
    save_checkpoint(tmp_path, 1, {"step": 1}, ranks=[capture_rng_state()])
    expected = _draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_latest(tmp_path).ranks[0])  # loaded with weights_only=True
    assert _draw() == expected


# ------------------------------------------------------------------ SIGKILL during a write

KILL_CFG = dict(
    max_steps=12,
    batch_size=8,
    save_every_steps=2,
    save_every_minutes=0,
    log_every=1,
    num_workers=0,
    eval_every=0,
    eval_at_end=False,
)


def _child_env():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _toy_cmd(run_dir, slow_extra_s):
    cmd = [
        sys.executable,
        "-m",
        "hpcvp.train.toy",
        "--run-dir",
        str(run_dir),
        "--ballast-mb",
        "24",
        "--slow-extra-s",
        str(slow_extra_s),
    ]
    for k, v in KILL_CFG.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def _kill_during_a_write(run_dir: Path, rng: random.Random) -> tuple[int | None, int]:
    """Start the toy, SIGKILL it at a random moment while a checkpoint directory is being
    written (after at least one complete checkpoint exists); returns (latest before, killed at)."""
    proc = subprocess.Popen(
        _toy_cmd(run_dir, 0.4), env=_child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            writing = ckpts.is_dir() and any(".tmp-" in p.name for p in ckpts.iterdir())
            before = latest_step(ckpts)
            if writing and before is not None:
                time.sleep(rng.uniform(0.0, 0.45))  # somewhere inside the ~0.5 s write
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return before, proc.returncode
            time.sleep(0.002)
        raise AssertionError("toy run never started a second checkpoint write")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses use one thread too: identical float results
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_loadable(tmp_path, one_thread):
    rng = random.Random(20240607)
    run_dir = tmp_path / "killed"
    for _ in range(3):
        before, code = _kill_during_a_write(run_dir, rng)
        assert code == -signal.SIGKILL
        ckpt = load_latest(run_dir / "checkpoints")  # must not raise, no fallback needed
        assert ckpt is not None and ckpt.step >= before
    # resuming after the kills finishes the run with the weights of a run never killed
    done = subprocess.run(
        _toy_cmd(run_dir, 0.0), env=_child_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]

    reference = RunDir(tmp_path / "reference")
    cfg = TrainConfig(**{**KILL_CFG, "save_every_steps": 0})
    Trainer(ToyTask(ballast_mb=24), cfg, reference, single_process_env()).fit()
    a = load_latest(reference.checkpoints).state
    b = load_latest(run_dir / "checkpoints").state
    assert a["step"] == b["step"] == 12
    assert not tree_differences(a["model"], b["model"])
    assert not tree_differences(a["optimizer"], b["optimizer"])
    steps = [r["step"] for r in RunDir(run_dir).read_metrics()]
    assert steps == list(range(1, 13))


# ------------------------------------------------------------------ the Checkpointer and its parts


class _Part:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return dict(self.value)

    def load_state_dict(self, state):
        self.value = dict(state)


def test_checkpointer_files_flat_parts_rank_parts_and_world_size(tmp_path):
    from types import SimpleNamespace

    from hpcvp.train.checkpoint import Checkpointer

    def make(world, counters, model, rng):
        env = SimpleNamespace(world_size=world, rank=0, is_main=True, distributed=False)
        return Checkpointer(
            tmp_path, env, {"counters": counters, "model": model}, {"rng": rng}, flat=("counters",), keep_last=2
        )

    saver = make(1, _Part({"epoch": 3}), _Part({"w": torch.ones(2)}), _Part({"s": 7}))
    saver.save(5)
    assert saver.save(5) == saver.last_path  # once per step
    ckpt = load_latest(tmp_path)
    assert (ckpt.state["step"], ckpt.state["epoch"], ckpt.state["world_size"]) == (5, 3, 1)  # format 1 layout
    assert torch.equal(ckpt.state["model"]["w"], torch.ones(2)) and ckpt.ranks == [{"rng": {"s": 7}}]

    counters, model, rng = _Part({}), _Part({}), _Part({"s": 0})
    assert make(1, counters, model, rng).load().step == 5
    assert counters.value["epoch"] == 3 and torch.equal(model.value["w"], torch.ones(2)) and rng.value == {"s": 7}
    rng = _Part({"s": 0})
    make(2, _Part({}), _Part({}), rng).load()  # other world size: per-rank state left as built
    assert rng.value == {"s": 0}

    with pytest.raises(CheckpointError, match="repeats top-level key"):
        make(1, _Part({"step": 1}), _Part({}), _Part({})).save(6)  # a flat part may not shadow a key
