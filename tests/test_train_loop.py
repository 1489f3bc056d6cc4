"""The loop in one process: preemption and exact resume, fallback, identity check, schedules,
gradient accumulation, DataLoader workers, progress output."""

import io
import json
import math

import pytest
import torch

from hpcvp.progress import TrainProgress
from hpcvp.train import (
    EXIT_REQUEUE,
    IdentityMismatchError,
    NonFiniteLossError,
    RunDir,
    TrainConfig,
    Trainer,
    latest_step,
    load_latest,
    single_process_env,
)
from hpcvp.train.checkpoint import CheckpointWarning
from hpcvp.train.optim import WarmupCosine, build_optimizer, build_scheduler
from hpcvp.train.toy import ToyTask, tree_differences

BASE = dict(
    max_steps=20,
    batch_size=8,
    log_every=1,
    num_workers=0,
    save_every_steps=6,
    save_every_minutes=0,
    eval_every=10,
    progress="off",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # a fixed thread count: CPU reductions may split work differently with more threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(run, task=None, **overrides):
    cfg = TrainConfig(**{**BASE, **overrides})
    return Trainer(task or ToyTask(), cfg, run, single_process_env()).fit()


def _metrics(run):
    return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in run.read_metrics()]


def _assert_same_training(ref: RunDir, run: RunDir):
    a, b = load_latest(ref.checkpoints).state, load_latest(run.checkpoints).state
    assert a["step"] == b["step"]
    assert not tree_differences(a["model"], b["model"]), "weights differ"
    assert not tree_differences(a["optimizer"], b["optimizer"]), "optimizer state differs"
    assert not tree_differences(a["scheduler"], b["scheduler"])
    assert _metrics(ref) == _metrics(run)  # every step once, with identical values


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("ref") / "toy" / "ref")
    result = _fit(run)
    assert (result.status, result.step, result.exit_code) == ("completed", 20, 0)
    return run


def test_completed_run_layout(reference):
    run = reference
    assert [r["step"] for r in run.read_metrics()] == list(range(1, 21))
    assert latest_step(run) == 20
    config = json.loads(run.config_path.read_text())
    assert config["train"]["max_steps"] == 20 and config["identity"]["task"] == "toy"
    assert sorted(p.name for p in run.pictures.iterdir()) == ["curves.png", "eval_00000010.json", "eval_00000020.json"]
    rows = {r["step"]: r for r in run.read_metrics()}
    assert "val_acc" in rows[10] and "val_acc" not in rows[11]
    assert {"loss", "acc", "lr", "grad_norm", "epoch"} <= set(rows[1])
    assert (run.logs / "engine.rank0.log").exists()


@pytest.mark.parametrize("stops", [(6, 7, 15), (3, 10, 12, 19), (20,)])
def test_preempted_and_resumed_run_is_bitwise_equal(reference, tmp_path, stops):
    # 6 and 12 are save steps (signal right at a save), 7 is right after one,
    # 3/15/19 are mid-epoch (12 batches per epoch), 12 is also an epoch boundary,
    # 10 and 20 are evaluation steps (the evaluation is postponed to the resumed run)
    run = RunDir(tmp_path / "toy" / "run")
    for stop in stops:
        result = _fit(run, ToyTask(signal_at={stop: (None, 12)}))  # 12 = SIGUSR2
        assert (result.status, result.step, result.signal) == ("preempted", stop, "SIGUSR2")
        assert result.exit_code == EXIT_REQUEUE
        assert latest_step(run) == stop
    result = _fit(run)
    assert (result.status, result.step, result.resumed_from) == ("completed", 20, stops[-1])
    _assert_same_training(reference, run)


def test_dataloader_workers_resume_mid_epoch(reference, tmp_path):
    """num_workers=2, interrupted mid-epoch: same result as the 0-worker reference."""
    run = RunDir(tmp_path / "toy" / "workers")
    result = _fit(run, ToyTask(signal_at={9: (None, 15)}), num_workers=2)  # SIGTERM
    assert (result.status, result.signal) == ("preempted", "SIGTERM")
    assert _fit(run, num_workers=2).status == "completed"
    _assert_same_training(reference, run)


def test_corrupt_latest_checkpoint_falls_back_and_still_ends_equal(reference, tmp_path):
    run = RunDir(tmp_path / "toy" / "corrupt")
    _fit(run, ToyTask(signal_at={14: (None, 12)}))
    assert latest_step(run) == 14
    state_file = run.checkpoints / "step_00000014" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-100])  # truncated
    with pytest.warns(CheckpointWarning, match="step_00000014"):
        result = _fit(run)
    assert result.resumed_from == 12 and result.status == "completed"
    _assert_same_training(reference, run)


