"""Metrics reach TensorBoard event files in the run dir when tensorboard is installed."""

from __future__ import annotations

import pytest

from hpcvp.train.rundir import TENSORBOARD_DIR, MetricsWriter


def test_metrics_writer_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 2, "loss": 1.5, "time": 1.0})
    writer.write({"step": 4, "loss": 1.0, "val_jaccard": 0.25})
    writer.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 1.5), (4, 1.0)]
    assert [e.step for e in events.Scalars("val_jaccard")] == [4]
    assert "time" not in events.Tags()["scalars"]


def test_metrics_writer_without_tensorboard_says_so_once(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert capsys.readouterr().out.count("tensorboard is not installed") == 1
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
