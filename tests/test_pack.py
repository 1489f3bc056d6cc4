"""Packing into shards: format, manifest, bad input, skip mode, verify, resume after SIGKILL
(byte for byte), pseudo-mask shards and staging."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO_ROOT, TINY_SIZE, tiny_video_arrays, write_tiny_video
from test_layout import BAD_INPUTS

from hpcvp.data import StagingError, add_pseudo_masks, load_manifest, pack_dataset, stage_to_local, verify_dataset
from hpcvp.data.layout import NUM_FRAMES, RawDataError, list_videos, read_video
from hpcvp.data.manifest import FORMAT_VERSION, ManifestError
from hpcvp.data.pack import JOURNAL_NAME, OUTPUT_LOCK_NAME
from hpcvp.data.pack_cli import main as pack_main
from hpcvp.data.shard_files import file_checksum, filtered, open_h5


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: file_checksum(p) for p in sorted(out.glob("*.h5"))}


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


# ----------------------------------------------------------------------------- format and manifest


def test_pack_writes_shards_manifest_and_exact_contents(synthetic_raw, synthetic_packed):
    manifest = load_manifest(synthetic_packed)
    payload = json.loads((synthetic_packed / "manifest.json").read_text())
    assert payload["format"] == "hpcvp-shards" and payload["format_version"] == FORMAT_VERSION
    # frame size comes from the generator's hpcvp_synthetic.json (40x60), not the 160x240 default
    assert manifest.frame_size == TINY_SIZE == tuple(payload["frame_size"])
    assert payload["compression"] == {"frames": "none", "masks": "none"}
    names = [shard.path for shard in manifest.shards]
    assert names == ["train-000.h5", "train-001.h5", "val-000.h5", "unlabeled-000.h5", "hidden-000.h5"]
    assert payload["totals"]["videos"] == 16 and payload["totals"]["shards"] == 5
    assert payload["totals"]["per_split"]["train"] == {
        "videos": 6,
        "shards": 2,
        "bytes": sum(s.bytes for s in manifest.shards_for("train")),
    }
    assert payload["skipped"] == []
    for shard in manifest.shards:
        path = synthetic_packed / shard.path
        assert not Path(shard.path).is_absolute()
        assert shard.bytes == path.stat().st_size and shard.checksum == file_checksum(path)
        raw_videos = dict(list_videos(synthetic_raw, shard.split))
        with h5py.File(path, "r", locking=False) as handle:
            frames = handle["frames"]
            assert frames.dtype == np.uint8 and frames.chunks == (1, 1, *TINY_SIZE, 3)
            assert frames.compression is None
            assert frames.shape == (len(shard.video_ids), shard.num_frames, *TINY_SIZE, 3)
            assert list(handle["video_ids"][:]) == list(shard.video_ids)
            assert ("masks" in handle) == shard.has_masks == (shard.split in ("train", "val"))
            if shard.has_masks:
                assert not filtered(handle["masks"])  # raw by default
                assert handle["masks"].chunks == (1, 1, *TINY_SIZE)
                assert handle["masks"].shape == (len(shard.video_ids), NUM_FRAMES, *TINY_SIZE)
            for row, video_id in enumerate(shard.video_ids):
                raw_frames, raw_masks = read_video(raw_videos[video_id], shard.split, TINY_SIZE)
                np.testing.assert_array_equal(frames[row], raw_frames)
                if shard.has_masks:
                    np.testing.assert_array_equal(handle["masks"][row], raw_masks)


LZ4_FILTER_ID, BLOSC_FILTER_ID = 32004, 32001


@pytest.mark.parametrize(
    "compression, h5_filter, workers",
    [
        ("lzf", 32000, 0),
        ("gzip:1", 1, 0),
        ("lz4", LZ4_FILTER_ID, 0),  # chunks LZ4-compressed by the decoder (hdf5plugin's format)
        ("lz4", LZ4_FILTER_ID, 1),
        ("blosc:lz4:5:bit", BLOSC_FILTER_ID, 0),  # compressed by HDF5's filter in the writer
    ],
)
def test_compression_settings_store_the_same_pixels(tiny_raw, tmp_path, compression, h5_filter, workers):
    raw = tiny_raw({"train": [0, 1]})
    out = tmp_path / "out"
    pack_dataset(
        raw,
        out,
        compression=compression,
        mask_compression=compression,
        frame_size=TINY_SIZE,
        workers=workers,
        quiet=True,
    )
    assert load_manifest(out).compression == {"frames": compression, "masks": compression}
    with open_h5(out / "train-000.h5", "r") as handle:
        for name in ("frames", "masks"):
            assert handle[name].id.get_create_plist().get_filter(0)[0] == h5_filter
        for row in range(2):
            frames, masks = tiny_video_arrays(row, "train")
            np.testing.assert_array_equal(handle["frames"][row], frames)
            np.testing.assert_array_equal(handle["masks"][row], masks)
    with pytest.raises(ValueError, match="unknown compression 'zstd'"):
        pack_dataset(raw, tmp_path / "bad", compression="zstd", workers=0, quiet=True)


def test_both_paddings_pack_and_frame_size_flag(tmp_path):
    raw = tmp_path / "raw"
    write_tiny_video(raw, "val", 1370, padding=5)  # video_01370
    write_tiny_video(raw, "val", 1371)  # video_1371
    write_tiny_video(raw, "unlabeled", 2000)
    write_tiny_video(raw, "unlabeled", 2001, padding=5)
    # no hpcvp_synthetic.json: 160x240 is expected, so the 40x60 frames are refused with a hint...
    with pytest.raises(RawDataError, match=r"video_01370/image_0.png: image is 40x60 \(HxW\), expected 160x240"):
        pack_dataset(raw, tmp_path / "out", workers=0, quiet=True)
    # ...and --frame-size overrides
    assert (
        pack_main(
            ["--src", str(raw), "--out", str(tmp_path / "out"), "--frame-size", "40x60", "--workers", "0", "--quiet"]
        )
        == 0
    )
    manifest = load_manifest(tmp_path / "out")
    assert manifest.video_ids("val") == [1370, 1371] and manifest.video_ids("unlabeled") == [2000, 2001]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_naming_the_file_and_writes_nothing(tmp_path, case, capsys):
    breaker, bad_name, reason = BAD_INPUTS[case]
    raw = tmp_path / "raw"
    for video_id in range(6):
        write_tiny_video(raw, "train", video_id)
    bad_folder = raw / "train" / "video_1"  # in the first shard: nothing may be written at all
    breaker(bad_folder)
    out = tmp_path / "out"
    code = pack_main(
        [
            "--src",
            str(raw),
            "--out",
            str(out),
            "--frame-size",
            "40x60",
            "--shard-size",
            "3",
            "--workers",
            "0",
            "--quiet",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert str(bad_folder / bad_name) in error and reason in error
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not any(
        name.endswith((".h5", ".tmp")) or ".tmp-" in name or name == "manifest.json" for name in leftovers
    ), leftovers


def test_bad_video_in_a_later_shard_leaves_only_complete_shards(tiny_raw, tmp_path):
    raw = tiny_raw({"train": list(range(6))})
    BAD_INPUTS["truncated_png"][0](raw / "train" / "video_4")
    out = tmp_path / "out"
    with pytest.raises(RawDataError, match="video_4/image_5.png"):
        pack_dataset(raw, out, shard_size=3, frame_size=TINY_SIZE, workers=2, quiet=True)
    assert sorted(p.name for p in out.glob("*.h5*")) == ["train-000.h5"]  # complete; train-001 removed
    assert not (out / "manifest.json").exists()


def test_skip_mode_records_bad_videos_and_packs_the_rest(tiny_raw, tmp_path):
    raw = tiny_raw({"train": list(range(5)), "unlabeled": [2000, 2001]})
    BAD_INPUTS["truncated_png"][0](raw / "train" / "video_1")  # found while decoding
    BAD_INPUTS["missing_frame"][0](raw / "train" / "video_3")  # found before decoding
    BAD_INPUTS["mask_value_too_high"][0](raw / "train" / "video_4")
    out = tmp_path / "out"
    assert (
        pack_main(
            [
                "--src",
                str(raw),
                "--out",
                str(out),
                "--frame-size",
                "40x60",
                "--on-error",
                "skip",
                "--shard-size",
                "2",
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    manifest = load_manifest(out)
    assert manifest.video_ids("train") == [0, 2] and manifest.video_ids("unlabeled") == [2000, 2001]
    skipped = {s.video_id: s for s in manifest.skipped}
    assert sorted(skipped) == [1, 3, 4]
    assert skipped[1].path == str(raw / "train" / "video_1" / "image_5.png") and "unreadable PNG" in skipped[1].reason
    assert skipped[3].path == str(raw / "train" / "video_3" / "image_21.png") and skipped[3].reason == "missing frame"
    assert skipped[4].path.endswith("video_4/mask.npy") and "values span 49..49" in skipped[4].reason
    assert json.loads((out / "manifest.json").read_text())["totals"]["skipped_videos"] == 3
    # video 3 was never planned; 1 and 4 dropped out of their shards while decoding
    assert [s.video_ids for s in manifest.shards_for("train")] == [(0,), (2,)]
    assert skipped[1].shard == "train-000.h5" and skipped[4].shard == "train-001.h5" and skipped[3].shard is None
    with h5py.File(out / "train-001.h5", "r", locking=False) as handle:
        assert list(handle["video_ids"][:]) == [2]
        assert handle["frames"].shape[0] == handle["masks"].shape[0] == 1
        np.testing.assert_array_equal(handle["frames"][0], tiny_video_arrays(2, "train")[0])
        np.testing.assert_array_equal(handle["masks"][0], tiny_video_arrays(2, "train")[1])
    assert verify_dataset(out).ok
    # re-running keeps every shard and reproduces the same manifest
    before = (out / "manifest.json").read_bytes()
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, on_error="skip", workers=0, quiet=True)
    assert (out / "manifest.json").read_bytes() == before


# ----------------------------------------------------------------------------- verify


def test_verify_names_a_corrupted_and_a_missing_shard(tiny_raw, tmp_path, capsys):
    raw = tiny_raw({"train": [0, 1, 2], "unlabeled": [2000, 2001]})
    out = tmp_path / "out"
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert pack_main(["--verify", str(out), "--quiet"]) == 0
    corrupted = out / "train-001.h5"
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle, same size
    corrupted.write_bytes(bytes(data))
    (out / "unlabeled-000.h5").unlink()
    capsys.readouterr()
    assert pack_main(["--verify", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"BAD {corrupted}: xxh3_128" in error
    assert f"BAD {out / 'unlabeled-000.h5'}: missing" in error
    assert "train-000.h5" not in error
    report = verify_dataset(out)
    assert [Path(p).name for p, _ in report.bad] == ["train-001.h5", "unlabeled-000.h5"]


def _as_format_1(out: Path) -> None:
    """Rewrite ``out``'s manifest as hpcvp before 2026-12-05 wrote it: format_version 1, each
    entry's sha256 hex digest under "sha256" (no "checksum")."""
    payload = json.loads((out / "manifest.json").read_text())
    payload["format_version"] = 1
    for entry in payload["shards"] + payload["pseudo_masks"]:
        del entry["checksum"]
        entry["sha256"] = hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(payload))


