"""Every stage runs through the worker entry point and the training engine on tiny synthetic shards
(40x60): seg -> pseudo-label -> simvp (masks on true+pseudo masks, frames) -> raft -> slot (and its
masks exported by pseudo-label) -> predict; plus 2 gloo ranks through the worker CLI (torchrun-style
environment) and preemption."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcvp.data.datasets import ClipDataset, FrameDataset
from hpcvp.data.layout import NUM_CLASSES
from hpcvp.data.manifest import load_manifest
from hpcvp.stages.worker import run_worker
from hpcvp.train.signals import EXIT_REQUEUE

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(synthetic_packed, tmp_path_factory) -> Path:
    # pseudo-labelling writes into the dataset dir: work on a private copy
    target = tmp_path_factory.mktemp("stage-data") / "packed"
    shutil.copytree(synthetic_packed, target)
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def work(data_dir: Path, run_dir: Path, stage: str, *overrides: str) -> int:
    argv = ["--stage", stage, "--data", str(data_dir), "--run-dir", str(run_dir), "--preset", "tiny"]
    for item in overrides:
        argv += ["--set", item]
    return run_worker(argv)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def pictures(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "pictures").glob("*.png"))


@pytest.fixture(scope="module")
def seg_run(data_dir, runs) -> Path:
    run_dir = runs / "seg" / "default"
    assert work(data_dir, run_dir, "seg", "train.max_steps=6", "train.log_every=2", "eval_max_frames=16") == 0
    return run_dir


@pytest.fixture(scope="module")
def pseudo_labelled(data_dir, runs, seg_run) -> Path:
    assert work(data_dir, runs / "pseudo-label" / "default", "pseudo-label", f"seg_run={seg_run}") == 0
    return data_dir


@pytest.fixture(scope="module")
def simvp_masks_run(pseudo_labelled, runs) -> Path:
    run_dir = runs / "simvp" / "masks"
    code = work(
        pseudo_labelled,
        run_dir,
        "simvp",
        "mode=masks",
        "train_splits=train,unlabeled",
        "mask_source=any",
        "loss=ce+lovasz",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.log_every=1",
        "eval_max_videos=2",
    )
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def simvp_frames_run(data_dir, runs) -> Path:
    run_dir = runs / "simvp" / "frames"
    code = work(
        data_dir, run_dir, "simvp", "mode=frames", "train.max_steps=3", "train.batch_size=2", "eval_max_videos=2"
    )
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def raft_run(data_dir, runs) -> Path:
    run_dir = runs / "raft" / "default"
    code = work(
        data_dir, run_dir, "raft", "train.max_steps=2", "train.batch_size=1", "train_splits=train", "eval_max_pairs=2"
    )
    assert code == 0
    return run_dir


def test_seg_trains_and_evaluates(seg_run):
    lines = metrics(seg_run)
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert 0.0 <= lines[-1]["val_jaccard"] <= 1.0
    assert all(np.isfinite(line["loss"]) for line in lines)
    assert pictures(seg_run) == ["curves.png", "step0000006_seg_val.png"]
    stage_config = json.loads((seg_run / "stage_config.json").read_text())
    assert stage_config["stage"] == "seg" and stage_config["data"]["frame_size"] == [40, 60]
    assert stage_config["config"]["train"]["max_steps"] == 6


def test_pseudo_label_writes_mask_shards_matching_the_unet(pseudo_labelled, seg_run):
    from hpcvp.stages.runs import load_model_from_run
    from hpcvp.stages.seg import segment_frames

    manifest = load_manifest(pseudo_labelled)
    labelled = {entry.split for entry in manifest.pseudo_masks}
    assert labelled == {"unlabeled", "hidden"}
    clips = ClipDataset(pseudo_labelled, "unlabeled", frames=True, masks=True, mask_source="pseudo")
    assert len(clips) == len(manifest.video_ids("unlabeled"))
    model, _, _ = load_model_from_run(seg_run, "seg", torch.device("cpu"))
    for index in (0, len(clips) - 1):
        item = clips[index]
        frames = torch.cat([item["frames_in"], item["frames_out"]])
        masks = torch.cat([item["masks_in"], item["masks_out"]])
        assert masks.dtype == torch.uint8 and int(masks.max()) < NUM_CLASSES
        assert torch.equal(masks, segment_frames(model, frames, "off"))
    # a second run with the same checkpoint does nothing
    before = (pseudo_labelled / "manifest.json").read_text()
    assert (
        work(pseudo_labelled, seg_run.parent.parent / "pseudo-label" / "again", "pseudo-label", f"seg_run={seg_run}")
        == 0
    )
    assert (pseudo_labelled / "manifest.json").read_text() == before


def test_simvp_masks_trains_on_true_and_pseudo_masks(simvp_masks_run):
    lines = metrics(simvp_masks_run)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert {"ce", "lovasz", "val_jaccard_true_inputs", "val_jaccard_copy_last"} <= set(lines[-1])
    assert pictures(simvp_masks_run) == ["curves.png", "step0000003_simvp_masks_val.png"]


def test_simvp_frames_trains(simvp_frames_run):
    last = metrics(simvp_frames_run)[-1]
    assert last["step"] == 3 and last["val_mse"] > 0 and last["val_mse_copy_last"] > 0
    assert pictures(simvp_frames_run) == ["curves.png", "step0000003_simvp_frames_val.png"]


def test_raft_trains_self_supervised_and_loads_a_saved_state_dict(raft_run, data_dir, tmp_path):
    last = metrics(raft_run)[-1]
    assert last["step"] == 2
    assert {"photometric", "smoothness", "val_warp_jaccard", "val_copy_jaccard"} <= set(last)
    # the synthetic val set has ground-truth flow: RAFT's end-point error beside zero flow's
    assert {"val_epe", "val_epe_zero", "val_epe_obj", "val_epe_obj_zero"} <= set(last)
    assert last["val_epe_zero"] > 0 and last["val_epe_obj_zero"] >= last["val_epe_zero"]
    assert pictures(raft_run) == ["curves.png", "step0000002_raft_val.png"]

    from hpcvp.models.raft import build_raft
    from hpcvp.stages.raft import RaftTask
    from hpcvp.stages.registry import build_config
    from hpcvp.train.dist import single_process_env

    torch.manual_seed(123)
    saved = build_raft("small").state_dict()
    weights = tmp_path / "raft_small.pth"
    torch.save(saved, weights)
    cfg = build_config("raft", "tiny", [f"model.weights_path={weights}"])
    model = RaftTask(cfg, data_dir, single_process_env()).build_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # the input scale is no part of the state dict: torchvision's weight files still load
    cfg = build_config("raft", "tiny", [f"model.weights_path={weights}", "model.input_scale=2"])
    model = RaftTask(cfg, data_dir, single_process_env()).build_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    from hpcvp.models.raft import input_scale

    assert input_scale(model) == 2
    from hpcvp.config_overrides import ConfigError

    # nor does raft_small's convex upsampler need weights from the file (it starts as bilinear)
    cfg = build_config("raft", "tiny", [f"model.weights_path={weights}", "model.upsample=convex"])
    model = RaftTask(cfg, data_dir, single_process_env()).build_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.mask_predictor is not None
    with pytest.raises(ConfigError, match="model.upsample"):
        build_config("raft", "tiny", ["model.upsample=nearest"])


def test_slot_trains_and_names_slots(data_dir, runs, seg_run):
    run_dir = runs / "slot" / "default"
    code = work(data_dir, run_dir, "slot", "train.max_steps=3", f"seg_run={seg_run}", "eval_max_frames=8")
    assert code == 0
    last = metrics(run_dir)[-1]
    assert -1.0 <= last["val_fg_ari"] <= 1.0
    assert {"val_slot_jaccard_true_labels", "val_slot_jaccard_unet_labels", "val_mse"} <= set(last)
    assert pictures(run_dir) == ["curves.png", "step0000003_slot_val.png"]


@pytest.fixture(scope="module")
def slot_run(data_dir, runs) -> Path:
    run_dir = runs / "slot" / "export"
    assert work(data_dir, run_dir, "slot", "train.max_steps=2", "seg_run=", "eval_max_frames=4", "num_pictures=0") == 0
    return run_dir


def test_pseudo_label_exports_slot_masks_named_by_the_unet(data_dir, seg_run, slot_run, tmp_path):
    from hpcvp.data.datasets import frames_to_float
    from hpcvp.stages.runs import load_model_from_run
    from hpcvp.stages.seg import segment_frames
    from hpcvp.stages.slot import label_slots, seeded_slots

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    # U-Net masks first: slot masks carry another run label, so they are not "already labelled"
    assert work(copy, tmp_path / "pl-unet", "pseudo-label", f"seg_run={seg_run}", "overwrite=true") == 0
    unet_labels = {entry.run for entry in load_manifest(copy).pseudo_masks}
    assert work(copy, tmp_path / "pl-slot", "pseudo-label", f"seg_run={seg_run}", f"slot_run={slot_run}") == 0
    manifest = load_manifest(copy)
    slot_labels = {entry.run for entry in manifest.pseudo_masks}
    assert len(slot_labels) == 1 and not slot_labels & unet_labels  # superseded the U-Net's masks
    assert "slot" in next(iter(slot_labels)) and "step2" in next(iter(slot_labels))
    assert {entry.split for entry in manifest.pseudo_masks} == {"unlabeled", "hidden"}
    summary = json.loads((tmp_path / "pl-slot" / "pseudo_label.json").read_text())
    assert summary["slot_run"] == str(slot_run) and summary["slot_step"] == 2
    assert (tmp_path / "pl-slot" / "pictures" / "pseudo_unlabeled.png").is_file()

    device = torch.device("cpu")
    unet, _, _ = load_model_from_run(seg_run, "seg", device)
    slots, slot_cfg, _ = load_model_from_run(slot_run, "slot", device)
    num_slots = slot_cfg.model.num_slots
    for split in ("unlabeled", "hidden"):
        stored = FrameDataset(copy, split, mask_source="pseudo", masks=True)
        assert len(stored) == len(manifest.video_ids(split)) * stored.num_frames
        for index in range(len(stored)):
            assert len(torch.unique(stored[index]["mask"])) <= num_slots
        unet_differs = False
        for index in (0, 7, len(stored) - 1):
            item = stored[index]
            frame = item["frame"][None]
            init = seeded_slots(slots, [item["video_id"]], stored.num_frames, device)[item["t"] : item["t"] + 1]
            with torch.no_grad():
                slot_ids = slots(frames_to_float(frame), init)["masks"][:, :, 0].argmax(dim=1)
            unet_mask = segment_frames(unet, frame, "off")
            expected = label_slots(slot_ids, unet_mask, num_slots)[0].to(torch.uint8)
            assert torch.equal(item["mask"], expected), (split, index)
            unet_differs |= not torch.equal(item["mask"], unet_mask[0])
        assert unet_differs  # slot masks were stored, not the U-Net's

    # the same slot and seg checkpoints again: nothing to do
    before = (copy / "manifest.json").read_text()
    assert work(copy, tmp_path / "pl-again", "pseudo-label", f"seg_run={seg_run}", f"slot_run={slot_run}") == 0
    assert (copy / "manifest.json").read_text() == before


def test_pseudo_label_and_evaluation_print_timestamped_progress(data_dir, seg_run, tmp_path, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    capsys.readouterr()
    assert work(copy, tmp_path / "pl", "pseudo-label", f"seg_run={seg_run}", "overwrite=true") == 0
    out = capsys.readouterr().out
    for split in ("unlabeled", "hidden"):
        assert re.search(rf"^\[\d\d:\d\d:\d\d\] pseudo-label {split}: (\d+)/\1 videos \(100%\)", out, re.M), out
    # the engine's evaluations: a start and an end line, and the stage's loader progress between
    assert work(copy, tmp_path / "seg", "seg", "train.max_steps=2", "train.log_every=1", "eval_max_frames=8") == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[[\d-]+ [\d:]+\] evaluation at step 2$", out, re.M), out
    assert re.search(r"^\[\d\d:\d\d:\d\d\] evaluate: 8/8 samples \(100%\)", out, re.M), out
    assert re.search(r"^\[[\d-]+ [\d:]+\] evaluation at step 2 done in [\d.]+s: .*val", out, re.M), out


def test_pseudo_label_refuses_a_missing_or_wrong_slot_run(data_dir, seg_run, tmp_path, capsys):
    # The worker turns these user errors into one "error: ..." line and exit status 2.
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    before = (copy / "manifest.json").read_text()
    absent = tmp_path / "no-such-slot-run"
    assert work(copy, tmp_path / "pl", "pseudo-label", f"seg_run={seg_run}", f"slot_run={absent}") == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: slot_run: {re.escape(str(absent))}: run dir not found", err, re.M), err
    assert "Traceback" not in err
    assert work(copy, tmp_path / "pl", "pseudo-label", f"seg_run={seg_run}", f"slot_run={seg_run}") == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: slot_run: .*run dir is of stage 'seg', expected slot", err, re.M), err
    assert (copy / "manifest.json").read_text() == before
    assert not (tmp_path / "pl" / "parts").exists()


def test_predict_writes_submission_and_table(data_dir, runs, seg_run, simvp_masks_run, simvp_frames_run, raft_run):
    run_dir = runs / "predict" / "default"
    code = work(
        data_dir,
        run_dir,
        "predict",
        f"seg_run={seg_run}",
        f"simvp_masks_run={simvp_masks_run}",
        f"simvp_frames_run={simvp_frames_run}",
        f"raft_run={raft_run}",
        "submission_pipeline=a",
    )
    assert code == 0
    submission = torch.load(run_dir / "submission.pt", weights_only=True)
    hidden_ids = sorted(load_manifest(data_dir).video_ids("hidden"))
    assert submission.dtype == torch.uint8
    assert submission.shape == (len(hidden_ids), 40, 60)
    assert int(submission.max()) <= NUM_CLASSES - 1
    ids = json.loads((run_dir / "submission_ids.json").read_text())
    assert ids["video_ids"] == hidden_ids and ids["pipeline"] == "a"
    report = json.loads((run_dir / "jaccard.json").read_text())
    assert set(report["scores"]) == {"a", "b", "c", "d", "e", "a*", "c*"}
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    table = (run_dir / "jaccard.md").read_text()
    assert "| (a) |" in table and "| (e) |" in table
    assert (run_dir / "pictures" / "predict_val.png").is_file()


def test_predict_skips_pipelines_without_runs(data_dir, runs, seg_run, capsys):
    run_dir = runs / "predict" / "partial"
    code = work(
        data_dir,
        run_dir,
        "predict",
        f"seg_run={seg_run}",
        f"simvp_masks_run={runs / 'absent'}",
        f"simvp_frames_run={runs / 'absent'}",
        f"raft_run={runs / 'absent'}",
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert "pipeline (a)" in err and "skipped" in err and "absent" in err
    # progress lines in a log (stdout is no terminal here): timestamped, one per phase at least
    assert re.search(r"^\[\d\d:\d\d:\d\d\] predict: score val: (\d+)/\1 videos \(100%\)", out, re.M), out
    assert re.search(r"^\[\d\d:\d\d:\d\d\] predict: hidden \(e\): (\d+)/\1 videos \(100%\)", out, re.M), out
    report = json.loads((run_dir / "jaccard.json").read_text())
    assert set(report["scores"]) == {"d", "e"}
    assert report["submission_pipeline"] == "e"  # the only deployable one left
    assert torch.load(run_dir / "submission.pt", weights_only=True).dtype == torch.uint8


# ---------------------------------------------------------------------------------------------
# subprocesses: two gloo ranks, preemption


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _launch_two_ranks(argv: list[str], log_dir: Path) -> list[tuple[subprocess.Popen, Path]]:
    port = str(_free_port())
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        env = _worker_env(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        log = log_dir / f"rank{rank}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hpcvp.stages.worker", *argv],
                env=env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append((proc, log))
    return procs


def _wait_all(procs: list[tuple[subprocess.Popen, Path]], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL: the worker catches SIGTERM as a preemption signal
                proc.wait()
    for rank, (proc, log) in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{log.read_text()}"


def test_two_gloo_ranks_train_and_pseudo_label_through_the_worker_cli(pseudo_labelled, seg_run, runs, tmp_path):
    run_dir = runs / "seg" / "ddp"
    procs = _launch_two_ranks(
        [
            "--stage",
            "seg",
            "--data",
            str(pseudo_labelled),
            "--run-dir",
            str(run_dir),
            "--preset",
            "tiny",
            "--set",
            "train.max_steps=3",
            "--set",
            "train.batch_size=4",
            "--set",
            "eval_max_frames=9",
        ],
        tmp_path / "logs-seg",
    )
    _wait_all(procs)
    last = metrics(run_dir)[-1]
    assert last["step"] == 3 and "val_jaccard" in last
    assert json.loads((run_dir / "config.json").read_text())["engine"]["world_size"] == 2

    # pseudo-labelling split over two ranks must store exactly what one rank stores
    copy = tmp_path / "data"
    shutil.copytree(pseudo_labelled, copy)
    procs = _launch_two_ranks(
        [
            "--stage",
            "pseudo-label",
            "--data",
            str(copy),
            "--run-dir",
            str(tmp_path / "pl"),
            "--preset",
            "tiny",
            "--set",
            f"seg_run={seg_run}",
            "--set",
            "overwrite=true",
            "--set",
            "videos_per_batch=1",
        ],
        tmp_path / "logs-pseudo",
    )
    _wait_all(procs)
    for split in ("unlabeled", "hidden"):
        one = FrameDataset(pseudo_labelled, split, mask_source="pseudo", masks=True)
        two = FrameDataset(copy, split, mask_source="pseudo", masks=True)
        assert len(one) == len(two)
        for index in range(0, len(one), 5):
            assert one[index]["video_id"] == two[index]["video_id"]
            assert torch.equal(one[index]["mask"], two[index]["mask"])
    assert not (tmp_path / "pl" / "parts").exists()


def test_preempted_worker_exits_requeue_and_resumes(data_dir, tmp_path):
    run_dir = tmp_path / "seg-preempt"
    argv = [
        sys.executable,
        "-m",
        "hpcvp.stages.worker",
        "--stage",
        "seg",
        "--data",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--preset",
        "tiny",
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.log_every=1",
        "--set",
        "train.save_every_steps=0",
        "--set",
        "train.batch_size=2",
    ]
    proc = subprocess.Popen(
        argv, env=_worker_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, out
    saved = metrics(run_dir)[-1]["step"]
    from hpcvp.train.checkpoint import latest_step

    assert latest_step(run_dir) == saved
    code = work(
        data_dir,
        run_dir,
        "seg",
        f"train.max_steps={saved + 2}",
        "train.log_every=1",
        "train.save_every_steps=0",
        "train.batch_size=2",
    )
    assert code == 0
    assert [line["step"] for line in metrics(run_dir)][-3:] == [saved, saved + 1, saved + 2]


def test_worker_stage_local_reads_a_verified_copy(data_dir, tmp_path, monkeypatch, capsys):
    local = tmp_path / "node-local"
    local.mkdir()
    monkeypatch.setenv("SLURM_TMPDIR", str(local))
    run_dir = tmp_path / "seg-local"
    argv = [
        "--stage",
        "seg",
        "--data",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--preset",
        "tiny",
        "--stage-local",
        "--set",
        "train.max_steps=2",
        "--set",
        "eval_max_frames=4",
    ]
    assert run_worker(argv) == 0
    copies = [p for p in (local / "hpcvp-data").iterdir() if not p.name.startswith(".")]  # (+ a lock file)
    assert len(copies) == 1 and (copies[0] / "manifest.json").exists()
    said = capsys.readouterr().err
    assert f"data {copies[0]}" in said  # trained from the node-local copy
    # the run records the shared location, so later stages and resumes find the data there
    assert json.loads((run_dir / "stage_config.json").read_text())["data"]["data_dir"] == str(data_dir)
