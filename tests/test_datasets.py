"""Shard-backed datasets: contents vs the raw files, DataLoader workers, DistributedSampler,
pseudo-mask sources, and the embedded default dataset."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SYNTHETIC_COUNTS, TINY_SIZE
from torch.utils.data import DataLoader, DistributedSampler

from hpcvp.data import add_pseudo_masks, load_manifest, pack_dataset, verify_dataset
from hpcvp.data.datasets import (
    ClipDataset,
    FrameDataset,
    HiddenDataset,
    PairDataset,
    frame_reader,
    frames_to_float,
    shard_handle,
)
from hpcvp.data.default import DEFAULT_COUNTS
from hpcvp.data.layout import NUM_FRAMES, list_videos, read_video

H, W = TINY_SIZE


@pytest.fixture(scope="module")
def raw_videos(synthetic_raw):
    """{split: {video_id: (frames, masks)}} decoded straight from the PNG folders."""
    return {
        split: {vid: read_video(folder, split, TINY_SIZE) for vid, folder in list_videos(synthetic_raw, split)}
        for split in SYNTHETIC_COUNTS
    }


def test_clip_dataset_matches_the_raw_videos(synthetic_packed, raw_videos):
    dataset = ClipDataset(synthetic_packed, "train")
    assert len(dataset) == SYNTHETIC_COUNTS["train"]
    assert dataset.video_ids == sorted(raw_videos["train"])  # spans train-000 and train-001
    for index in range(len(dataset)):
        item = dataset[index]
        frames, masks = raw_videos["train"][item["video_id"]]
        assert set(item) == {"video_id", "frames_in", "frames_out", "masks_in", "masks_out"}
        assert item["frames_in"].dtype == torch.uint8 and item["frames_in"].shape == (11, H, W, 3)
        assert item["masks_out"].dtype == torch.uint8 and item["masks_out"].shape == (11, H, W)
        np.testing.assert_array_equal(item["frames_in"].numpy(), frames[:11])
        np.testing.assert_array_equal(item["frames_out"].numpy(), frames[11:])
        np.testing.assert_array_equal(item["masks_in"].numpy(), masks[:11])
        np.testing.assert_array_equal(item["masks_out"].numpy(), masks[11:])
    assert set(ClipDataset(synthetic_packed, "val", masks=False)[0]) == {"video_id", "frames_in", "frames_out"}
    assert set(ClipDataset(synthetic_packed, "val", frames=False)[0]) == {"video_id", "masks_in", "masks_out"}
    unlabeled = ClipDataset(synthetic_packed, "unlabeled", masks=False)
    assert len(unlabeled) == SYNTHETIC_COUNTS["unlabeled"]


def test_clip_dataset_refuses_what_the_split_cannot_give(synthetic_packed, tmp_path):
    with pytest.raises(ValueError, match="use HiddenDataset"):
        ClipDataset(synthetic_packed, "hidden")
    with pytest.raises(ValueError, match="split 'unlabeled' has no true masks; use mask_source='pseudo'"):
        ClipDataset(synthetic_packed, "unlabeled")
    with pytest.raises(ValueError, match="mask_source must be one of"):
        ClipDataset(synthetic_packed, "train", mask_source="predicted")
    with pytest.raises(Exception, match="no manifest"):
        ClipDataset(tmp_path, "train")


def test_frame_dataset_lists_every_frame_with_masks_when_available(synthetic_packed, raw_videos):
    train = FrameDataset(synthetic_packed, "train")
    assert len(train) == SYNTHETIC_COUNTS["train"] * NUM_FRAMES and train.with_masks
    for index in (0, 21, 22, 50, len(train) - 1):
        item = train[index]
        frames, masks = raw_videos["train"][item["video_id"]]
        assert item["t"] == index % NUM_FRAMES
        assert item["frame"].shape == (H, W, 3) and item["mask"].shape == (H, W)
        np.testing.assert_array_equal(item["frame"].numpy(), frames[item["t"]])
        np.testing.assert_array_equal(item["mask"].numpy(), masks[item["t"]])
    with pytest.raises(IndexError):
        train[len(train)]
    unlabeled = FrameDataset(synthetic_packed, "unlabeled")  # no masks there: frames only
    assert not unlabeled.with_masks and "mask" not in unlabeled[0]
    assert len(unlabeled) == SYNTHETIC_COUNTS["unlabeled"] * NUM_FRAMES
    with pytest.raises(ValueError, match="has no true masks"):
        FrameDataset(synthetic_packed, "unlabeled", masks=True)
    hidden = FrameDataset(synthetic_packed, "hidden")
    assert len(hidden) == SYNTHETIC_COUNTS["hidden"] * 11 and hidden[12]["t"] == 1


def test_pair_dataset_gives_consecutive_frames(synthetic_packed, raw_videos):
    pairs = PairDataset(synthetic_packed, "val")
    assert len(pairs) == SYNTHETIC_COUNTS["val"] * (NUM_FRAMES - 1)
    for index in (0, 20, 21, len(pairs) - 1):
        item = pairs[index]
        frames, masks = raw_videos["val"][item["video_id"]]
        t = item["t"]
        assert t == index % (NUM_FRAMES - 1)
        np.testing.assert_array_equal(item["frame0"].numpy(), frames[t])
        np.testing.assert_array_equal(item["frame1"].numpy(), frames[t + 1])
        np.testing.assert_array_equal(item["mask1"].numpy(), masks[t + 1])
    assert "mask0" not in PairDataset(synthetic_packed, "unlabeled")[0]


def test_hidden_dataset_gives_the_eleven_input_frames(synthetic_packed, raw_videos):
    hidden = HiddenDataset(synthetic_packed)
    assert len(hidden) == SYNTHETIC_COUNTS["hidden"]
    item = hidden[1]
    assert set(item) == {"video_id", "frames_in"} and item["video_id"] >= 15000
    np.testing.assert_array_equal(item["frames_in"].numpy(), raw_videos["hidden"][item["video_id"]][0])
    val = HiddenDataset(synthetic_packed, "val")[0]  # predicting on val uses the same input
    np.testing.assert_array_equal(val["frames_in"].numpy(), raw_videos["val"][val["video_id"]][0][:11])


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip:1", "lz4", "blosc:lz4:5:bit"])
def test_every_compression_reads_back_the_raw_pixels(synthetic_raw, raw_videos, tmp_path, compression):
    out = tmp_path / "packed"
    pack_dataset(
        synthetic_raw,
        out,
        splits=["val", "hidden"],
        compression=compression,
        mask_compression=compression,
        workers=0,
        quiet=True,
    )
    # uncompressed frames are read with preadv at HDF5's chunk offsets; compressed ones through h5py
    assert (frame_reader(out / "val-000.h5").offsets is not None) == (compression == "none")
    for item in ClipDataset(out, "val"):
        frames, masks = raw_videos["val"][item["video_id"]]
        np.testing.assert_array_equal(torch.cat([item["frames_in"], item["frames_out"]]).numpy(), frames)
        np.testing.assert_array_equal(torch.cat([item["masks_in"], item["masks_out"]]).numpy(), masks)
    pairs = PairDataset(out, "val")
    item = pairs[len(pairs) - 1]
    np.testing.assert_array_equal(item["frame1"].numpy(), raw_videos["val"][item["video_id"]][0][21])
    for item in HiddenDataset(out):
        np.testing.assert_array_equal(item["frames_in"].numpy(), raw_videos["hidden"][item["video_id"]][0])


def test_frames_to_float():
    frames = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8).expand(2, 4, 5, 3)
    out = frames_to_float(frames)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([0.0, 128 / 255, 1.0]).expand(2, 3))
    assert frames_to_float(frames, torch.bfloat16).dtype == torch.bfloat16


def test_dataloader_workers_open_their_own_handles_after_fork(synthetic_packed):
    dataset = ClipDataset(synthetic_packed, "train")
    direct = {dataset[i]["video_id"]: dataset[i] for i in range(len(dataset))}  # main process opens handles
    main_handle = shard_handle(synthetic_packed / "train-000.h5")
    loader = DataLoader(
        dataset,
        batch_size=2,
        num_workers=2,
        multiprocessing_context="fork",
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for batch in loader:
        assert batch["frames_in"].shape == (2, 11, H, W, 3) and batch["frames_in"].dtype == torch.uint8
        for row, video_id in enumerate(batch["video_id"].tolist()):
            seen.append(video_id)
            np.testing.assert_array_equal(batch["frames_out"][row].numpy(), direct[video_id]["frames_out"].numpy())
            np.testing.assert_array_equal(batch["masks_in"][row].numpy(), direct[video_id]["masks_in"].numpy())
    assert sorted(seen) == sorted(direct)
    assert shard_handle(synthetic_packed / "train-000.h5") is main_handle and main_handle.id.valid


@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_sampler_splits_videos_between_ranks(synthetic_packed, rank):
    dataset = FrameDataset(synthetic_packed, "train")
    ids = {}
    for r in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2 if r == rank else 0)
        ids[r] = [(v, t) for batch in loader for v, t in zip(batch["video_id"].tolist(), batch["t"].tolist())]
    assert len(ids[0]) == len(ids[1]) == len(dataset) // 2
    assert set(ids[0]).isdisjoint(ids[1])
    assert set(ids[0]) | set(ids[1]) == {(v, t) for v in dataset.video_ids for t in range(NUM_FRAMES)}


def test_mask_sources_true_pseudo_and_any(synthetic_raw, tmp_path):
    out = tmp_path / "packed"
    pack_dataset(synthetic_raw, out, splits=["train", "unlabeled"], workers=0, quiet=True)
    unlabeled_ids = load_manifest(out).video_ids("unlabeled")
    with pytest.raises(ValueError, match="has no pseudo masks"):
        ClipDataset(out, "unlabeled", mask_source="pseudo")
    labelled = unlabeled_ids[1:3]
    pseudo = np.stack([np.full((NUM_FRAMES, H, W), 7 + k, np.uint8) for k in range(len(labelled))])
    add_pseudo_masks(out, "unlabeled", labelled, pseudo, run="seg-tiny")
    clips = ClipDataset(out, "unlabeled", mask_source="pseudo")
    assert clips.video_ids == labelled  # only the videos that have pseudo masks
    for k, video_id in enumerate(labelled):
        item = clips[k]
        assert item["video_id"] == video_id and bool((item["masks_out"] == 7 + k).all())
    assert FrameDataset(out, "unlabeled", mask_source="pseudo")[NUM_FRAMES]["mask"].eq(8).all()
    # "any" on train: the true masks; pseudo masks added for train videos take effect under "pseudo"
    train_ids = load_manifest(out).video_ids("train")
    add_pseudo_masks(out, "train", train_ids[:1], np.zeros((1, NUM_FRAMES, H, W), np.uint8), run="seg-tiny")
    true_clip = ClipDataset(out, "train", mask_source="true")[0]
    any_clip = ClipDataset(out, "train", mask_source="any")[0]
    pseudo_clip = ClipDataset(out, "train", mask_source="pseudo")[0]
    assert torch.equal(any_clip["masks_out"], true_clip["masks_out"]) and true_clip["masks_out"].any()
    assert not pseudo_clip["masks_out"].any()
    assert len(ClipDataset(out, "unlabeled", mask_source="any")) == len(labelled)


def test_default_dataset_cache_key_names_everything_that_sizes_it(monkeypatch):
    """A change in the built-in set's size (counts, frame size, seed, version) is a new cache entry."""
    from hpcvp.data import default

    name = default.default_dataset_name()
    assert name.startswith(f"default-v{default.DEFAULT_DATASET_VERSION}-80x120-") and "t96v40u16h8" in name
    monkeypatch.setattr(default, "DEFAULT_COUNTS", {**default.DEFAULT_COUNTS, "train": 97})
    assert default.default_dataset_name() not in (name, "")
    bigger = default.default_dataset_name()
    monkeypatch.setattr(default, "DEFAULT_FRAME_SIZE", (40, 60))
    assert default.default_dataset_name() not in (name, bigger)


