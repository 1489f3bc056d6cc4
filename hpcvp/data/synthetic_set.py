"""A whole synthetic dataset on disk, from the scenes of ``hpcvp.data.synthetic``.

Layout written by ``generate_dataset`` (``hpcvp.data.layout``)::

    <root>/train/video_<id>/image_0.png .. image_21.png, mask.npy (22,H,W) uint8  ids 0..
                                     + flow.npy (21,2,H,W) float16: ground-truth flow t -> t+1
    <root>/val/video_<id>/...        same (with flow.npy), ids from 1000
    <root>/unlabeled/video_<id>/     22 PNGs, no mask, ids from 2000
    <root>/hidden/video_<id>/        image_0..image_10 only, no mask, ids from 15000
    <root>/hpcvp_synthetic.json      {"size": [H, W], "seed": s, "counts": {...}, "format": 1}

Each video is written to ``video_<id>.tmp`` and renamed when complete, so a killed run never
leaves half a video; re-running skips complete videos and deletes ``.tmp`` leftovers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hpcvp.atomic import atomic_write_text
from hpcvp.data.layout import (
    FLOW_FILE_NAME,
    HEIGHT,
    MASK_FILE_NAME,
    SPLIT_HAS_MASKS,
    SPLIT_ID_RANGES,
    SPLIT_NUM_FRAMES,
    SPLITS,
    SYNTHETIC_INFO_FILE_NAME,
    WIDTH,
    frame_file_name,
)
from hpcvp.data.synthetic import render_video
from hpcvp.progress import Progress

FORMAT_VERSION = 1
METADATA_NAME = SYNTHETIC_INFO_FILE_NAME
# Written when a run starts, replaced by METADATA_NAME when it ends: lets a resumed run
# check that the videos already on disk were made with the same seed and size.
PARTIAL_METADATA_NAME = ".hpcvp_synthetic.partial.json"
TMP_SUFFIX = ".tmp"


def split_video_ids(split: str, count: int) -> range:
    """Video ids of the first ``count`` videos of ``split`` (train from 0, val from 1000, ...)."""
    low, high = SPLIT_ID_RANGES[split]
    if count < 0:
        raise ValueError(f"count for split {split!r} must be >= 0, got {count}")
    if high is not None and low + count > high:
        raise ValueError(
            f"split {split!r} holds at most {high - low} videos (ids {low}..{high - 1}), asked for {count}"
        )
    return range(low, low + count)


def write_video(root: Path, split: str, video_id: int, seed: int, size: tuple[int, int]) -> bool:
    """Render one video into ``<root>/<split>/video_<id>`` atomically; False if it already exists."""
    split_dir = Path(root) / split
    final = split_dir / f"video_{video_id}"
    if final.is_dir():
        return False
    tmp = split_dir / f"video_{video_id}{TMP_SUFFIX}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with_flow = SPLIT_HAS_MASKS[split]
    frames, masks, *flow = render_video(video_id, seed, size, num_frames=SPLIT_NUM_FRAMES[split], with_flow=with_flow)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / frame_file_name(t))
    if SPLIT_HAS_MASKS[split]:
        np.save(tmp / MASK_FILE_NAME, masks)
        np.save(tmp / FLOW_FILE_NAME, flow[0].astype(np.float16))
    os.rename(tmp, final)
    return True


def _expected_files(split: str) -> list[str]:
    names = [frame_file_name(t) for t in range(SPLIT_NUM_FRAMES[split])]
    return names + ([MASK_FILE_NAME, FLOW_FILE_NAME] if SPLIT_HAS_MASKS[split] else [])


def _write_metadata(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _check_metadata(path: Path, seed: int, size: tuple[int, int]) -> None:
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: unreadable synthetic-dataset metadata ({error}); delete the folder or use another root"
        ) from None
    found = (existing.get("format"), existing.get("seed"), tuple(existing.get("size") or ()))
    wanted = (FORMAT_VERSION, seed, tuple(size))
    if found != wanted:
        raise ValueError(
            f"{path}: existing dataset has format/seed/size {found}, this run asks for {wanted}; "
            "use another root or delete this one"
        )


def _prepare_root(root: Path, counts: dict[str, int], seed: int, size: tuple[int, int]) -> list[tuple[str, int]]:
    """Check an existing root, clean ``.tmp`` leftovers and return the (split, id) still to make."""
    has_metadata = False
    for name in (METADATA_NAME, PARTIAL_METADATA_NAME):
        if (root / name).exists():
            _check_metadata(root / name, seed, size)
            has_metadata = True
    todo: list[tuple[str, int]] = []
    for split in SPLITS:
        wanted = split_video_ids(split, counts[split])
        split_dir = root / split
        if not split_dir.is_dir():
            todo.extend((split, vid) for vid in wanted)
            continue
        for entry in sorted(split_dir.iterdir()):
            if entry.name.endswith(TMP_SUFFIX) and entry.name.startswith("video_"):
                shutil.rmtree(entry)  # a killed run's half video
            elif entry.name.startswith("video_") and entry.is_dir():
                try:
                    vid = int(entry.name[len("video_") :])
                except ValueError:
                    continue
                if not has_metadata:
                    raise ValueError(
                        f"{entry}: {root} holds videos but no {METADATA_NAME}; it was not made by this "
                        "generator (or with an unknown seed and size), use an empty root"
                    )
                if vid not in wanted:
                    raise ValueError(
                        f"{entry}: video is outside the requested counts {counts}; "
                        "a synthetic root only grows, use another root to make fewer videos"
                    )
        for vid in wanted:
            folder = split_dir / f"video_{vid}"
            if folder.is_dir():
                missing = [n for n in _expected_files(split) if not (folder / n).is_file()]
                if not missing:
                    continue
                # Renames make folders complete; a missing file means someone removed it.
                print(f"synthetic: {folder} lacks {missing[0]}; making it again", file=sys.stderr)
                shutil.rmtree(folder)
            todo.append((split, vid))
    return todo


def _normalise_counts(counts: dict[str, int]) -> dict[str, int]:
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown} in counts; splits are {list(SPLITS)}")
    return {split: int(counts.get(split, 0)) for split in SPLITS}


def _write_video_task(task: tuple[str, str, int, int, tuple[int, int]]) -> tuple[str, int]:
    root, split, video_id, seed, size = task
    write_video(Path(root), split, video_id, seed, size)
    return split, video_id


def generate_dataset(
    root: str | os.PathLike,
    counts: dict[str, int],
    seed: int = 0,
    size: tuple[int, int] = (HEIGHT, WIDTH),
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the competition raw layout under ``root``; returns ``root``.

    ``counts`` maps split names (train, val, unlabeled, hidden) to numbers of videos; missing
    splits get none. Re-running with the same seed and size skips finished videos (and can grow
    the counts); a different seed or size in an existing root is an error.
    """
    root = Path(root)
    size = (int(size[0]), int(size[1]))
    if size[0] < 8 or size[1] < 8:
        raise ValueError(f"frame size {size[0]}x{size[1]} is too small (need at least 8x8)")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    seed = int(seed)
    counts = _normalise_counts(counts)
    root.mkdir(parents=True, exist_ok=True)
    todo = _prepare_root(root, counts, seed, size)
    metadata = {"size": list(size), "seed": seed, "counts": counts, "format": FORMAT_VERSION}
    if not (root / METADATA_NAME).exists():
        _write_metadata(root / PARTIAL_METADATA_NAME, metadata)
    for split in SPLITS:
        (root / split).mkdir(exist_ok=True)

    tasks = [(str(root), split, vid, seed, size) for split, vid in todo]
    with Progress(len(tasks), f"synthetic {size[0]}x{size[1]}", unit="videos", enabled=progress and bool(tasks)) as bar:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                _write_video_task(task)
                bar.advance()
        else:
            # spawn: a forked child would inherit the parent's threads and library state.
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(tasks))) as pool:
                for _ in pool.imap_unordered(_write_video_task, tasks):
                    bar.advance()
    _write_metadata(root / METADATA_NAME, metadata)
    (root / PARTIAL_METADATA_NAME).unlink(missing_ok=True)
    return root


