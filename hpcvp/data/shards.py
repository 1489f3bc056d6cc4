"""Sharded HDF5 packing of the raw layout, its manifest, verification, pseudo-mask shards, staging.

A packed dataset directory holds ``manifest.json`` and shards ``<split>-<k:03d>.h5``, each with
``frames`` uint8 (N, T, H, W, 3) chunked one frame per chunk, ``masks`` uint8 (N, 22, H, W)
(train/val) chunked one frame per chunk, and ``video_ids`` int64 (N,).

Packing is resumable and reproducible: every shard is written under a temporary name and renamed
when complete; a journal records each finished shard's hash, so a re-run keeps the shards that are
complete and verified and rewrites the rest. HDF5 timestamps are disabled (``track_times=False``)
and the write order is fixed, so a resumed pack is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .layout import (
    HEIGHT,
    NUM_CLASSES,
    NUM_FRAMES,
    SPLIT_HAS_MASKS,
    SPLIT_NUM_FRAMES,
    SPLITS,
    SYNTHETIC_INFO_FILE_NAME,
    WIDTH,
    RawDataError,
    list_videos,
    missing_files,
    read_video,
)
from .progress import Progress

FORMAT_NAME = "hpcvp-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".pack-journal.json"
LOCK_NAME = ".manifest.lock"
DEFAULT_SHARD_SIZE = 250
# Chosen from tools/bench_data.py (BENCHMARKS.md): uncompressed frames read ~5x faster than lzf or
# gzip (page cache -> array with one preadv); masks are mostly background, gzip:1 stores them
# ~45x smaller and inflates faster than lzf, and the decoder processes do the deflating.
DEFAULT_COMPRESSION = "none"
DEFAULT_MASK_COMPRESSION = "gzip:1"
SHARD_NAME_PATTERN = re.compile(r"^(train|val|unlabeled|hidden)-(\d{3,})\.h5$")
TMP_SUFFIX = ".tmp"
HASH_BLOCK = 8 << 20


class ManifestError(ValueError):
    """manifest.json is missing, malformed, or from an unsupported format version."""


class StagingError(RuntimeError):
    """A shard could not be staged or does not match the manifest."""


# ----------------------------------------------------------------------------- small helpers


def parse_compression(text: str) -> dict:
    """``none`` | ``lzf`` | ``gzip:L`` (L in 0..9) -> h5py create_dataset keyword arguments."""
    value = text.strip().lower()
    if value == "none":
        return {}
    if value == "lzf":
        return {"compression": "lzf"}
    match = re.fullmatch(r"gzip(?::(\d))?", value)
    if match:
        level = int(match.group(1)) if match.group(1) is not None else 4
        return {"compression": "gzip", "compression_opts": level}
    raise ValueError(f"unknown compression {text!r}; expected none, lzf or gzip:L with L in 0..9")


def canonical_compression(text: str) -> str:
    kwargs = parse_compression(text)
    if not kwargs:
        return "none"
    if kwargs["compression"] == "lzf":
        return "lzf"
    return f"gzip:{kwargs['compression_opts']}"


def parse_frame_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise ValueError(f"frame size {text!r} is not HxW, e.g. 160x240")
    return int(match.group(1)), int(match.group(2))


def source_frame_size(src: os.PathLike | str) -> tuple[int, int]:
    """The frame size a raw root declares (``hpcvp_synthetic.json`` "size"), else 160x240."""
    info_path = Path(src) / SYNTHETIC_INFO_FILE_NAME
    if not info_path.exists():
        return HEIGHT, WIDTH
    try:
        size = json.loads(info_path.read_text())["size"]
        height, width = int(size[0]), int(size[1])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise RawDataError(info_path, f'cannot read "size": [H, W] ({error})') from None
    return height, width


def sha256_file(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=1, sort_keys=False) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def file_lock(path: os.PathLike | str) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), held for the ``with`` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_h5(path: os.PathLike | str, mode: str = "r", **kwargs) -> h5py.File:
    """h5py.File with HDF5 file locking off: POSIX locks are broken or slow on Lustre/GPFS/NFS."""
    return h5py.File(path, mode, locking=False, **kwargs)


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardEntry:
    split: str
    path: str  # relative to the dataset directory
    video_ids: tuple[int, ...]
    bytes: int
    sha256: str
    has_masks: bool
    num_frames: int


@dataclass(frozen=True)
class PseudoMaskEntry:
    split: str
    path: str
    video_ids: tuple[int, ...]
    bytes: int
    sha256: str
    run: str
    num_frames: int


@dataclass(frozen=True)
class SkippedVideo:
    split: str
    video_id: int
    path: str  # the offending file
    reason: str
    shard: str | None = None  # the shard it was planned for when the failure showed at decode time


@dataclass
class Manifest:
    root: Path
    frame_size: tuple[int, int]
    compression: dict
    shards: list[ShardEntry] = field(default_factory=list)
    pseudo_masks: list[PseudoMaskEntry] = field(default_factory=list)
    skipped: list[SkippedVideo] = field(default_factory=list)
    source: str | None = None
    format_version: int = FORMAT_VERSION

    def shards_for(self, split: str) -> list[ShardEntry]:
        return [shard for shard in self.shards if shard.split == split]

    def pseudo_for(self, split: str) -> list[PseudoMaskEntry]:
        return [entry for entry in self.pseudo_masks if entry.split == split]

    def video_ids(self, split: str) -> list[int]:
        return [video_id for shard in self.shards_for(split) for video_id in shard.video_ids]

    @property
    def splits(self) -> list[str]:
        return [split for split in SPLITS if self.shards_for(split)]

    def totals(self) -> dict:
        per_split = {}
        for split in SPLITS:
            shards = self.shards_for(split)
            if shards:
                per_split[split] = {
                    "videos": sum(len(s.video_ids) for s in shards),
                    "shards": len(shards),
                    "bytes": sum(s.bytes for s in shards),
                }
        return {
            "videos": sum(len(s.video_ids) for s in self.shards),
            "shards": len(self.shards),
            "bytes": sum(s.bytes for s in self.shards),
            "pseudo_mask_shards": len(self.pseudo_masks),
            "pseudo_mask_bytes": sum(e.bytes for e in self.pseudo_masks),
            "skipped_videos": len(self.skipped),
            "files": len(self.shards) + len(self.pseudo_masks) + 1,
            "per_split": per_split,
        }

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "frame_size": list(self.frame_size),
            "compression": dict(self.compression),
            "source": self.source,
            "totals": self.totals(),
            "shards": [_entry_json(s) for s in self.shards],
            "pseudo_masks": [_entry_json(e) for e in self.pseudo_masks],
            "skipped": [asdict(s) for s in self.skipped],
        }


def _entry_json(entry) -> dict:
    payload = asdict(entry)
    payload["video_ids"] = list(entry.video_ids)
    return payload


def manifest_path(data_dir: os.PathLike | str) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def load_manifest(data_dir: os.PathLike | str) -> Manifest:
    path = manifest_path(data_dir)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; pack the raw data with tools/pack_hdf5.py first") from None
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: unreadable manifest ({error})") from None
    if payload.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not an hpcvp manifest (format={payload.get('format')!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {payload.get('format_version')} is not supported "
            f"(this hpcvp reads {FORMAT_VERSION}); re-pack the data"
        )
    try:
        return Manifest(
            root=Path(data_dir),
            frame_size=(int(payload["frame_size"][0]), int(payload["frame_size"][1])),
            compression=dict(payload["compression"]),
            shards=[_shard_from_json(s) for s in payload["shards"]],
            pseudo_masks=[_pseudo_from_json(e) for e in payload.get("pseudo_masks", [])],
            skipped=[SkippedVideo(**s) for s in payload.get("skipped", [])],
            source=payload.get("source"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ManifestError(f"{path}: malformed manifest ({error!r})") from None


def _shard_from_json(payload: dict) -> ShardEntry:
    return ShardEntry(
        split=payload["split"],
        path=payload["path"],
        video_ids=tuple(int(v) for v in payload["video_ids"]),
        bytes=int(payload["bytes"]),
        sha256=payload["sha256"],
        has_masks=bool(payload["has_masks"]),
        num_frames=int(payload["num_frames"]),
    )


def _pseudo_from_json(payload: dict) -> PseudoMaskEntry:
    return PseudoMaskEntry(
        split=payload["split"],
        path=payload["path"],
        video_ids=tuple(int(v) for v in payload["video_ids"]),
        bytes=int(payload["bytes"]),
        sha256=payload["sha256"],
        run=payload["run"],
        num_frames=int(payload["num_frames"]),
    )


def write_manifest(data_dir: os.PathLike | str, manifest: Manifest) -> Path:
    path = manifest_path(data_dir)
    atomic_write_json(path, manifest.to_json())
    return path


# ----------------------------------------------------------------------------- packing
#
# Pipeline: ``workers`` decoder processes read PNG folders straight into shared-memory slots
# (and deflate chunks themselves when gzip is chosen); the main process writes each slot into
# the shard with direct chunk writes (no extra copies, no HDF5 filter work in the writer); a
# background thread hashes and renames each finished shard while the next one is written.


@dataclass
class _ShardPlan:
    split: str
    name: str
    videos: list[tuple[int, Path]]

    @property
    def planned_ids(self) -> list[int]:
        return [video_id for video_id, _ in self.videos]


def _slot_bytes(size: tuple[int, int]) -> int:
    height, width = size
    return NUM_FRAMES * height * width * 4  # 22 RGB frames + 22 mask planes


def _slot_views(slots: np.ndarray, slot: int, split: str, size: tuple[int, int]):
    """(frames (T,H,W,3), masks (22,H,W) | None) views on one shared-memory slot."""
    height, width = size
    buffer = slots[slot]
    num_frames = SPLIT_NUM_FRAMES[split]
    frames = buffer[: num_frames * height * width * 3].reshape(num_frames, height, width, 3)
    masks = None
    if SPLIT_HAS_MASKS[split]:
        start = NUM_FRAMES * height * width * 3
        masks = buffer[start : start + NUM_FRAMES * height * width].reshape(NUM_FRAMES, height, width)
    return frames, masks


def _deflate_level(codec: str) -> int | None:
    return int(codec.split(":")[1]) if codec.startswith("gzip:") else None


_DECODER_SLOTS: np.ndarray | None = None  # this decoder process's view of the shared slots


def _init_decoder(shared, slot_count: int, slot_bytes: int) -> None:
    global _DECODER_SLOTS
    _DECODER_SLOTS = np.frombuffer(shared, dtype=np.uint8).reshape(slot_count, slot_bytes)


def _decode_into_slot(task, slots: np.ndarray | None = None):
    """Decode one video into its slot; deflate chunks here when gzip is chosen.

    Errors come back as values so the writer decides between stopping and skipping.
    """
    split, video_id, folder, size, slot, frames_codec, masks_codec = task
    slots = _DECODER_SLOTS if slots is None else slots
    frames, masks = _slot_views(slots, slot, split, size)
    try:
        read_video(folder, split, size, frames_out=frames, masks_out=masks)
    except RawDataError as error:
        return ("error", video_id, str(error.path), error.reason)
    frame_chunks = mask_chunks = None
    if (level := _deflate_level(frames_codec)) is not None:
        frame_chunks = [zlib.compress(frame, level) for frame in frames]
    if masks is not None and (level := _deflate_level(masks_codec)) is not None:
        mask_chunks = [zlib.compress(plane, level) for plane in masks]
    return ("ok", video_id, slot, frame_chunks, mask_chunks)


class _Decoder:
    """Decodes tasks in order with ``workers`` processes (0: in this process) into ``slots``.

    At most ``slot_count`` videos are in flight; a slot is reused only after the writer asked for
    the next result, i.e. once it has finished with the video in that slot.
    """

    def __init__(self, workers: int, size: tuple[int, int]):
        self.workers = workers
        self.slot_count = max(2, workers * 3)
        slot_bytes = _slot_bytes(size)
        self.pool = None
        if workers == 0:
            self.slots = np.empty((self.slot_count, slot_bytes), dtype=np.uint8)
        else:
            import multiprocessing

            # spawn: the caller may hold threads (torch, h5py) that make fork unsafe.
            context = multiprocessing.get_context("spawn")
            shared = context.RawArray("B", self.slot_count * slot_bytes)
            self.slots = np.frombuffer(shared, dtype=np.uint8).reshape(self.slot_count, slot_bytes)
            self.pool = context.Pool(workers, initializer=_init_decoder, initargs=(shared, self.slot_count, slot_bytes))

    def results(self, tasks: list) -> Iterator:
        if self.pool is None:
            for index, task in enumerate(tasks):
                yield _decode_into_slot((*task[:4], index % self.slot_count, *task[4:]), self.slots)
            return
        pending: deque = deque()
        next_task = 0
        while next_task < len(tasks) or pending:
            while next_task < len(tasks) and len(pending) < self.slot_count:
                task = tasks[next_task]
                slot_task = (*task[:4], next_task % self.slot_count, *task[4:])
                pending.append(self.pool.apply_async(_decode_into_slot, (slot_task,)))
                next_task += 1
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _write_chunks(dataset, row: int, view: np.ndarray, chunks: list | None, codec: str) -> None:
    """Store one video (T frames, one chunk each) at ``row``."""
    if codec == "lzf":  # no Python lzf codec: HDF5 compresses in this process
        dataset[row] = view
        return
    tail = (0,) * (view.ndim - 1)
    for t in range(view.shape[0]):
        data = view[t] if chunks is None else chunks[t]
        dataset.id.write_direct_chunk((row, t, *tail), data)


def _compression_config(compression: str, mask_compression: str, frame_size) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "frame_size": list(frame_size),
        "compression": {"frames": canonical_compression(compression), "masks": canonical_compression(mask_compression)},
    }


def _plan(
    src: Path, splits: Sequence[str], shard_size: int, on_error: str
) -> tuple[list[_ShardPlan], list[SkippedVideo]]:
    """List videos and check every required file exists, before anything is written."""
    plans: list[_ShardPlan] = []
    skipped: list[SkippedVideo] = []
    for split in splits:
        usable = []
        for video_id, folder in list_videos(src, split):
            absent = missing_files(folder, split)
            if absent:
                reason = "missing mask" if absent[0].name.endswith(".npy") else "missing frame"
                if on_error == "stop":
                    raise RawDataError(absent[0], reason)
                skipped.append(SkippedVideo(split, video_id, str(absent[0]), reason))
                continue
            usable.append((video_id, folder))
        for index in range(math.ceil(len(usable) / shard_size)):
            plans.append(
                _ShardPlan(split, f"{split}-{index:03d}.h5", usable[index * shard_size : (index + 1) * shard_size])
            )
    return plans, skipped


def _completed_records(out: Path, config: dict) -> dict[str, dict]:
    """Shards a previous run finished (from its manifest and journal), keyed by file name."""
    records: dict[str, dict] = {}
    manifest_file = out / MANIFEST_NAME
    if manifest_file.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            payload = json.loads(manifest_file.read_text())
            same = (
                payload.get("format_version") == config["format_version"]
                and payload.get("frame_size") == config["frame_size"]
                and payload.get("compression") == config["compression"]
            )
            if same:
                for shard in payload["shards"]:
                    skipped_here = [s for s in payload.get("skipped", []) if s.get("shard") == shard["path"]]
                    planned = sorted(shard["video_ids"] + [s["video_id"] for s in skipped_here])
                    records[shard["path"]] = {"entry": shard, "planned_ids": planned, "skipped": skipped_here}
    journal_file = out / JOURNAL_NAME
    if journal_file.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            payload = json.loads(journal_file.read_text())
            if payload.get("config") == config:
                records.update(payload["shards"])
    return records


def _record_is_valid(out: Path, plan: _ShardPlan, record: dict | None) -> bool:
    if record is None or record["planned_ids"] != plan.planned_ids:
        return False
    return _check_file(out / plan.name, record["entry"]["bytes"], record["entry"]["sha256"]) is None


def _write_shard(
    out: Path,
    plan: _ShardPlan,
    frame_size: tuple[int, int],
    codecs: dict,
    decoder: _Decoder,
    results: Iterator,
    on_error: str,
    progress: Progress,
) -> tuple[Path, list[int], list[dict]]:
    """Write one shard under its temporary name; returns (tmp path, kept ids, skipped records)."""
    height, width = frame_size
    split = plan.split
    num_frames = SPLIT_NUM_FRAMES[split]
    planned = len(plan.videos)
    tmp_path = out / (plan.name + TMP_SUFFIX)
    kept_ids: list[int] = []
    skipped: list[dict] = []
    try:
        with open_h5(tmp_path, "w") as shard:
            shard.attrs["format"] = FORMAT_NAME
            shard.attrs["format_version"] = FORMAT_VERSION
            shard.attrs["split"] = split
            frames = shard.create_dataset(
                "frames",
                shape=(planned, num_frames, height, width, 3),
                maxshape=(planned, num_frames, height, width, 3),
                dtype=np.uint8,
                chunks=(1, 1, height, width, 3),
                track_times=False,
                **parse_compression(codecs["frames"]),
            )
            masks = None
            if SPLIT_HAS_MASKS[split]:
                masks = shard.create_dataset(
                    "masks",
                    shape=(planned, NUM_FRAMES, height, width),
                    maxshape=(planned, NUM_FRAMES, height, width),
                    dtype=np.uint8,
                    chunks=(1, 1, height, width),
                    track_times=False,
                    **parse_compression(codecs["masks"]),
                )
            for video_id, _ in plan.videos:
                result = next(results)
                if result[1] != video_id:
                    raise RuntimeError(f"decoder returned video {result[1]} while {video_id} was expected")
                if result[0] == "error":
                    _, _, bad_path, reason = result
                    if on_error == "stop":
                        raise RawDataError(bad_path, reason)
                    skipped.append(asdict(SkippedVideo(split, video_id, bad_path, reason, plan.name)))
                else:
                    _, _, slot, frame_chunks, mask_chunks = result
                    frame_view, mask_view = _slot_views(decoder.slots, slot, split, frame_size)
                    row = len(kept_ids)
                    _write_chunks(frames, row, frame_view, frame_chunks, codecs["frames"])
                    if masks is not None:
                        _write_chunks(masks, row, mask_view, mask_chunks, codecs["masks"])
                    kept_ids.append(video_id)
                progress.advance(1)
            if len(kept_ids) < planned:
                frames.resize(len(kept_ids), axis=0)
                if masks is not None:
                    masks.resize(len(kept_ids), axis=0)
            shard.create_dataset("video_ids", data=np.asarray(kept_ids, dtype=np.int64), track_times=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    return tmp_path, kept_ids, skipped


def _finish_shard(tmp_path: Path, final_path: Path) -> tuple[str, int]:
    """Hash a written shard and give it its final name (runs in a thread).

    No fsync of the shard data: a process crash loses nothing (the page cache survives it), and
    after a node crash every shard is checked against its recorded sha256 before it is trusted
    again (resume, --verify, staging), so durability comes from verification; fsyncing hundreds of
    MB per shard would stall the pack on slow disks.
    """
    try:
        digest = sha256_file(tmp_path)
        size = tmp_path.stat().st_size
        os.replace(tmp_path, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    return digest, size


def default_workers() -> int:
    """Decoder processes: the CPUs this job may use (Slurm's allocation first), minus the writer."""
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    cpus = int(slurm_cpus) if slurm_cpus and slurm_cpus.isdigit() else len(os.sched_getaffinity(0))
    return max(cpus - 1, 1)


def pack_dataset(
    src: os.PathLike | str,
    out: os.PathLike | str,
    *,
    splits: Sequence[str] = SPLITS,
    shard_size: int = DEFAULT_SHARD_SIZE,
    compression: str = DEFAULT_COMPRESSION,
    mask_compression: str = DEFAULT_MASK_COMPRESSION,
    frame_size: tuple[int, int] | None = None,
    workers: int | None = None,
    on_error: str = "stop",
    quiet: bool = False,
) -> Manifest:
    """Pack the raw layout under ``src`` into shards plus manifest.json under ``out``.

    ``workers`` decoder processes feed one writer (0: decode in this process). ``on_error="stop"``
    raises ``RawDataError`` naming the first bad file: missing files are found before anything is
    written, and a decode failure removes the shard being written, so no partial shard and no
    manifest is left behind. ``on_error="skip"`` leaves the video out and records it.
    """
    src = Path(src)
    out = Path(out)
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', not {on_error!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, not {shard_size}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected a subset of {SPLITS}")
    if not src.is_dir():
        raise RawDataError(src, "source root does not exist")
    size = tuple(frame_size) if frame_size is not None else source_frame_size(src)
    config = _compression_config(compression, mask_compression, size)  # also validates both settings
    codecs = config["compression"]
    workers = default_workers() if workers is None else max(int(workers), 0)

    plans, skipped = _plan(src, splits, shard_size, on_error)
    if not plans:
        raise RawDataError(src, f"no video folders found for splits {list(splits)} (expected <split>/video_<id>/)")

    carried_shards, carried_skipped = _carried_over(out, splits, config)
    out.mkdir(parents=True, exist_ok=True)
    previous = _completed_records(out, config)
    planned_names = {plan.name for plan in plans}
    for stale in out.iterdir():  # leftovers of a crash, or of an earlier pack of these splits
        match = SHARD_NAME_PATTERN.match(stale.name)
        if stale.name.endswith(".h5" + TMP_SUFFIX) or (
            match and match.group(1) in splits and stale.name not in planned_names
        ):
            stale.unlink()

    records: dict[str, dict] = {}
    pending: list[_ShardPlan] = []
    for plan in plans:
        if _record_is_valid(out, plan, previous.get(plan.name)):
            records[plan.name] = previous[plan.name]
            _log(f"{out / plan.name}: complete and verified, kept", quiet)
        else:
            pending.append(plan)

    journal = {"config": config, "shards": dict(records)}
    atomic_write_json(out / JOURNAL_NAME, journal)
    tasks = [
        (plan.split, vid, str(folder), size, codecs["frames"], codecs["masks"])
        for plan in pending
        for vid, folder in plan.videos
    ]
    if pending:
        _log(
            f"packing {len(tasks)} videos into {len(pending)} shard(s) under {out} "
            f"({len(plans) - len(pending)} kept), {workers} decoder(s), frames {codecs['frames']}, "
            f"masks {codecs['masks']}, frame size {size[0]}x{size[1]}",
            quiet,
        )
        decoder = _Decoder(min(workers, len(tasks)), size)
        results = decoder.results(tasks)

        def finish_and_journal(plan: _ShardPlan, tmp_path: Path, kept_ids: list[int], shard_skipped: list[dict]):
            # Runs in the finisher thread, one shard at a time in shard order; only this thread
            # writes the journal once packing has started.
            digest, nbytes = _finish_shard(tmp_path, out / plan.name)
            entry = asdict(
                ShardEntry(
                    plan.split,
                    plan.name,
                    tuple(kept_ids),
                    nbytes,
                    digest,
                    SPLIT_HAS_MASKS[plan.split],
                    SPLIT_NUM_FRAMES[plan.split],
                )
            )
            entry["video_ids"] = kept_ids
            records[plan.name] = {"entry": entry, "planned_ids": plan.planned_ids, "skipped": shard_skipped}
            journal["shards"][plan.name] = records[plan.name]
            atomic_write_json(out / JOURNAL_NAME, journal)

        finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcvp-shard-finisher")
        finishing = []
        try:
            with Progress(len(tasks), "pack", unit="videos", enabled=not quiet) as progress:
                for plan in pending:
                    written = _write_shard(out, plan, size, codecs, decoder, results, on_error, progress)
                    finishing.append(finisher.submit(finish_and_journal, plan, *written))
        finally:
            results.close()
            decoder.close()
            finisher.shutdown(wait=True)  # shards completed before an error stay journaled and usable
        for future in finishing:
            future.result()  # re-raise a failure to finish a shard (e.g. disk full)

    for plan in plans:
        skipped.extend(SkippedVideo(**s) for s in records[plan.name]["skipped"])
    split_order = {split: index for index, split in enumerate(SPLITS)}
    manifest = Manifest(
        root=out,
        frame_size=size,
        compression=dict(codecs),
        shards=sorted(
            carried_shards + [_shard_from_json(records[plan.name]["entry"]) for plan in plans],
            key=lambda shard: (split_order[shard.split], shard.path),
        ),
        skipped=sorted(carried_skipped + skipped, key=lambda video: (split_order[video.split], video.video_id)),
        source=str(src.resolve()),
    )
    with file_lock(out / LOCK_NAME):
        manifest.pseudo_masks = _surviving_pseudo_masks(out, size)
        write_manifest(out, manifest)
    (out / JOURNAL_NAME).unlink()
    for video in skipped:
        _log(f"skipped {video.split} video {video.video_id}: {video.path}: {video.reason}", quiet)
    totals = manifest.totals()
    _log(f"packed {totals['videos']} videos into {totals['shards']} shard(s), {totals['bytes'] / 1e6:.1f} MB", quiet)
    return manifest


def _carried_over(out: Path, splits: Sequence[str], config: dict) -> tuple[list[ShardEntry], list[SkippedVideo]]:
    """Shards (and skip records) of splits this pack leaves alone, from the manifest already in ``out``.

    Packing ``--splits hidden`` into a directory that holds train/val/unlabeled adds hidden and
    keeps the rest; mixing frame sizes or compressions in one directory is refused.
    """
    try:
        previous = load_manifest(out)
    except ManifestError:
        return [], []
    shards = [shard for shard in previous.shards if shard.split not in splits]
    if not shards:
        return [], []
    if list(previous.frame_size) != config["frame_size"] or previous.compression != config["compression"]:
        kept = sorted({shard.split for shard in shards}, key=SPLITS.index)
        raise ValueError(
            f"{out} already holds {kept} packed at {previous.frame_size[0]}x{previous.frame_size[1]} with "
            f"{previous.compression}; this pack would use {config['frame_size'][0]}x{config['frame_size'][1]} "
            f"with {config['compression']}. Pack those splits again too (--splits) or choose another --out"
        )
    return shards, [video for video in previous.skipped if video.split not in splits]


def _surviving_pseudo_masks(out: Path, frame_size: tuple[int, int]) -> list[PseudoMaskEntry]:
    """Pseudo-mask shards of an earlier manifest in ``out`` that still fit the re-packed frames."""
    try:
        previous = load_manifest(out)
    except ManifestError:
        return []
    if previous.frame_size != tuple(frame_size):
        return []
    return [entry for entry in previous.pseudo_masks if (out / entry.path).exists()]


# ----------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    checked: list[str]
    bad: list[tuple[str, str]]  # (path, reason)

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_dataset(data_dir: os.PathLike | str, quiet: bool = True) -> VerifyReport:
    """Re-hash every shard (and pseudo-mask shard) and compare size and sha256 with the manifest."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    entries = [*manifest.shards, *manifest.pseudo_masks]
    report = VerifyReport(checked=[], bad=[])
    with Progress(len(entries), "verify", unit="shards", enabled=not quiet) as progress:
        for entry in entries:
            path = data_dir / entry.path
            report.checked.append(str(path))
            problem = _check_file(path, entry.bytes, entry.sha256)
            if problem:
                report.bad.append((str(path), problem))
            progress.advance(1)
    return report


def _check_file(path: Path, size: int, sha256: str) -> str | None:
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if actual_size != size:
        return f"size {actual_size} bytes, manifest says {size}"
    actual = sha256_file(path)
    if actual != sha256:
        return f"sha256 {actual[:16]}... does not match the manifest's {sha256[:16]}..."
    return None


# ----------------------------------------------------------------------------- pseudo masks


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
    compression: str = DEFAULT_MASK_COMPRESSION,
) -> list[PseudoMaskEntry]:
    """Store predicted masks for packed videos as mask-only shards and list them in the manifest.

    ``masks`` is an array (N, T, H, W) or an iterable of (T, H, W) arrays in ``video_ids`` order
    (T = 22, or 11 for hidden), any integer dtype with values in 0..48. Later entries take
    precedence where video ids overlap; an entry fully superseded by later ones is removed with its
    file. Concurrent callers (e.g. DDP ranks) are serialised by a lock on the manifest.
    """
    data_dir = Path(data_dir)
    ids = [int(v) for v in video_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("video_ids contains duplicates")
    if not ids:
        raise ValueError("video_ids is empty")
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
            if (m := re.fullmatch(re.escape(prefix) + r"(\d+)\.h5(?:\.tmp)?", name))
        ]
        next_index = max(used, default=-1) + 1
        mask_iter = iter(masks)
        new_entries: list[PseudoMaskEntry] = []
        for start in range(0, len(ids), shard_size):
            chunk_ids = ids[start : start + shard_size]
            name = f"{prefix}{next_index:03d}.h5"
            next_index += 1
            tmp_path = data_dir / (name + TMP_SUFFIX)
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
                final_path = data_dir / name
                digest = sha256_file(tmp_path)
                size = tmp_path.stat().st_size
                os.replace(tmp_path, final_path)
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


# ----------------------------------------------------------------------------- staging


def local_scratch_dir() -> Path | None:
    """Node-local scratch: $SLURM_TMPDIR (set by some sites' Slurm prolog), else $TMPDIR."""
    for variable in ("SLURM_TMPDIR", "TMPDIR"):
        value = os.environ.get(variable)
        if value:
            return Path(value)
    return None


def stage_to_local(
    data_dir: os.PathLike | str,
    dest_root: os.PathLike | str | None = None,
    splits: Sequence[str] | None = None,
    quiet: bool = True,
) -> Path:
    """Copy a packed dataset to node-local disk, checking every shard against the manifest.

    The copy goes to ``<dest_root or $SLURM_TMPDIR or $TMPDIR>/hpcvp-data/<name>-<key>`` (the key
    hashes the manifest and ``splits``); shards already there with the manifest's size and sha256
    are not copied again. ``splits`` limits the copy (and the staged manifest) to those splits, e.g.
    a segmentation stage needs train and val only. Ranks on one node may call this together: a lock
    serialises them and the later ones find the copy done. Returns the staged directory.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    root = Path(dest_root) if dest_root is not None else local_scratch_dir()
    if root is None:
        raise StagingError("no node-local directory: set $SLURM_TMPDIR or $TMPDIR, or pass dest_root")
    manifest_bytes = manifest_path(data_dir).read_bytes()
    key_source = manifest_bytes
    if splits is not None:
        unknown = [s for s in splits if s not in manifest.splits]
        if unknown:
            raise StagingError(f"{data_dir}: split(s) {unknown} are not packed there (packed: {manifest.splits})")
        manifest.shards = [s for s in manifest.shards if s.split in splits]
        manifest.pseudo_masks = [e for e in manifest.pseudo_masks if e.split in splits]
        manifest.skipped = [v for v in manifest.skipped if v.split in splits]
        manifest_bytes = (json.dumps(manifest.to_json(), indent=1) + "\n").encode()
        key_source += ",".join(splits).encode()
    key = hashlib.sha256(key_source).hexdigest()[:12]
    dest = root / "hpcvp-data" / f"{data_dir.resolve().name}-{key}"
    entries = [*manifest.shards, *manifest.pseudo_masks]
    with file_lock(root / "hpcvp-data" / f".{dest.name}.lock"):
        dest.mkdir(parents=True, exist_ok=True)
        staged_manifest = dest / MANIFEST_NAME
        with Progress(len(entries), "stage", unit="shards", enabled=not quiet) as progress:
            for entry in entries:
                target = dest / entry.path
                if _check_file(target, entry.bytes, entry.sha256) is not None:
                    _copy_checked(data_dir / entry.path, target, entry)
                progress.advance(1)
        if not staged_manifest.exists() or staged_manifest.read_bytes() != manifest_bytes:
            atomic_write_bytes(staged_manifest, manifest_bytes)  # last: a staged manifest means complete
    return dest


def _copy_checked(source: Path, target: Path, entry) -> None:
    """Copy ``source`` to ``target`` hashing the bytes on the way; refuse a mismatch with the manifest."""
    tmp = target.with_name(target.name + TMP_SUFFIX)
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as reader, open(tmp, "wb") as writer:
            while block := reader.read(HASH_BLOCK):
                digest.update(block)
                writer.write(block)
        copied = tmp.stat().st_size
        if copied != entry.bytes or digest.hexdigest() != entry.sha256:
            raise StagingError(
                f"{source}: does not match the manifest (bytes {copied} vs {entry.bytes}, "
                f"sha256 {digest.hexdigest()[:16]}... vs {entry.sha256[:16]}...); run --verify and re-pack"
            )
        os.replace(tmp, target)
    except FileNotFoundError:
        raise StagingError(f"{source}: listed in the manifest but missing") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcvp-pack",
        description="Pack the competition's raw layout into sharded HDF5 (+ manifest.json), verify a packed "
        "directory, or stage it to node-local disk.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--src", type=Path, help="raw root holding train/ val/ unlabeled/ hidden/")
    action.add_argument("--verify", type=Path, metavar="DIR", help="re-hash the shards of a packed directory")
    action.add_argument("--stage", type=Path, metavar="DIR", help="copy a packed directory to node-local disk")
    parser.add_argument("--out", type=Path, help="packed output directory (with --src)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoder processes feeding the writer; 0 decodes in the writer (default: CPUs - 1)",
    )
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="videos per shard")
    parser.add_argument("--compression", default=DEFAULT_COMPRESSION, help="frames: none | lzf | gzip:L")
    parser.add_argument("--mask-compression", default=DEFAULT_MASK_COMPRESSION, help="masks: none | lzf | gzip:L")
    parser.add_argument(
        "--frame-size",
        type=parse_frame_size,
        default=None,
        metavar="HxW",
        help="expected frame size (default: hpcvp_synthetic.json 'size' if present, else 160x240)",
    )
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to pack")
    parser.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="bad input: stop naming the file (default) or skip the video and record it",
    )
    parser.add_argument(
        "--stage-dest",
        type=Path,
        default=None,
        help="with --stage: destination root (default $SLURM_TMPDIR, else $TMPDIR)",
    )
    parser.add_argument(
        "--stage-splits", default=None, help="with --stage: comma-separated splits to copy (default: all packed splits)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify is not None:
            report = verify_dataset(args.verify, quiet=args.quiet)
            for path, reason in report.bad:
                print(f"BAD {path}: {reason}", file=sys.stderr)
            print(f"verified {len(report.checked)} shard(s): {len(report.bad)} bad")
            return 0 if report.ok else 1
        if args.stage is not None:
            stage_splits = None if args.stage_splits is None else _split_list(args.stage_splits)
            print(stage_to_local(args.stage, args.stage_dest, splits=stage_splits, quiet=args.quiet))
            return 0
        if args.out is None:
            parser.error("--src needs --out")
        splits = _split_list(args.splits)
        pack_dataset(
            args.src,
            args.out,
            splits=splits,
            shard_size=args.shard_size,
            compression=args.compression,
            mask_compression=args.mask_compression,
            frame_size=args.frame_size,
            workers=args.workers,
            on_error=args.on_error,
            quiet=args.quiet,
        )
        print(manifest_path(args.out))
        return 0
    except (RawDataError, ManifestError, StagingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
