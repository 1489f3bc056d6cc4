"""Pseudo-mask shards: masks predicted for packed videos (e.g. by the U-Net on unlabelled and hidden
videos), stored as mask-only shards next to the frames and listed in the manifest."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from hpcvp.atomic import temporary_name

from .layout import NUM_CLASSES, SPLIT_NUM_FRAMES
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    PseudoMaskEntry,
    load_manifest,
    write_manifest,
)
from .pack import DEFAULT_SHARD_SIZE, PSEUDO_MASK_COMPRESSION
from .shard_files import file_lock, open_h5, parse_compression, publish_shard


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return slug[-48:] or "run"


def add_pseudo_masks(
    data_dir: os.PathLike | str,
    split: str,
    video_ids: Sequence[int],
    masks: np.ndarray | Iterable[np.ndarray],
    run: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    compression: str = PSEUDO_MASK_COMPRESSION,
    confidence: Sequence[float] | None = None,
) -> list[PseudoMaskEntry]:
    """Store predicted masks for packed videos as mask-only shards and list them in the manifest.

    ``masks`` is an array (N, T, H, W) or an iterable of (T, H, W) arrays in ``video_ids`` order
    (T = 22, or 11 for hidden), any integer dtype with values in 0..48. Later entries take
    precedence where video ids overlap; an entry fully superseded by later ones is removed with its
    file. Concurrent callers (e.g. DDP ranks) are serialised by a lock on the manifest.

    ``confidence`` (optional, one float per video in ``video_ids`` order, e.g. the labelling
    model's mean max-softmax) is stored as a ``confidence`` dataset in the shard beside ``masks``;
    read it back with :func:`pseudo_confidence`. Shards without it stay valid.
    """
    data_dir = Path(data_dir)
    ids = [int(v) for v in video_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("video_ids contains duplicates")
    if not ids:
        raise ValueError("video_ids is empty")
    if confidence is not None:
        confidence = [float(c) for c in confidence]
        if len(confidence) != len(ids):
            raise ValueError(f"confidence has {len(confidence)} values; {len(ids)} video ids given")
    compression_kwargs = parse_compression(compression)
    with file_lock(data_dir / LOCK_NAME):
        manifest = load_manifest(data_dir)
        known = set(manifest.video_ids(split))
        unknown = [v for v in ids if v not in known]
        if unknown:
            raise ValueError(f"video ids {unknown[:5]} are not packed in split {split!r} of {data_dir}")
        height, width = manifest.frame_size
        num_frames = SPLIT_NUM_FRAMES[split]
        prefix = f"pseudo-{split}-{_slug(run)}-"
        used = [
            int(m.group(1))
            for name in [e.path for e in manifest.pseudo_masks] + [p.name for p in data_dir.iterdir()]
            if (m := re.fullmatch(r"\.?" + re.escape(prefix) + r"(\d+)\.h5(?:\.tmp(?:-\d+)?)?", name))
        ]
        next_index = max(used, default=-1) + 1
        mask_iter = iter(masks)
        new_entries: list[PseudoMaskEntry] = []
        for start in range(0, len(ids), shard_size):
            chunk_ids = ids[start : start + shard_size]
            name = f"{prefix}{next_index:03d}.h5"
            next_index += 1
            tmp_path = temporary_name(data_dir / name)
            try:
                with open_h5(tmp_path, "w") as shard:
                    shard.attrs["format"] = FORMAT_NAME
                    shard.attrs["format_version"] = FORMAT_VERSION
                    shard.attrs["split"] = split
                    shard.attrs["run"] = run
                    dataset = shard.create_dataset(
                        "masks",
                        shape=(len(chunk_ids), num_frames, height, width),
                        dtype=np.uint8,
                        chunks=(1, 1, height, width),
                        track_times=False,
                        **compression_kwargs,
                    )
                    for row, video_id in enumerate(chunk_ids):
                        try:
                            mask = np.asarray(next(mask_iter))
                        except StopIteration:
                            raise ValueError(
                                f"masks ended after {start + row} items; {len(ids)} video ids given"
                            ) from None
                        dataset[row] = _checked_mask(mask, (num_frames, height, width), video_id)
                    shard.create_dataset("video_ids", data=np.asarray(chunk_ids, dtype=np.int64), track_times=False)
                    if confidence is not None:
                        values = np.asarray(confidence[start : start + shard_size], dtype=np.float32)
                        shard.create_dataset("confidence", data=values, track_times=False)
                digest, size = publish_shard(tmp_path, data_dir / name)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp_path.unlink()
                for entry in new_entries:
                    with contextlib.suppress(FileNotFoundError):
                        (data_dir / entry.path).unlink()
                raise
            new_entries.append(PseudoMaskEntry(split, name, tuple(chunk_ids), size, digest, run, num_frames))
        entries = manifest.pseudo_masks + new_entries
        manifest.pseudo_masks = _drop_superseded(data_dir, entries)
        write_manifest(data_dir, manifest)
    return new_entries


def pseudo_confidence(data_dir: os.PathLike | str, split: str) -> dict[int, float]:
    """{video id: stored confidence} of the pseudo masks of ``split`` that the manifest lists
    (later entries take precedence, as for the masks); videos whose shard stores no confidence
    are absent."""
    data_dir = Path(data_dir)
    out: dict[int, float] = {}
    for entry in load_manifest(data_dir).pseudo_for(split):
        with open_h5(data_dir / entry.path, "r") as shard:
            if "confidence" not in shard:
                for video_id in entry.video_ids:
                    out.pop(video_id, None)
                continue
            values = shard["confidence"][:]
        for video_id, value in zip(entry.video_ids, values):
            out[video_id] = float(value)
    return out


def _checked_mask(mask: np.ndarray, shape: tuple[int, int, int], video_id: int) -> np.ndarray:
    if hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().cpu().numpy()
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"pseudo mask of video {video_id} has dtype {mask.dtype}, expected integers")
    if tuple(mask.shape) != shape:
        raise ValueError(f"pseudo mask of video {video_id} has shape {tuple(mask.shape)}, expected {shape}")
    if mask.size and (mask.min() < 0 or mask.max() >= NUM_CLASSES):
        raise ValueError(f"pseudo mask of video {video_id} has values outside 0..{NUM_CLASSES - 1}")
    return mask.astype(np.uint8, copy=False)


def _drop_superseded(data_dir: Path, entries: list[PseudoMaskEntry]) -> list[PseudoMaskEntry]:
    kept_reversed: list[PseudoMaskEntry] = []
    covered: dict[str, set[int]] = {}
    for entry in reversed(entries):
        seen = covered.setdefault(entry.split, set())
        if set(entry.video_ids) <= seen:
            with contextlib.suppress(FileNotFoundError):
                (data_dir / entry.path).unlink()
            continue
        seen.update(entry.video_ids)
        kept_reversed.append(entry)
    return kept_reversed[::-1]