# --- command line -----------------------------------------------------------------------
def parse_resolution(text: str) -> tuple[int, int]:
    """``"80x120"`` -> ``(80, 120)`` (height x width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--res must look like HEIGHTxWIDTH (e.g. 80x120), got {text!r}") from None
    if height < 8 or width < 8:
        raise argparse.ArgumentTypeError(f"--res {text}: frames must be at least 8x8")
    return height, width


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hpcvp-make-synthetic",
        description="Write synthetic CLEVRER-like videos in the competition raw layout "
        "(<out>/{train,val,unlabeled,hidden}/video_<id>/image_<t>.png, mask.npy).",
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create or resume")
    parser.add_argument("--train", type=int, default=20, help="train videos (ids from 0)")
    parser.add_argument("--val", type=int, default=5, help="val videos (ids from 1000)")
    parser.add_argument("--unlabeled", type=int, default=20, help="unlabeled videos (ids from 2000)")
    parser.add_argument("--hidden", type=int, default=5, help="hidden videos, 11 frames (ids from 15000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--res",
        type=parse_resolution,
        default=(HEIGHT, WIDTH),
        help=f"frame size HEIGHTxWIDTH (default {HEIGHT}x{WIDTH})",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes rendering in parallel")
    parser.add_argument("--no-progress", action="store_true", help="print nothing while rendering")
    args = parser.parse_args(argv)
    counts = {"train": args.train, "val": args.val, "unlabeled": args.unlabeled, "hidden": args.hidden}
    try:
        root = generate_dataset(
            args.out, counts, seed=args.seed, size=args.res, workers=args.workers, progress=not args.no_progress
        )
    except ValueError as error:
        parser.exit(2, f"hpcvp-make-synthetic: error: {error}\n")
    print(
        f"{root}: "
        + ", ".join(f"{n} {split}" for split, n in counts.items())
        + f" videos at {args.res[0]}x{args.res[1]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