def test_default_dataset_is_built_once_under_concurrent_callers(tmp_path):
    """Two processes (like two DDP ranks) ask for the default dataset at the same time."""
    env = dict(os.environ, HPCVP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO_ROOT))
    code = "from hpcvp.data.default import ensure_default_dataset; print(ensure_default_dataset())"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    paths = {stdout.strip() for stdout, _ in outputs}
    assert len(paths) == 1
    packed = paths.pop()
    manifest = load_manifest(packed)
    assert manifest.frame_size == (80, 120)
    assert {s: t["videos"] for s, t in manifest.totals()["per_split"].items()} == DEFAULT_COUNTS
    assert verify_dataset(packed).ok
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.h5")}
    from hpcvp.data.default import ensure_default_dataset

    start = time.perf_counter()
    assert str(ensure_default_dataset(tmp_path / "cache")) == packed
    assert time.perf_counter() - start < 2.0  # ready: no regeneration, no re-pack
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.h5")} == mtimes
    item = ClipDataset(packed, "train")[0]
    assert item["frames_in"].shape == (11, 80, 120, 3)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_shared_mask_cache_gives_the_shard_masks_to_dataloader_workers(synthetic_packed, raw_videos, context):
    """The uint8 mask cache is made once before the workers start; forked and spawned workers
    read the same shared memory, items equal the shard's masks and never alias the cache."""
    plain = ClipDataset(synthetic_packed, "val", frames=False, masks=True)
    cached = ClipDataset(synthetic_packed, "val", frames=False, masks=True, mask_cache=True)
    cache = cached.mask_cache
    assert cache is not None and cache.tensor.is_shared() and cache.tensor.dtype == torch.uint8
    assert cache.nbytes == len(cached) * NUM_FRAMES * TINY_SIZE[0] * TINY_SIZE[1]
    loader = DataLoader(cached, batch_size=2, num_workers=2, multiprocessing_context=context)
    seen = 0
    for batch in loader:
        for k, video_id in enumerate(batch["video_id"].tolist()):
            masks = torch.cat([batch["masks_in"][k], batch["masks_out"][k]]).numpy()
            np.testing.assert_array_equal(masks, raw_videos["val"][video_id][1])
            seen += 1
    assert seen == len(cached)
    item = cached[0]
    item["masks_in"].fill_(7)  # an item is a copy: the cache is untouched
    np.testing.assert_array_equal(cached[0]["masks_in"].numpy(), plain[0]["masks_in"].numpy())
    frames = FrameDataset(synthetic_packed, "val", masks=True, mask_cache=True)
    for index in (0, len(frames) - 1):
        np.testing.assert_array_equal(
            frames[index]["mask"].numpy(), FrameDataset(synthetic_packed, "val")[index]["mask"].numpy()
        )