def test_identity_mismatch_is_a_clear_error(reference, tmp_path):
    run = RunDir(tmp_path / "toy" / "mismatch")
    _fit(run, ToyTask(signal_at={3: (None, 12)}))
    with pytest.raises(IdentityMismatchError) as err:
        _fit(run, ToyTask(width=48, dataset_size=80))
    message = str(err.value)
    assert "model.width" in message and "data.dataset_size" in message
    assert "checkpoint=32 now=48" in message and "model.dim" not in message


class _ToyWithoutDataIdentity(ToyTask):
    def identity(self) -> dict:
        return {"task": "toy", "model": {"width": self.width}}


def test_resume_over_a_resized_dataset_is_refused(tmp_path):
    # the task says nothing about its data; the engine still sees the training set changed
    run = RunDir(tmp_path / "toy" / "resized")
    _fit(run, _ToyWithoutDataIdentity(signal_at={3: (None, 12)}))
    with pytest.raises(IdentityMismatchError) as err:
        _fit(run, _ToyWithoutDataIdentity(dataset_size=80))
    assert "engine.train_samples" in str(err.value) and "now=80" in str(err.value)


def test_resume_at_max_steps_does_nothing(reference, tmp_path):
    result = _fit(reference)
    assert (result.status, result.step) == ("completed", 20)
    assert [r["step"] for r in reference.read_metrics()] == list(range(1, 21))


def test_time_based_saves_and_keep_last(tmp_path):
    run = RunDir(tmp_path / "toy" / "timed")
    _fit(run, save_every_steps=0, save_every_minutes=1e-9, keep_last=2, max_steps=8)
    assert [p.name for p in sorted(run.checkpoints.iterdir())] == ["step_00000007", "step_00000008"]
    run2 = RunDir(tmp_path / "toy" / "untimed")
    _fit(run2, save_every_steps=0, save_every_minutes=0, max_steps=8)
    assert [p.name for p in run2.checkpoints.iterdir()] == ["step_00000008"]  # the final one


@pytest.mark.parametrize("num_workers", [0, 2])
def test_snapshots_are_saved_at_fractions_of_the_run_and_never_pruned(tmp_path, num_workers):
    run = RunDir(tmp_path / "toy" / "snapshots")
    cfg = TrainConfig(**{**BASE, "snapshots": 3, "keep_last": 2})
    assert cfg.snapshot_steps() == {7, 13, 20}
    # a run stopped by a signal at step 9 and resumed keeps snapshot 7 beside the newest two
    _fit(run, ToyTask(signal_at={9: (None, 12)}), snapshots=3, keep_last=2, num_workers=num_workers)
    names = [p.name for p in sorted(run.checkpoints.iterdir())]
    assert names == ["step_00000006", "step_00000007", "step_00000009"]
    _fit(run, snapshots=3, keep_last=2, num_workers=num_workers)
    names = [p.name for p in sorted(run.checkpoints.iterdir())]
    # saves at 12, 13 (snapshot), 18, 20 (end, snapshot): besides the snapshots the newest two, 12 and 18
    assert names == ["step_00000007", "step_00000012", "step_00000013", "step_00000018", "step_00000020"]
    # the extra saves change nothing in the training: same weights as a plain uninterrupted run
    ref = RunDir(tmp_path / "toy" / "plain")
    _fit(ref, num_workers=num_workers)
    _assert_same_training(ref, run)
    assert TrainConfig(max_steps=2, snapshots=3).snapshot_steps() == {1, 2}
    with pytest.raises(ValueError, match="snapshots"):
        TrainConfig(snapshots=-1)


