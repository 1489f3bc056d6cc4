"""Issue 10 for the data layer, with real HDF5 and real processes: one packer per --out, releases
numbered differently, odd input listed instead of dropped, one-line errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_SIZE

from hpcvp.data import (
    IncompleteSplitError,
    load_manifest,
    missing_hidden_ids,
    pack_dataset,
    require_complete_split,
    verify_dataset,
)
from hpcvp.data.datasets import HiddenDataset
from hpcvp.data.layout import RawDataError
from hpcvp.data.pack_cli import main as pack_main


def _packer(raw: Path, out: Path, job_id: str) -> subprocess.Popen:
    env = dict(os.environ, SLURM_JOB_ID=job_id)
    env.pop("SLURM_ARRAY_TASK_ID", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(REPO_ROOT / "tools" / "pack_hdf5.py"), "--src", str(raw), "--out", str(out)]
    command += ["--shard-size", "2", "--workers", "0", "--frame-size", f"{TINY_SIZE[0]}x{TINY_SIZE[1]}"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _feed_fifo(fifo: Path, data: bytes, timeout_s: float) -> None:
    """Write ``data`` into ``fifo`` once a reader has it open (the packer holding the lock)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as error:
            if error.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    os.set_blocking(fd, True)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_two_packers_started_together_one_refuses_naming_the_holder_the_other_verifies(tiny_raw, tmp_path):
    raw = tiny_raw({"train": [0, 1, 2], "val": [1000], "hidden": [15000, 15001]})
    # The packer that takes the lock blocks on this FIFO (a frame of its last video) until the
    # other one has been turned away, so the two overlap whatever the machine's load.
    blocker = raw / "hidden" / "video_15001" / "image_3.png"
    original = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "out"
    first, second = _packer(raw, out, "111"), _packer(raw, out, "222")
    packers = {first.pid: (first, "111"), second.pid: (second, "222")}
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in (first, second)):
            assert time.monotonic() < deadline, "neither packer finished or refused"
            time.sleep(0.05)
        refused = first if first.poll() is not None else second
        holder = second if refused is first else first
        refused_err = refused.stderr.read()
        assert refused.returncode == 3, refused_err
        lines = refused_err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in refused_err, refused_err
        holder_job = packers[holder.pid][1]
        assert str(out) in lines[0] and "another packer" in lines[0]
        assert f"pid {holder.pid}" in lines[0] and f"Slurm job {holder_job}" in lines[0]
        assert "host " in lines[0]
        _feed_fifo(blocker, original, 60)
        _, holder_err = holder.communicate(timeout=120)
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert holder.returncode == 0, holder_err
    assert "Traceback" not in holder_err
    manifest = load_manifest(out)
    assert manifest.video_ids("hidden") == [15000, 15001] and manifest.video_ids("train") == [0, 1, 2]
    assert verify_dataset(out).ok
    assert pack_main(["--verify", str(out), "--quiet"]) == 0
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_a_release_with_other_ids_and_zero_padding_packs_with_hidden_ordered_by_id(tiny_raw, tmp_path):
    raw = tiny_raw({"train": [3000, 7], "val": [12], "hidden": [1370, 12, 15000]}, padding=5)
    assert (raw / "hidden" / "video_01370").is_dir()
    out = tmp_path / "out"
    manifest = pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert manifest.video_ids("hidden") == [12, 1370, 15000]
    assert manifest.video_ids("train") == [7, 3000] and manifest.video_ids("val") == [12]
    assert [HiddenDataset(out)[i]["video_id"] for i in range(3)] == [12, 1370, 15000]
    assert verify_dataset(out).ok