def test_a_format_1_manifest_with_sha256_is_read_verified_staged_and_upgraded(tiny_raw, tmp_path, capsys):
    raw = tiny_raw({"train": [0, 1, 2], "unlabeled": [2000]})
    out = tmp_path / "old"
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert all(s.checksum.startswith("xxh3_128:") and len(s.checksum) == 9 + 32 for s in load_manifest(out).shards)
    _as_format_1(out)
    manifest = load_manifest(out)
    assert manifest.format_version == 1
    assert manifest.shards[0].checksum == "sha256:" + hashlib.sha256((out / "train-000.h5").read_bytes()).hexdigest()
    assert verify_dataset(out).ok
    staged = stage_to_local(out, tmp_path / "node")
    assert shard_hashes(staged) == shard_hashes(out)
    # a pseudo-mask shard added now: the manifest is written as format 2, the old entries keep sha256
    add_pseudo_masks(out, "unlabeled", [2000], np.zeros((1, NUM_FRAMES, *TINY_SIZE), np.uint8), run="seg")
    payload = json.loads((out / "manifest.json").read_text())
    assert payload["format_version"] == FORMAT_VERSION == 2
    assert payload["shards"][0]["checksum"].startswith("sha256:")
    assert payload["pseudo_masks"][0]["checksum"].startswith("xxh3_128:")
    assert verify_dataset(out).ok
    # corruption is found under the old algorithm too, naming it
    data = bytearray((out / "train-001.h5").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "train-001.h5").write_bytes(bytes(data))
    capsys.readouterr()
    assert pack_main(["--verify", str(out), "--quiet"]) == 1
    assert f"BAD {out / 'train-001.h5'}: sha256" in capsys.readouterr().err
    # a version this hpcvp does not know, and a checksum it cannot check, are named
    payload["format_version"] = 3
    (out / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(ManifestError, match="format_version 3 is not supported"):
        load_manifest(out)
    payload["format_version"] = 2
    payload["shards"][0]["checksum"] = "md5:0123"
    (out / "manifest.json").write_text(json.dumps(payload))
    with pytest.raises(ManifestError, match="md5:0123"):
        load_manifest(out)


# ----------------------------------------------------------------------------- resume, reproducibility


def test_rerun_keeps_verified_shards_and_rewrites_a_corrupted_one(tiny_raw, tmp_path):
    raw = tiny_raw({"train": list(range(4)), "hidden": [15000]})
    out = tmp_path / "out"
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    clean = shard_hashes(out)
    inodes = {p.name: p.stat().st_ino for p in out.glob("*.h5")}
    data = bytearray((out / "train-001.h5").read_bytes())
    data[-100] ^= 0x01
    (out / "train-001.h5").write_bytes(bytes(data))
    (out / "train-000.h5.tmp").write_bytes(b"leftover of a crash")  # an older packer's name
    (out / ".train-001.h5.tmp-999999").write_bytes(b"leftover of a killed packer")
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert shard_hashes(out) == clean
    assert (out / "train-000.h5").stat().st_ino == inodes["train-000.h5"]  # kept, not rewritten
    assert (out / "hidden-000.h5").stat().st_ino == inodes["hidden-000.h5"]
    assert not (out / "train-000.h5.tmp").exists() and not (out / JOURNAL_NAME).exists()
    assert not (out / ".train-001.h5.tmp-999999").exists()
    # a different compression is a different pack: everything is rewritten
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, compression="lzf", workers=0, quiet=True)
    assert (out / "train-000.h5").stat().st_ino != inodes["train-000.h5"]
    # fewer videos: shards that are no longer planned are removed
    shutil.rmtree(raw / "train" / "video_3")
    shutil.rmtree(raw / "train" / "video_2")
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert sorted(p.name for p in out.glob("*.h5")) == ["hidden-000.h5", "train-000.h5"]