def test_schedules_step_once_per_iteration(tmp_path):
    run = RunDir(tmp_path / "toy" / "cosine")
    _fit(run, schedule="cosine", lr=0.1, warmup_frac=0.25, min_lr_frac=0.1, eval_every=0, eval_at_end=False)
    lrs = [r["lr"] for r in run.read_metrics()]
    curve = WarmupCosine(20, 5, 0.1)
    assert lrs == pytest.approx([0.1 * curve(t) for t in range(20)])
    assert lrs[0] == pytest.approx(0.02) and lrs[4] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 14 / 15))))

    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(max_steps=100, lr=1.0, schedule="onecycle", warmup_frac=0.3)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(seen) == pytest.approx(1.0) and seen.index(max(seen)) in (29, 30)
    assert seen[0] == pytest.approx(1.0 / 25) and seen[-1] < 1e-3


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    plain = ToyTask(batch_norm=False, dropout=0.0)
    a = RunDir(tmp_path / "toy" / "big_batch")
    b = RunDir(tmp_path / "toy" / "accum")
    _fit(a, plain, batch_size=8, grad_accum=1, max_steps=10)
    _fit(b, ToyTask(batch_norm=False, dropout=0.0), batch_size=4, grad_accum=2, max_steps=10)
    wa, wb = load_latest(a.checkpoints).state["model"], load_latest(b.checkpoints).state["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    # the same samples were consumed (position counts micro-batches)
    sa, sb = load_latest(a.checkpoints).state, load_latest(b.checkpoints).state
    assert (sa["epoch"], sa["position"]) == (sb["epoch"], sb["position"])


def test_compiled_run_saves_plain_keys_logs_its_compile_time_and_resumes_either_way(tmp_path, caplog):
    """A run compiled with aot_eager (forward and backward graphs through AOTAutograd), stopped at
    step 5 and resumed compiled or eager, ends bitwise equal to an uninterrupted eager run."""
    ref = RunDir(tmp_path / "toy" / "eager")
    assert _fit(ref, max_steps=12).status == "completed"
    for resume_compiled in (True, False):
        run = RunDir(tmp_path / "toy" / f"compiled-then-{resume_compiled}")
        with caplog.at_level("INFO", logger="hpcvp.train"):
            stopped = _fit(
                run, ToyTask(signal_at={5: (None, 12)}), compile=True, compile_backend="aot_eager", max_steps=12
            )
        assert stopped.status == "preempted"
        assert any("torch.compile: the first step took" in r.getMessage() for r in caplog.records)
        keys = load_latest(run.checkpoints).state["model"].keys()
        assert keys and not [k for k in keys if "_orig_mod" in k or k.startswith("module.")]
        assert _fit(run, compile=resume_compiled, compile_backend="aot_eager", max_steps=12).status == "completed"
        _assert_same_training(ref, run)
    # and the other way: saved eager, resumed compiled
    run = RunDir(tmp_path / "toy" / "eager-then-compiled")
    assert _fit(run, ToyTask(signal_at={5: (None, 12)}), max_steps=12).status == "preempted"
    assert _fit(run, compile=True, compile_backend="aot_eager", max_steps=12).status == "completed"
    _assert_same_training(ref, run)


class _BackwardFails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated backward compile failure")


def test_a_backward_that_fails_to_compile_falls_back_to_eager_and_redoes_the_step(tmp_path, monkeypatch):
    """torch.compile compiles the backward graph at the first backward: a failure there switches
    to eager with one warning and redoes the step on the same batches (BatchNorm statistics
    restored), so the run equals a plain eager one."""

    def fake_compile(module, backend):
        return lambda *args, **kwargs: _BackwardFails.apply(module(*args, **kwargs))

    ref = RunDir(tmp_path / "toy" / "eager")
    assert _fit(ref, max_steps=6).status == "completed"
    monkeypatch.setattr(torch, "compile", fake_compile)
    run = RunDir(tmp_path / "toy" / "fallback")
    with pytest.warns(UserWarning, match="simulated backward compile failure") as warned:
        assert _fit(run, compile=True, max_steps=6).status == "completed"
    assert len([w for w in warned if "torch.compile failed" in str(w.message)]) == 1
    _assert_same_training(ref, run)


def test_fp16_gradscaler_state_is_part_of_exact_resume(tmp_path):
    """fp16 autocast + GradScaler (the V100/RTX 8000 path; on a CPU it runs, slowly). The NaN
    loss at step 8 makes the scaler skip that step and halve its scale; a run stopped at step 10
    must resume with the halved scale and end bitwise equal to an uninterrupted run."""
    ref = RunDir(tmp_path / "toy" / "ref")
    assert _fit(ref, ToyTask(nan_at=(8, 8, None)), amp="fp16", max_steps=14).status == "completed"
    run = RunDir(tmp_path / "toy" / "run")
    stopped = _fit(run, ToyTask(nan_at=(8, 8, None), signal_at={10: (None, 12)}), amp="fp16", max_steps=14)
    assert stopped.status == "preempted"
    scaler = load_latest(run.checkpoints).state["scaler"]
    assert scaler["scale"] == 2.0**15  # 2**16 halved once, by the skipped step 8
    assert _fit(run, ToyTask(nan_at=(8, 8, None)), amp="fp16", max_steps=14).status == "completed"
    _assert_same_training(ref, run)
    a, b = load_latest(ref.checkpoints).state, load_latest(run.checkpoints).state
    assert a["scaler"] == b["scaler"] and not tree_differences(a["optimizer"], b["optimizer"])
    assert _metrics(ref) == _metrics(run)


def test_progress_plain_lines_when_not_a_tty():
    out = io.StringIO()
    progress = TrainProgress(100, 0, "seg/a", mode="auto", stream=out)
    assert progress.mode == "plain"
    progress.update(50, loss=0.25, samples_per_s=123.4)
    progress.message("resumed")
    progress.close()
    lines = out.getvalue().splitlines()
    assert "seg/a step 50/100 (50.0%) loss 0.25 123.4 samples/s eta" in lines[0]
    assert lines[1].endswith("resumed")

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    bar = TrainProgress(10, 0, "seg/a", mode="auto", stream=FakeTTY())
    assert bar.mode == "bar"
    bar.update(5, loss=1.0, samples_per_s=10.0)
    bar.close()
    assert TrainProgress(10, enabled=False).mode == "off"


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.metrics_path.write_text(
        '{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 3}\n{"step": 4, "lo'
    )
    assert run.truncate_metrics(2) == 2
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    assert run.metrics_path.read_text().endswith("\n")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_nan_step_is_skipped_and_the_run_goes_on(tmp_path, caplog, num_workers):
    """One NaN loss (step 8): its optimizer step is skipped (weights unchanged, no NaN spreads
    through AdamW and clipping), its line says so, and the run completes with finite weights."""
    run = RunDir(tmp_path / "toy" / "nan-once")
    with caplog.at_level("WARNING", logger="hpcvp.train"):
        result = _fit(run, ToyTask(nan_at=(8, 8, None)), num_workers=num_workers)
    assert (result.status, result.step) == ("completed", 20)
    rows = {r["step"]: r for r in run.read_metrics()}
    assert rows[8].get("skipped_steps") == 1 and "loss" not in rows[8]
    assert all("skipped_steps" not in r for step, r in rows.items() if step != 8)
    assert all(math.isfinite(r["loss"]) for step, r in rows.items() if step != 8)
    assert "step 8: gradients are not finite" in caplog.text
    state = load_latest(run.checkpoints).state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_run_with_a_skipped_step_resumes_exactly_with_workers(tmp_path):
    """NaN at step 8 (skipped), SIGTERM at step 10, resumed, 2 DataLoader workers: the same
    weights, optimizer state and metrics lines as the uninterrupted run with the same NaN."""
    ref = RunDir(tmp_path / "toy" / "skip-ref")
    _fit(ref, ToyTask(nan_at=(8, 8, None)), num_workers=2)
    run = RunDir(tmp_path / "toy" / "skip-resumed")
    stopped = _fit(run, ToyTask(nan_at=(8, 8, None), signal_at={10: (None, 15)}), num_workers=2)
    assert (stopped.status, stopped.step) == ("preempted", 10)
    assert _fit(run, ToyTask(nan_at=(8, 8, None)), num_workers=2).status == "completed"
    _assert_same_training(ref, run)
    assert {r["step"]: r.get("skipped_steps") for r in run.read_metrics()}[8] == 1


@pytest.mark.parametrize("log_every", [1, 5])
def test_a_loss_that_stays_nan_stops_the_run_without_saving_broken_weights(tmp_path, log_every):
    """NaN from step 8 on: steps 8-12 are skipped, and the fifth in a row stops the run with an
    error naming the run, the step and the way out. The save at step 9 holds unbroken weights."""
    run = RunDir(tmp_path / "toy" / "nan")
    with pytest.raises(NonFiniteLossError) as caught:
        _fit(run, ToyTask(nan_at=(8, 10_000, None)), log_every=log_every, save_every_steps=3)
    message = str(caught.value)
    assert "step 12:" in message and "5 steps in a row" in message
    assert str(run.path) in message and "train.amp=off" in message
    assert latest_step(run) == 9
    state = load_latest(run.checkpoints).state
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_nan_loss_with_nonfinite_warn_trains_on(tmp_path):
    run = RunDir(tmp_path / "toy" / "nan-warn")
    result = _fit(run, ToyTask(nan_at=(8, 10_000, None)), nonfinite_loss="warn")
    assert (result.status, result.step) == ("completed", 20)
    assert sum(r.get("skipped_steps", 0) for r in run.read_metrics()) == 13