def test_duplicate_ids_within_a_split_are_refused_naming_both_folders(tiny_raw, tmp_path, capsys):
    raw = tiny_raw({"hidden": [1370]}, padding=5)
    tiny_raw({"hidden": [1370]}, padding=0)  # video_1370 next to video_01370
    out = tmp_path / "out"
    code = pack_main(["--src", str(raw), "--out", str(out), "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(raw / "hidden" / "video_01370") in err and str(raw / "hidden" / "video_1370") in err
    assert not (out / "manifest.json").exists()
    with pytest.raises(RawDataError, match="also appears"):
        pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    # the same id in two splits is two videos: the split is the folder
    shutil.rmtree(raw / "hidden" / "video_1370")
    tiny_raw({"train": [1370]})
    manifest = pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert manifest.video_ids("train") == [1370] and manifest.video_ids("hidden") == [1370]


def test_misnamed_folders_and_empty_splits_are_warned_and_listed_in_the_manifest(tiny_raw, tmp_path, capsys):
    raw = tiny_raw({"train": [0, 1], "hidden": [15000]})
    (raw / "hidden" / "video-15001").mkdir()  # a typo: this video would vanish silently
    (raw / "val").mkdir()
    out = tmp_path / "out"
    manifest = pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    err = capsys.readouterr().err
    assert f"warning: {raw / 'hidden' / 'video-15001'}: not named video_<digits>" in err
    assert f"warning: {raw / 'val'}: empty split folder" in err
    listed = [(entry.split, entry.path, entry.reason) for entry in load_manifest(out).ignored]
    assert listed == [
        ("val", str(raw / "val"), "empty split folder (no video_<digits> folders)"),
        ("hidden", str(raw / "hidden" / "video-15001"), "not named video_<digits>"),
    ]
    assert manifest.totals()["ignored_entries"] == 2
    assert json.loads((out / "manifest.json").read_text())["ignored"][1]["path"].endswith("video-15001")
    # re-packing only train keeps the other splits' records
    pack_dataset(raw, out, splits=["train"], frame_size=TINY_SIZE, workers=0, quiet=True)
    assert len(load_manifest(out).ignored) == 2


def test_skipped_hidden_videos_are_recorded_so_predict_can_refuse_a_short_submission(tiny_raw, tmp_path):
    raw = tiny_raw({"val": [1000], "hidden": [15000, 15001, 15002]})
    (raw / "hidden" / "video_15001" / "image_4.png").unlink()
    out = tmp_path / "out"
    manifest = pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, on_error="skip", quiet=True)
    assert manifest.video_ids("hidden") == [15000, 15002]
    reloaded = load_manifest(out)
    assert missing_hidden_ids(reloaded) == [15001] and missing_hidden_ids(reloaded, "val") == []
    with pytest.raises(IncompleteSplitError, match=r"had 1 video\(s\) that were skipped.*ids 15001") as caught:
        require_complete_split(reloaded, "hidden")
    assert str(out / "manifest.json") in str(caught.value)
    require_complete_split(reloaded, "val")  # complete: no error


def test_user_errors_end_in_one_line_naming_the_file_or_flag(tiny_raw, tmp_path, capsys):
    raw = tiny_raw({"train": [0]})
    cases = [
        (["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")], str(tmp_path / "nowhere")),
        (["--verify", str(tmp_path / "nothing-packed")], str(tmp_path / "nothing-packed")),
        (["--src", str(raw), "--out", str(tmp_path / "o2"), "--compression", "zstd"], "zstd"),
    ]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases.append((["--src", str(raw), "--out", str(a_file / "out")], str(a_file)))
    for argv, named in cases:
        code = pack_main([*argv, "--workers", "0", "--quiet"] if "--src" in argv else argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and named in err and "Traceback" not in err, (argv, err)


# --------------------------------------------------------------------------------------------
# ... and predicts: a submission over a renumbered release, and one-line refusals.


def _worker(data: Path, run_dir: Path, stage: str, *overrides: str) -> list[str]:
    argv = ["--stage", stage, "--data", str(data), "--run-dir", str(run_dir), "--preset", "tiny"]
    for item in overrides:
        argv += ["--set", item]
    return argv


def _predict_overrides(seg_run: Path, absent: Path) -> list[str]:
    # Only the U-Net (pipeline e) is trained here; the other pipelines' runs are absent.
    return [
        f"seg_run={seg_run}",
        f"simvp_masks_run={absent}",
        f"simvp_frames_run={absent}",
        f"raft_run={absent}",
        "submission_pipeline=e",
        "eval_max_videos=1",
    ]


@pytest.fixture(scope="module")
def renumbered(tmp_path_factory):
    """(raw, packed, seg run): a release with hidden ids below 15000 and zero-padded names, and a
    one-step U-Net trained on it."""
    from conftest import write_tiny_video

    from hpcvp.stages.worker import run_worker

    root = tmp_path_factory.mktemp("renumbered")
    raw = root / "raw"
    for split, ids in {"train": [3000, 7], "val": [12], "hidden": [1370, 12, 15000]}.items():
        for video_id in ids:
            write_tiny_video(raw, split, video_id, padding=5)
    packed = root / "packed"
    pack_dataset(raw, packed, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    seg_run = root / "runs" / "seg"
    settings = ["train.max_steps=1", "train.batch_size=2", "eval_max_frames=2", "num_pictures=1"]
    assert run_worker(_worker(packed, seg_run, "seg", *settings)) == 0
    return raw, packed, seg_run


def test_a_renumbered_release_predicts_a_submission_ordered_by_hidden_id(renumbered, tmp_path, monkeypatch):
    import torch

    import hpcvp.stages.predict as predict
    from hpcvp.stages.worker import run_worker

    # A one-step U-Net paints every noise frame in one class, which would hide the order of the
    # rows: give each mask a fingerprint of the frame it was computed from instead.
    def fingerprint(model, frames, amp, chunk=64):
        return (frames[..., 0] % 49).to(torch.uint8)

    monkeypatch.setattr(predict, "segment_frames", fingerprint)
    _, packed, seg_run = renumbered
    run_dir = tmp_path / "predict"
    assert run_worker(_worker(packed, run_dir, "predict", *_predict_overrides(seg_run, tmp_path / "absent"))) == 0
    ids = json.loads((run_dir / "submission_ids.json").read_text())
    assert ids["video_ids"] == [12, 1370, 15000] and ids["pipeline"] == "e"
    submission = torch.load(run_dir / "submission.pt", weights_only=True)
    assert submission.shape == (3, *TINY_SIZE) and submission.dtype == torch.uint8
    # Row i comes from frame 11 of video ids[i], whatever the folders were named.
    hidden = HiddenDataset(packed)
    by_id = {hidden[i]["video_id"]: hidden[i]["frames_in"][10] for i in range(len(hidden))}
    expected = torch.stack([fingerprint(None, by_id[v], "off") for v in ids["video_ids"]])
    assert torch.equal(submission, expected)


def test_predict_refuses_in_one_line_a_submission_lacking_a_skipped_hidden_video(renumbered, tmp_path):
    raw, _, seg_run = renumbered
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "hidden" / "video_01370" / "image_3.png").write_bytes(b"not a png")
    packed = tmp_path / "packed"
    manifest = pack_dataset(broken, packed, frame_size=TINY_SIZE, workers=0, on_error="skip", quiet=True)
    assert manifest.video_ids("hidden") == [12, 15000]
    run_dir = tmp_path / "predict"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    argv = _worker(packed, run_dir, "predict", *_predict_overrides(seg_run, tmp_path / "absent"))
    done = subprocess.run(
        [sys.executable, "-m", "hpcvp.stages.worker", *argv], env=env, capture_output=True, text=True, timeout=600
    )
    err = done.stderr.strip()
    assert done.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "ids 1370" in last and str(packed / "manifest.json") in last, last
    assert not (run_dir / "submission.pt").exists()


def test_worker_user_errors_end_in_one_line_naming_the_file_or_run(renumbered, tmp_path, capsys):
    from hpcvp.stages.worker import run_worker

    _, packed, seg_run = renumbered
    cases = [
        # no manifest where --data points
        (_worker(tmp_path / "nothing", tmp_path / "r1", "seg"), str(tmp_path / "nothing")),
        # predict before its seg run exists
        (_worker(packed, tmp_path / "r2", "predict", f"seg_run={tmp_path / 'no-seg'}"), str(tmp_path / "no-seg")),
        # resuming a run with another model size than its checkpoint was trained with
        (_worker(packed, seg_run, "seg", "train.max_steps=2", "model.width=16"), str(seg_run)),
    ]
    for argv, named in cases:
        code = run_worker(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err[-2000:])
        assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), (argv, err[-2000:])
        assert named in err.splitlines()[-1], (argv, err[-2000:])