def test_packing_a_split_later_keeps_the_others(tiny_raw, tmp_path):
    raw = tiny_raw({"train": [0, 1], "unlabeled": [2000]})
    out = tmp_path / "out"
    pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    inodes = {p.name: p.stat().st_ino for p in out.glob("*.h5")}
    write_tiny_video(raw, "hidden", 15000)  # the hidden set arrives late
    pack_dataset(raw, out, splits=["hidden"], frame_size=TINY_SIZE, workers=0, quiet=True)
    manifest = load_manifest(out)
    assert [s.path for s in manifest.shards] == ["train-000.h5", "unlabeled-000.h5", "hidden-000.h5"]
    assert {p.name: p.stat().st_ino for p in out.glob("*.h5") if p.name in inodes} == inodes
    assert verify_dataset(out).ok
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=r"already holds \['train', 'unlabeled'\] packed at 40x60"):
        pack_dataset(raw, out, splits=["hidden"], compression="lzf", frame_size=TINY_SIZE, workers=0, quiet=True)
    assert (out / "manifest.json").read_bytes() == before


def test_pack_is_byte_identical_across_runs_and_worker_counts(tiny_raw, tmp_path):
    raw = tiny_raw({"train": [0, 1, 2], "val": [1000], "unlabeled": [2000, 2001], "hidden": [15000]})
    pack_dataset(raw, tmp_path / "a", shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    time.sleep(1.1)  # HDF5 timestamps have 1 s resolution: any that leaked in would now differ
    pack_dataset(raw, tmp_path / "b", shard_size=2, frame_size=TINY_SIZE, workers=2, quiet=True)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    assert len(shard_hashes(tmp_path / "a")) == 5


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def journaled(out: Path) -> set[str]:
    try:
        return set(json.loads((out / JOURNAL_NAME).read_text())["shards"])
    except (FileNotFoundError, ValueError):
        return set()


def test_pack_killed_mid_way_resumes_byte_identical(tiny_raw, tmp_path):
    """SIGKILL a pack while it writes its third shard, resume, compare with an uninterrupted pack."""
    raw = tiny_raw({"train": list(range(8)), "val": [1000, 1001]})
    (raw / "hpcvp_synthetic.json").write_text(json.dumps({"size": list(TINY_SIZE)}))
    reference = tmp_path / "reference"
    pack_dataset(raw, reference, shard_size=2, workers=0, quiet=True)

    # The pack blocks on a FIFO standing in for frame 3 of video 5 (second video of train-002), so
    # it is killed at a known point: train-000 and train-001 done, train-002 half written.
    blocker = raw / "train" / "video_5" / "image_3.png"
    original = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "out"

    def pack_command(workers: int) -> list[str]:
        """tools/pack_hdf5.py packing ``raw`` into ``out``, 2 videos per shard."""
        args = ["--src", str(raw), "--out", str(out), "--shard-size", "2", "--workers", str(workers)]
        return [sys.executable, str(REPO_ROOT / "tools" / "pack_hdf5.py"), *args]

    process = subprocess.Popen(
        pack_command(workers=2),
        env=subprocess_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(
            lambda: "train-001.h5" in journaled(out) and list(out.glob(".train-002.h5.tmp-*")),
            60,
            "train-001.h5 journaled and train-002.h5's temporary file started",
        )
        time.sleep(0.2)  # the packer is now blocked on the FIFO
        assert process.poll() is None, process.stdout.read().decode()
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the packer and its worker processes
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and (out / JOURNAL_NAME).exists()
    # the killed packer's lock file stays, naming it, but its flock died with it: no blocking below
    assert json.loads((out / OUTPUT_LOCK_NAME).read_text())["pid"] == process.pid
    kept = {name: (out / name).stat().st_ino for name in ("train-000.h5", "train-001.h5")}
    assert file_checksum(out / "train-000.h5") == file_checksum(reference / "train-000.h5")

    blocker.unlink()
    blocker.write_bytes(original)
    result = subprocess.run(
        pack_command(workers=1),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{out / 'train-000.h5'}: complete and verified, kept" in result.stderr
    assert f"{out / 'train-001.h5'}: complete and verified, kept" in result.stderr
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # not rewritten
    assert shard_hashes(out) == shard_hashes(reference)
    assert len(shard_hashes(out)) == 5
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp-*")) and not (out / JOURNAL_NAME).exists()
    assert load_manifest(out).shards == load_manifest(reference).shards
    assert verify_dataset(out).ok


# ----------------------------------------------------------------------------- pseudo masks


def test_pseudo_masks_are_written_listed_verified_and_superseded(tiny_raw, tmp_path):
    raw = tiny_raw({"train": [0, 1], "unlabeled": [2000, 2001, 2002]})
    out = tmp_path / "out"
    pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    rng = np.random.default_rng(0)
    first = rng.integers(0, 49, (3, NUM_FRAMES, *TINY_SIZE), dtype=np.int64)
    entries = add_pseudo_masks(out, "unlabeled", [2000, 2001, 2002], first, run="runs/seg/tiny", shard_size=2)
    assert [e.path for e in entries] == [
        "pseudo-unlabeled-runs_seg_tiny-000.h5",
        "pseudo-unlabeled-runs_seg_tiny-001.h5",
    ]
    manifest = load_manifest(out)
    assert [e.video_ids for e in manifest.pseudo_masks] == [(2000, 2001), (2002,)]
    assert manifest.pseudo_masks[0].run == "runs/seg/tiny"
    with h5py.File(out / entries[1].path, "r", locking=False) as handle:
        np.testing.assert_array_equal(handle["masks"][0], first[2])
    assert verify_dataset(out).ok and len(verify_dataset(out).checked) == 4

    # a later run covering the first file's videos replaces it (file removed); an iterator works too
    second = [rng.integers(0, 49, (NUM_FRAMES, *TINY_SIZE), dtype=np.uint8) for _ in range(2)]
    add_pseudo_masks(out, "unlabeled", [2000, 2001], iter(second), run="runs/seg/tiny")
    manifest = load_manifest(out)
    assert [e.path for e in manifest.pseudo_masks] == [
        "pseudo-unlabeled-runs_seg_tiny-001.h5",
        "pseudo-unlabeled-runs_seg_tiny-002.h5",
    ]
    assert not (out / entries[0].path).exists()
    # re-packing keeps the pseudo masks
    pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert load_manifest(out).pseudo_masks == manifest.pseudo_masks

    with pytest.raises(ValueError, match=r"video ids \[5\] are not packed in split 'unlabeled'"):
        add_pseudo_masks(out, "unlabeled", [5], np.zeros((1, NUM_FRAMES, *TINY_SIZE), np.uint8), run="x")
    with pytest.raises(ValueError, match="values outside 0..48"):
        add_pseudo_masks(out, "unlabeled", [2000], np.full((1, NUM_FRAMES, *TINY_SIZE), 49), run="x")
    with pytest.raises(ValueError, match=r"has shape \(22, 40, 61\)"):
        add_pseudo_masks(out, "unlabeled", [2000], np.zeros((1, NUM_FRAMES, 40, 61), np.uint8), run="x")
    assert not list(out.glob("pseudo-unlabeled-x-*"))  # failed calls leave no file behind
    assert load_manifest(out).pseudo_masks == manifest.pseudo_masks


def _add_pseudo_for_rank(out: str, rank: int) -> None:
    masks = np.full((1, NUM_FRAMES, *TINY_SIZE), rank + 1, np.uint8)
    add_pseudo_masks(out, "unlabeled", [2000 + rank], masks, run=f"rank{rank}")


def test_concurrent_pseudo_mask_writers_both_land(tiny_raw, tmp_path):
    raw = tiny_raw({"unlabeled": [2000, 2001]})
    out = tmp_path / "out"
    pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_add_pseudo_for_rank, args=(str(out), rank)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    manifest = load_manifest(out)
    assert sorted(e.video_ids for e in manifest.pseudo_masks) == [(2000,), (2001,)]
    assert verify_dataset(out).ok


# ----------------------------------------------------------------------------- staging


def test_stage_to_local_copies_checks_and_reuses(tiny_raw, tmp_path, monkeypatch):
    raw = tiny_raw({"train": [0, 1, 2], "unlabeled": [2000]})
    out = tmp_path / "shared" / "packed"
    pack_dataset(raw, out, shard_size=2, frame_size=TINY_SIZE, workers=0, quiet=True)
    add_pseudo_masks(out, "unlabeled", [2000], np.zeros((1, NUM_FRAMES, *TINY_SIZE), np.uint8), run="seg")
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "node"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    staged = stage_to_local(out)
    assert staged.parent == tmp_path / "node" / "hpcvp-data" and staged.name.startswith("packed-")
    assert (staged / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert shard_hashes(staged) == shard_hashes(out) and len(shard_hashes(staged)) == 4
    assert verify_dataset(staged).ok

    inodes = {p.name: p.stat().st_ino for p in staged.glob("*.h5")}
    data = bytearray((staged / "train-000.h5").read_bytes())
    data[10] ^= 0xFF
    (staged / "train-000.h5").write_bytes(bytes(data))
    assert stage_to_local(out) == staged
    assert shard_hashes(staged) == shard_hashes(out)
    assert (staged / "train-000.h5").stat().st_ino != inodes["train-000.h5"]  # bad copy replaced
    assert (staged / "train-001.h5").stat().st_ino == inodes["train-001.h5"]  # identical copy kept

    monkeypatch.delenv("SLURM_TMPDIR")
    assert stage_to_local(out).parent == tmp_path / "elsewhere" / "hpcvp-data"
    monkeypatch.delenv("TMPDIR")
    with pytest.raises(StagingError, match="SLURM_TMPDIR"):
        stage_to_local(out)

    # a source shard that no longer matches its manifest is refused, naming it
    (out / "train-001.h5").write_bytes(b"x" * (out / "train-001.h5").stat().st_size)
    with pytest.raises(StagingError, match=r"shared/packed/train-001.h5: does not match the manifest"):
        stage_to_local(out, tmp_path / "other-node")
    assert not list((tmp_path / "other-node").rglob("*.tmp*"))


def test_stage_cli_and_split_subset(tiny_raw, tmp_path, capsys):
    raw = tiny_raw({"train": [0, 1], "val": [1000], "unlabeled": [2000]})
    out = tmp_path / "packed"
    pack_dataset(raw, out, frame_size=TINY_SIZE, workers=0, quiet=True)
    assert pack_main(["--stage", str(out), "--stage-dest", str(tmp_path / "local"), "--quiet"]) == 0
    staged = Path(capsys.readouterr().out.strip())
    assert staged.parent == tmp_path / "local" / "hpcvp-data"
    assert shard_hashes(staged) == shard_hashes(out)
    assert (
        pack_main(
            ["--stage", str(out), "--stage-dest", str(tmp_path / "local"), "--stage-splits", "train,val", "--quiet"]
        )
        == 0
    )
    subset = Path(capsys.readouterr().out.strip())
    assert subset != staged and sorted(shard_hashes(subset)) == ["train-000.h5", "val-000.h5"]
    assert load_manifest(subset).splits == ["train", "val"] and verify_dataset(subset).ok
    assert pack_main(["--stage", str(out), "--stage-dest", str(tmp_path / "local"), "--stage-splits", "hidden"]) == 2
    assert "split(s) ['hidden'] are not packed" in capsys.readouterr().err


def test_progress_is_plain_lines_in_logs_and_a_bar_on_a_terminal():
    import io

    from hpcvp.progress import Progress

    log = io.StringIO()
    with Progress(3, "pack", unit="videos", stream=log, log_every_s=0) as progress:
        for _ in range(3):
            progress.advance()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "pack: 3/3 videos (100%)" in lines[-1]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    with Progress(3, "pack", unit="videos", stream=terminal) as progress:
        progress.advance(3)
    assert "\x1b[" in terminal.getvalue() and "3/3" in terminal.getvalue()


# ----------------------------------------------------------------------------- flow, decoded by the decoders


def _add_flow(raw: Path, split: str, video_id: int, value: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(video_id)
    flow = rng.normal(0, 3, (NUM_FRAMES - 1, 2, *TINY_SIZE)).astype(np.float16) if value is None else value
    flow[:, :, :5] = 0  # mostly background in real sets: some runs of zeros for the codecs
    np.save(raw / split / f"video_{video_id}" / "flow.npy", flow)
    return flow


@pytest.mark.parametrize(
    "codec, workers",
    [("lz4", 0), ("lz4", 2), ("gzip:1", 1), ("none", 1), ("blosc:lz4:5:bit", 1)],
)
def test_flow_is_decoded_and_compressed_by_the_decoders_and_reads_back_exactly(tiny_raw, tmp_path, codec, workers):
    """Flow takes the masks' codec, LZ4 when masks are raw (none): lz4 and gzip chunks are made by
    the decoder processes (write_direct_chunk in the writer); blosc: HDF5's filter in the writer.
    Shard 0 has flow for every video, shard 1 lacks one flow.npy and so stores none."""
    raw = tiny_raw({"train": [0, 1, 2, 3]})
    flows = {video_id: _add_flow(raw, "train", video_id) for video_id in (0, 1, 2)}
    manifest = pack_dataset(
        raw, tmp_path / "out", shard_size=2, mask_compression=codec, frame_size=TINY_SIZE, workers=workers, quiet=True
    )
    assert [shard.has_flow for shard in manifest.shards] == [True, False]
    assert verify_dataset(tmp_path / "out").ok
    with open_h5(tmp_path / "out" / "train-000.h5", "r") as handle:
        assert handle["flow"].dtype == np.float16 and handle["flow"].chunks == (1, 1, 2, *TINY_SIZE)
        assert filtered(handle["flow"]) and filtered(handle["masks"]) == (codec != "none")
        for row, video_id in enumerate((0, 1)):
            np.testing.assert_array_equal(handle["flow"][row], flows[video_id])
            frames, masks = tiny_video_arrays(video_id, "train")
            np.testing.assert_array_equal(handle["frames"][row], frames)
            np.testing.assert_array_equal(handle["masks"][row], masks)
    with open_h5(tmp_path / "out" / "train-001.h5", "r") as handle:
        assert "flow" not in handle and list(handle["video_ids"][:]) == [2, 3]
    # The same pack in this process (workers=0) gives the same bytes.
    pack_dataset(
        raw, tmp_path / "ref", shard_size=2, mask_compression=codec, frame_size=TINY_SIZE, workers=0, quiet=True
    )
    assert shard_hashes(tmp_path / "out") == shard_hashes(tmp_path / "ref")


def test_a_bad_flow_file_stops_or_is_skipped_like_a_bad_frame(tiny_raw, tmp_path):
    raw = tiny_raw({"train": [0, 1, 2]})
    good = {video_id: _add_flow(raw, "train", video_id) for video_id in (0, 2)}
    bad = np.zeros((NUM_FRAMES - 1, 2, *TINY_SIZE), dtype=np.float32)
    bad[3, 1, 7, 7] = np.nan
    np.save(raw / "train" / "video_1" / "flow.npy", bad)
    with pytest.raises(RawDataError, match="non-finite") as caught:
        pack_dataset(raw, tmp_path / "stop", frame_size=TINY_SIZE, workers=1, quiet=True)
    assert caught.value.path == raw / "train" / "video_1" / "flow.npy"
    assert not list((tmp_path / "stop").glob("*.h5"))
    manifest = pack_dataset(raw, tmp_path / "skip", frame_size=TINY_SIZE, workers=1, on_error="skip", quiet=True)
    assert [(video.video_id, Path(video.path).name) for video in manifest.skipped] == [(1, "flow.npy")]
    with open_h5(tmp_path / "skip" / "train-000.h5", "r") as handle:
        assert list(handle["video_ids"][:]) == [0, 2]
        for row, video_id in enumerate((0, 2)):
            np.testing.assert_array_equal(handle["flow"][row], good[video_id])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, None])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_read_flow_refuses_non_finite_values_into_a_slot(tmp_path, bad, dtype):
    from hpcvp.data.layout import read_flow

    flow = np.random.default_rng(0).normal(0, 3, (NUM_FRAMES - 1, 2, *TINY_SIZE)).astype(dtype)
    flow[0, 0, 0, 0] = 65504  # the largest float16: finite
    if bad is not None:
        flow[5, 1, 7, 9] = bad
    np.save(tmp_path / "flow.npy", flow)
    out = np.zeros(flow.shape, dtype=np.float16)
    if bad is None:
        read_flow(tmp_path / "flow.npy", TINY_SIZE, out=out)
        np.testing.assert_array_equal(out, flow.astype(np.float16))
    else:
        with pytest.raises(RawDataError, match="non-finite"):
            read_flow(tmp_path / "flow.npy", TINY_SIZE, out=out)


def test_a_bad_video_stops_two_decoders_promptly_every_time(tiny_raw, tmp_path):
    """The stop path ends the decoder processes while they still hold unread replies (CI once hung
    here for 15 minutes inside multiprocessing.Pool.terminate). Repeated, with videos still in
    flight behind the bad one."""
    raw = tiny_raw({"train": list(range(8))})
    (raw / "train" / "video_2" / "image_5.png").write_bytes(b"not a png")
    for attempt in range(5):
        started = time.monotonic()
        with pytest.raises(RawDataError) as caught:
            pack_dataset(raw, tmp_path / f"stop{attempt}", frame_size=TINY_SIZE, workers=2, quiet=True)
        assert caught.value.path.parent.name == "video_2"
        # Generous: only a hang fails this (the polite path would wait for every process).
        assert time.monotonic() - started < 60


def test_a_killed_decoder_is_an_error_naming_it_not_a_hang(tiny_raw):
    from hpcvp.data.pack_decode import Decoder, DecoderDied

    raw = tiny_raw({"train": [0, 1, 2, 3]})
    tasks = [("train", vid, str(raw / "train" / f"video_{vid}"), TINY_SIZE, "none", "none", None) for vid in range(4)]
    decoder = Decoder(2, TINY_SIZE)
    try:
        victim = decoder.processes[1]  # as the kernel's OOM killer would
        victim.kill()
        victim.join()
        results = decoder.results(tasks)
        with pytest.raises(DecoderDied, match=rf"hpcvp-pack-decoder-1 \(pid {victim.pid}\).*exit code -9"):
            list(results)
    finally:
        decoder.close()
    assert decoder.processes == []
