"""Watching a run: curves.png redrawn at each evaluation, Weights & Biases (a fake ``wandb``
module, never the real one), and ``tensorboard --logdir runs`` over the whole run root."""

from __future__ import annotations

import builtins
import os
import sys
import types

import pytest
import torch

from hpcvp.train import RunDir, TrainConfig, Trainer, single_process_env
from hpcvp.train.rundir import CURVES_PICTURE, MetricsWriter, WandbSettings
from hpcvp.train.toy import ToyTask


class FakeWandb(types.ModuleType):
    """Records what the MetricsWriter asks of wandb."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logs: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(dir=str(kwargs.get("dir")))

    def log(self, data, step=None):
        self.logs.append((dict(data), step))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _hide(monkeypatch, prefix: str) -> None:
    real_import = builtins.__import__

    def hidden(name, *args, **kwargs):
        if name == prefix or name.startswith(prefix + "."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", hidden)


def test_curves_png_is_redrawn_at_each_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "pictures" / CURVES_PICTURE
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False)
    writer.write({"step": 1, "loss": 2.0, "lr": 0.1})
    assert not picture.exists()  # training lines alone do not draw
    writer.write({"step": 2, "loss": 1.5, "val_jaccard": 0.2}, evaluation=True)
    first = picture.stat().st_mtime_ns
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    writer.write({"step": 4, "loss": 1.0, "val_jaccard": 0.3}, evaluation=True)
    assert picture.stat().st_mtime_ns >= first
    writer.close()
    assert not list((tmp_path / "pictures").glob(".*tmp*"))  # written atomically


def test_curves_without_matplotlib_say_so_once(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "matplotlib")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": 1.0}, evaluation=True)
    writer.close()
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
    assert not (tmp_path / "pictures" / CURVES_PICTURE).exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_offline_on_compute_nodes_with_the_sync_command(tmp_path, monkeypatch, capsys, fake_wandb):
    monkeypatch.setenv("WANDB_MODE", "")  # recorded, so that the mode the writer sets is undone
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    run_dir = tmp_path / "seg" / "default"
    settings = WandbSettings("hpcvp", "seg/default", {"lr": 0.1})
    writer = MetricsWriter(run_dir / "metrics.jsonl", tensorboard=False, wandb=settings)
    writer.write({"step": 5, "loss": 1.0, "ok": True, "time": 1.0})
    writer.close()
    assert os.environ["WANDB_MODE"] == "offline"
    (init,) = fake_wandb.inits
    assert init["project"] == "hpcvp" and init["name"] == "seg/default" and init["dir"] == str(run_dir)
    assert init["resume"] == "allow" and init["id"].startswith("seg-default-")
    assert init["config"] == {"lr": 0.1}
    assert fake_wandb.logs == [({"loss": 1.0}, 5)]  # no booleans, no wall time
    assert fake_wandb.finished == 1
    out = capsys.readouterr().out
    assert "WANDB_MODE=offline" in out
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in out


def test_wandb_mode_the_user_set_is_kept(tmp_path, monkeypatch, capsys, fake_wandb):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False, wandb=WandbSettings("p", "x/y"))
    writer.close()
    assert os.environ["WANDB_MODE"] == "online"
    assert "wandb sync" not in capsys.readouterr().out


def test_wandb_missing_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    _hide(monkeypatch, "wandb")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=False, wandb=WandbSettings("p", "x/y"))
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert capsys.readouterr().out.count("wandb is not installed") == 1


def test_training_draws_curves_and_logs_to_wandb_and_tensorboard(tmp_path, monkeypatch, fake_wandb):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dict(max_steps=6, batch_size=8, log_every=2, num_workers=0, save_every_minutes=0, progress="off")
        for name, extra in (("a", {"wandb": True, "eval_every": 3}), ("b", {})):
            run = RunDir(tmp_path / "runs" / "toy" / name)
            Trainer(ToyTask(), TrainConfig(**cfg, **extra), run, single_process_env()).fit()
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "runs" / "toy" / "a" / "pictures" / CURVES_PICTURE).is_file()
    (init,) = fake_wandb.inits  # only run a asked for W&B
    assert init["name"] == "toy/a" and init["config"]["wandb"] is True
    assert [step for _, step in fake_wandb.logs] == [2, 3, 4, 6]
    assert any("val_acc" in data for data, _ in fake_wandb.logs)
    # `tensorboard --logdir runs`: one TensorBoard run per run dir, found from the run root
    boards = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs"))
    boards.Reload()
    scalars = boards.Runs()
    assert set(scalars) == {"toy/a/tensorboard", "toy/b/tensorboard"}
    assert "loss" in scalars["toy/b/tensorboard"]["scalars"]
