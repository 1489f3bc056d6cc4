"""Packing the raw layout into sharded HDF5 plus manifest.json (see ``manifest`` for the format).

Packing is resumable and reproducible: every shard is written under a temporary name private to
the writer and renamed when complete; a journal records each finished shard's hash, so a re-run
keeps the shards that are complete and verified and rewrites the rest. HDF5 timestamps are
disabled (``track_times=False``) and the write order is fixed, so a resumed pack is byte-identical
to an uninterrupted one.

One packer per output directory: the packer holds an ``flock`` on ``<out>/.pack.lock`` for the
whole run and a second one refuses at once, naming the holder. The kernel drops the lock when the
holder dies, even by SIGKILL, so a killed packer never blocks the next run.

Pipeline: decoder processes (``pack_decode``) fill shared-memory slots; this process writes each
slot into the shard with direct chunk writes; a background thread hashes and renames each finished
shard while the next one is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hpcvp.atomic import atomic_write_json, temporary_name
from hpcvp.progress import Progress

from .layout import (
    FLOW_FILE_NAME,
    HEIGHT,
    NUM_FRAMES,
    SPLIT_HAS_MASKS,
    SPLIT_NUM_FRAMES,
    SPLITS,
    SYNTHETIC_INFO_FILE_NAME,
    WIDTH,
    RawDataError,
    missing_files,
    scan_split,
)
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_NAME_PATTERN,
    IgnoredEntry,
    Manifest,
    ManifestError,
    PseudoMaskEntry,
    ShardEntry,
    SkippedVideo,
    checksum_from_json,
    load_manifest,
    shard_from_json,
    write_manifest,
)
from .pack_decode import Decoder, slot_views
from .shard_files import (
    canonical_compression,
    check_file,
    file_lock,
    open_h5,
    parse_compression,
    publish_shard,
)

JOURNAL_NAME = ".pack-journal.json"
OUTPUT_LOCK_NAME = ".pack.lock"
DEFAULT_SHARD_SIZE = 250
# Chosen from tools/bench_data.py (BENCHMARKS.md): uncompressed frames read ~5x faster than lzf or
# gzip (page cache -> array with one preadv). Train/val masks are stored raw too: they read fastest
# (1.3x LZ4's mask clips/s), the decoders spend no CPU compressing them (with 2 decoders on 2 cores
# LZ4 cost 0.1 s per 100 videos, what kept the pack below 0.85x a decode-only pass), and they add
# 0.84 MB per labelled video: 1.7 GB for the 2,000 labelled videos, ~4 % of a full pack's 40 GB.
DEFAULT_COMPRESSION = "none"
DEFAULT_MASK_COMPRESSION = "none"
# Pseudo-masks (13,000 unlabelled videos) stay small: hdf5plugin's LZ4 filter stores them ~24x smaller
# than raw (~1.8x gzip:1's size: 0.44 GB for 13,000 videos) and inflates ~3.5x faster than gzip:1.
PSEUDO_MASK_COMPRESSION = "lz4"


def flow_compression(mask_compression: str) -> str:
    """The codec of a shard's ground-truth flow (synthetic sets): the masks' codec, LZ4 when masks
    are stored raw (float16 flow is mostly zeros; raw it would be 3.2 MB per video at 160x240)."""
    return "lz4" if mask_compression == "none" else mask_compression


# A shard's temporary file: ours is ``.<shard>.tmp-<pid>``; ``<shard>.tmp`` is an older packer's.
SHARD_TMP_PATTERN = re.compile(r"^\.?(train|val|unlabeled|hidden)-\d{3,}\.h5\.tmp(?:-\d+)?$")


class PackError(RuntimeError):
    """The pack could not be done or did not come out whole; the message names the directory."""


class PackLockedError(PackError):
    """Another packer holds the output directory."""


# ----------------------------------------------------------------------------- small helpers


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


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    # Warnings are not progress: printed even with quiet, so nothing is dropped silently.
    print(f"warning: {message}", file=sys.stderr, flush=True)


def default_workers() -> int:
    """Decoder processes: the CPUs this job may use (Slurm's allocation first), minus the writer."""
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    cpus = int(slurm_cpus) if slurm_cpus and slurm_cpus.isdigit() else len(os.sched_getaffinity(0))
    return max(cpus - 1, 1)


# ----------------------------------------------------------------------------- one packer per --out


def _holder_record() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": job,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe_holder(lock_path: Path, wait_s: float = 2.0) -> str:
    """'host H, pid P, Slurm job J, since T' from a lock file. The holder writes its record just
    after taking the lock, so a packer refused in between finds the file empty or mid-write: read
    again for up to ``wait_s`` before giving up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(lock_path.read_text())
            parts = [f"host {holder['host']}", f"pid {holder['pid']}"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "holder not recorded yet"
            time.sleep(0.05)
    parts.append(f"Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "not a Slurm job")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.pack.lock`` for the block; raise ``PackLockedError`` at once if it is held.

    The file stays (removing it would let a third packer lock a new inode while the second still
    holds the old one); only the flock means "held", and it dies with its process.
    """
    path = out / OUTPUT_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PackLockedError(
                f"{out}: another packer is writing this directory ({describe_holder(path)}); "
                "wait for it to finish, or choose another --out"
            ) from None
        except OSError as error:  # a filesystem without flock (some Lustre mounts): go on, unguarded
            _warn(f"{path}: cannot lock ({error.strerror}); make sure no other packer writes {out}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_record()) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------- packing


@dataclass
class _ShardPlan:
    split: str
    name: str
    videos: list[tuple[int, Path]]

    @property
    def planned_ids(self) -> list[int]:
        return [video_id for video_id, _ in self.videos]


def _stores_flow(plan: _ShardPlan) -> bool:
    """Optional ground-truth flow (synthetic sets): a shard stores it when every video has it."""
    return (
        SPLIT_HAS_MASKS[plan.split]
        and bool(plan.videos)
        and all((folder / FLOW_FILE_NAME).is_file() for _, folder in plan.videos)
    )


def _write_chunks(dataset, row: int, view: np.ndarray, chunks: list | None, codec: str) -> None:
    """Store one video (T frames, one chunk each) at ``row``: the decoder's compressed chunks, or
    the slot's bytes as they are (``none``), or through HDF5's filter here (lzf, blosc)."""
    if codec != "none" and chunks is None:  # lzf, lz4, blosc: HDF5's filter compresses in this process
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
) -> tuple[list[_ShardPlan], list[SkippedVideo], list[IgnoredEntry]]:
    """List videos and check every required file exists, before anything is written."""
    plans: list[_ShardPlan] = []
    skipped: list[SkippedVideo] = []
    ignored: list[IgnoredEntry] = []
    for split in splits:
        scan = scan_split(src, split)
        ignored.extend(IgnoredEntry(split, str(path), why) for path, why in scan.ignored)
        usable = []
        for video_id, folder in scan.videos:
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
    return plans, skipped, ignored


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
    return check_file(out / plan.name, record["entry"]["bytes"], checksum_from_json(record["entry"])) is None


def _write_shard(
    out: Path,
    plan: _ShardPlan,
    frame_size: tuple[int, int],
    codecs: dict,
    decoder: Decoder,
    results: Iterator,
    on_error: str,
    progress: Progress,
    stores_flow: bool,
) -> tuple[Path, list[int], list[dict], bool]:
    """Write one shard under its temporary name; returns (tmp path, kept ids, skipped records, has flow)."""
    height, width = frame_size
    split = plan.split
    num_frames = SPLIT_NUM_FRAMES[split]
    planned = len(plan.videos)
    tmp_path = temporary_name(out / plan.name)
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
            flow = None
            flow_codec = flow_compression(codecs["masks"])
            if stores_flow:  # decoded and compressed by the decoders, like the masks
                flow = shard.create_dataset(
                    "flow",
                    shape=(planned, NUM_FRAMES - 1, 2, height, width),
                    maxshape=(planned, NUM_FRAMES - 1, 2, height, width),
                    dtype=np.float16,
                    chunks=(1, 1, 2, height, width),
                    track_times=False,
                    **parse_compression(flow_codec),
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
                    _, _, slot, chunks = result
                    frame_view, mask_view, flow_view = slot_views(
                        decoder.slots, slot, split, frame_size, decoder.with_flow
                    )
                    row = len(kept_ids)
                    _write_chunks(frames, row, frame_view, chunks["frames"], codecs["frames"])
                    if masks is not None:
                        _write_chunks(masks, row, mask_view, chunks["masks"], codecs["masks"])
                    if flow is not None:
                        _write_chunks(flow, row, flow_view, chunks["flow"], flow_codec)
                    kept_ids.append(video_id)
                progress.advance(1)
            if len(kept_ids) < planned:
                frames.resize(len(kept_ids), axis=0)
                if masks is not None:
                    masks.resize(len(kept_ids), axis=0)
                if flow is not None:
                    flow.resize(len(kept_ids), axis=0)
            shard.create_dataset("video_ids", data=np.asarray(kept_ids, dtype=np.int64), track_times=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    return tmp_path, kept_ids, skipped, flow is not None


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
    workers = default_workers() if workers is None else max(int(workers), 0)

    plans, skipped, ignored = _plan(src, splits, shard_size, on_error)
    for entry in ignored:
        _warn(f"{entry.path}: {entry.reason}; not packed (listed under 'ignored' in the manifest)")
    if not plans:
        raise RawDataError(src, f"no video folders found for splits {list(splits)} (expected <split>/video_<id>/)")
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        manifest = _pack_locked(src, out, plans, skipped, ignored, splits, size, config, workers, on_error, quiet)
    totals = manifest.totals()
    _log(f"packed {totals['videos']} videos into {totals['shards']} shard(s), {totals['bytes'] / 1e6:.1f} MB", quiet)
    return manifest


def _pack_locked(
    src: Path,
    out: Path,
    plans: list[_ShardPlan],
    skipped: list[SkippedVideo],
    ignored: list[IgnoredEntry],
    splits: Sequence[str],
    size: tuple[int, int],
    config: dict,
    workers: int,
    on_error: str,
    quiet: bool,
) -> Manifest:
    """The part of ``pack_dataset`` that reads and writes ``out``: run only under its output lock."""
    codecs = config["compression"]
    carried_shards, carried_skipped, carried_ignored = _carried_over(out, splits, config)
    previous = _completed_records(out, config)
    planned_names = {plan.name for plan in plans}
    for stale in out.iterdir():  # leftovers of a killed packer, or of an earlier pack of these splits
        match = SHARD_NAME_PATTERN.match(stale.name)
        if SHARD_TMP_PATTERN.match(stale.name) or (
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
    atomic_write_json(out / JOURNAL_NAME, journal, indent=1)
    stores_flow = {plan.name: _stores_flow(plan) for plan in pending}
    flow_codec = flow_compression(codecs["masks"])
    tasks = [
        (
            plan.split,
            vid,
            str(folder),
            size,
            codecs["frames"],
            codecs["masks"],
            flow_codec if stores_flow[plan.name] else None,
        )
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
        decoder = Decoder(min(workers, len(tasks)), size, with_flow=any(stores_flow.values()))
        results = decoder.results(tasks)

        def finish_and_journal(
            plan: _ShardPlan, tmp_path: Path, kept_ids: list[int], shard_skipped: list[dict], has_flow: bool
        ):
            # Runs in the finisher thread, one shard at a time in shard order; only this thread
            # writes the journal once packing has started.
            digest, nbytes = publish_shard(tmp_path, out / plan.name)
            entry = asdict(
                ShardEntry(
                    plan.split,
                    plan.name,
                    tuple(kept_ids),
                    nbytes,
                    digest,
                    SPLIT_HAS_MASKS[plan.split],
                    SPLIT_NUM_FRAMES[plan.split],
                    has_flow,
                )
            )
            entry["video_ids"] = kept_ids
            records[plan.name] = {"entry": entry, "planned_ids": plan.planned_ids, "skipped": shard_skipped}
            journal["shards"][plan.name] = records[plan.name]
            atomic_write_json(out / JOURNAL_NAME, journal, indent=1)

        finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcvp-shard-finisher")
        finishing = []
        try:
            with Progress(len(tasks), "pack", unit="videos", enabled=not quiet) as progress:
                for plan in pending:
                    written = _write_shard(
                        out, plan, size, codecs, decoder, results, on_error, progress, stores_flow[plan.name]
                    )
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
            carried_shards + [shard_from_json(records[plan.name]["entry"]) for plan in plans],
            key=lambda shard: (split_order[shard.split], shard.path),
        ),
        skipped=sorted(carried_skipped + skipped, key=lambda video: (split_order[video.split], video.video_id)),
        ignored=sorted(carried_ignored + ignored, key=lambda entry: (split_order[entry.split], entry.path)),
        source=str(src.resolve()),
    )
    with file_lock(out / LOCK_NAME):
        manifest.pseudo_masks = _surviving_pseudo_masks(out, size)
        write_manifest(out, manifest)
        _check_manifest_matches(out, manifest)
    (out / JOURNAL_NAME).unlink()
    for video in skipped:
        _log(f"skipped {video.split} video {video.video_id}: {video.path}: {video.reason}", quiet)
    return manifest


def _check_manifest_matches(out: Path, manifest: Manifest) -> None:
    """The last step before success: the manifest on disk is the one written, and every file it
    lists has its recorded size. The checksum of each shard of this pack was taken from the bytes
    renamed into place (or re-checked when a shard was kept), under the output lock."""
    problems = []
    try:
        on_disk = load_manifest(out).to_json()
    except ManifestError as error:
        on_disk = None
        problems.append(str(error))
    if on_disk is not None and on_disk != manifest.to_json():
        problems.append(f"{out / MANIFEST_NAME} is not the manifest this packer wrote")
    for entry in [*manifest.shards, *manifest.pseudo_masks]:
        try:
            actual = (out / entry.path).stat().st_size
        except FileNotFoundError:
            problems.append(f"{out / entry.path}: missing")
            continue
        if actual != entry.bytes:
            problems.append(f"{out / entry.path}: {actual} bytes, the manifest says {entry.bytes}")
    if problems:
        raise PackError(f"{out}: the packed set does not match its manifest: {'; '.join(problems)}; pack again")


def _carried_over(
    out: Path, splits: Sequence[str], config: dict
) -> tuple[list[ShardEntry], list[SkippedVideo], list[IgnoredEntry]]:
    """Shards (and skip and ignore records) of splits this pack leaves alone, from the manifest already in ``out``.

    Packing ``--splits hidden`` into a directory that holds train/val/unlabeled adds hidden and
    keeps the rest; mixing frame sizes or compressions in one directory is refused.
    """
    try:
        previous = load_manifest(out)
    except ManifestError:
        return [], [], []
    shards = [shard for shard in previous.shards if shard.split not in splits]
    if not shards:
        return [], [], []
    if list(previous.frame_size) != config["frame_size"] or previous.compression != config["compression"]:
        kept = sorted({shard.split for shard in shards}, key=SPLITS.index)
        raise ValueError(
            f"{out} already holds {kept} packed at {previous.frame_size[0]}x{previous.frame_size[1]} with "
            f"{previous.compression}; this pack would use {config['frame_size'][0]}x{config['frame_size'][1]} "
            f"with {config['compression']}. Pack those splits again too (--splits) or choose another --out"
        )
    return (
        shards,
        [video for video in previous.skipped if video.split not in splits],
        [entry for entry in previous.ignored if entry.split not in splits],
    )


def _surviving_pseudo_masks(out: Path, frame_size: tuple[int, int]) -> list[PseudoMaskEntry]:
    """Pseudo-mask shards of an earlier manifest in ``out`` that still fit the re-packed frames."""
    try:
        previous = load_manifest(out)
    except ManifestError:
        return []
    if previous.frame_size != tuple(frame_size):
        return []
    return [entry for entry in previous.pseudo_masks if (out / entry.path).exists()]
