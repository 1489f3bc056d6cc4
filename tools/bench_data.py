#!/usr/bin/env python
"""Data-layer benchmark: packing, clip reads and compression, side by side on one machine.

    python tools/bench_data.py --videos 200 --workers 2 --out bench_results/data.md

Generates (once) a full-size synthetic set in the competition layout under --work-dir, then
measures, in one run:
  (a) pack throughput vs a pure PNG-decode pass over the same files (same worker count);
  (b) clip reads/s in one process (what each DataLoader worker does) from shards, vs a loader
      that decodes the PNG folder per item like the competition repos, vs a memcpy of the bytes;
  (c) every compression setting's size, pack speed and read speed;
  (d) files before/after, projected to the competition's 15,000 videos.
Reads are measured with the files in the page cache (steady state after the first epoch or
after staging) for both the PNG folders and the shards. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcvp.data.layout import (  # noqa: E402
    HEIGHT,
    WIDTH,
    list_videos,
    read_video,
)
from hpcvp.data.shards import DEFAULT_SHARD_SIZE, pack_dataset  # noqa: E402

COMPRESSIONS = ("none", "lzf", "gzip:1", "gzip:4", "gzip:9")
COMPETITION_COUNTS = {"train": 1000, "val": 1000, "unlabeled": 13000}  # the 15,000 labelled+unlabelled videos
COMPETITION_HIDDEN = 2000


def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0))
    memory = ""
    try:
        total_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {total_kb / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import h5py
    import torch

    return (
        f"{model}, {cpus} CPUs available{memory}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, h5py {h5py.version.version} (HDF5 {h5py.version.hdf5_version}), torch {torch.__version__}"
    )


def filesystem_of(path: Path) -> str:
    best, fstype = "", "unknown"
    try:
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            if target.startswith(mount) and len(mount) > len(best):
                best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


# ----------------------------------------------------------------------------- helpers


def warm_page_cache(paths) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                total += len(block)
    return total


def raw_files(raw: Path, videos) -> tuple[list[Path], int]:
    files = []
    for _, folder in videos:
        files.extend(sorted(p for p in folder.iterdir() if p.is_file()))
    return files, len(videos)  # files, directories


def _decode_only(task) -> int:
    split, folder, size = task
    frames, masks = read_video(folder, split, size)
    return frames.shape[0]


def decode_pass(tasks, workers: int) -> float:
    """Seconds to decode every video (PNG + mask.npy) and drop the result in the worker."""
    start = time.perf_counter()
    if workers <= 1:
        for task in tasks:
            _decode_only(task)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap(_decode_only, tasks, chunksize=1):
                pass
    return time.perf_counter() - start


def best_of(repeats: int, function) -> float:
    return min(function() for _ in range(repeats))


def rate(function, count: int, seconds: float) -> float:
    """Calls of ``function(i)`` per second for i cycling over 0..count-1 in a shuffled order."""
    order = list(range(count))
    random.Random(0).shuffle(order)
    function(order[0])  # first call opens files
    done = 0
    start = time.perf_counter()
    while True:
        function(order[done % count])
        done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= 20:
            return done / elapsed


class PngFolderClips:
    """The competition repos' loader: decode 22 PNGs (and mask.npy) from the folder per item."""

    def __init__(self, videos, with_masks: bool):
        self.videos = videos
        self.with_masks = with_masks

    def __getitem__(self, index: int) -> dict:
        import torch
        from PIL import Image

        folder = self.videos[index][1]
        frames = np.stack([np.array(Image.open(folder / f"image_{t}.png").convert("RGB")) for t in range(22)])
        item = {"frames": torch.from_numpy(frames)}
        if self.with_masks:
            item["masks"] = torch.from_numpy(np.load(folder / "mask.npy").astype(np.uint8))
        return item


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200, help="full-size train videos to generate and pack")
    parser.add_argument("--workers", type=int, default=2, help="processes for decoding and packing")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hpcvp-bench"))
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each read measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats for the decode/pack timings")
    parser.add_argument("--compressions", default=",".join(COMPRESSIONS))
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)

    from hpcvp.data.datasets import ClipDataset, close_shard_handles
    from hpcvp.data.synthetic import generate_dataset

    raw = args.work_dir / f"raw-{args.videos}"
    size = (HEIGHT, WIDTH)
    print(f"generating/checking {args.videos} synthetic {size[0]}x{size[1]} videos under {raw}", file=sys.stderr)
    generate_dataset(raw, {"train": args.videos}, seed=0, size=size, workers=args.workers, progress=True)
    videos = list_videos(raw, "train")[: args.videos]
    files, directories = raw_files(raw, videos)
    png_bytes = warm_page_cache(files)
    tasks = [("train", str(folder), size) for _, folder in videos]

    # (a) pack vs decode, same workers, both with the PNGs in the page cache.
    rows_a = []
    for workers in sorted({1, args.workers}):
        decode_s = best_of(args.repeats, lambda: decode_pass(tasks, workers))
        pack_dir = args.work_dir / f"packed-a-{workers}"

        def pack_once():
            shutil.rmtree(pack_dir, ignore_errors=True)
            start = time.perf_counter()
            pack_dataset(raw, pack_dir, splits=["train"], compression="none", workers=workers, quiet=True)
            return time.perf_counter() - start

        pack_s = best_of(args.repeats, pack_once)
        shutil.rmtree(pack_dir, ignore_errors=True)
        rows_a.append((workers, len(tasks) / decode_s, len(tasks) / pack_s))
        print(f"(a) workers={workers}: decode {len(tasks) / decode_s:.1f} v/s, pack {len(tasks) / pack_s:.1f} v/s",
              file=sys.stderr)

    # (c) every compression: pack time, size, clip read rate; keep each packed dir for (b).
    rows_c = []
    packed_dirs = {}
    for compression in [c.strip() for c in args.compressions.split(",") if c.strip()]:
        pack_dir = args.work_dir / f"packed-{compression.replace(':', '')}"
        shutil.rmtree(pack_dir, ignore_errors=True)
        start = time.perf_counter()
        manifest = pack_dataset(raw, pack_dir, splits=["train"], compression=compression,
                                mask_compression=compression, workers=args.workers, quiet=True)
        pack_s = time.perf_counter() - start
        packed_dirs[compression] = pack_dir
        shard_bytes = manifest.totals()["bytes"]
        warm_page_cache([pack_dir / s.path for s in manifest.shards])
        frames_only = ClipDataset(pack_dir, "train", frames=True, masks=False)
        masks_only = ClipDataset(pack_dir, "train", frames=False, masks=True)
        frame_rate = rate(lambda i: frames_only[i], len(frames_only), args.seconds)
        mask_rate = rate(lambda i: masks_only[i], len(masks_only), args.seconds)
        rows_c.append((compression, shard_bytes, len(tasks) / pack_s, frame_rate, mask_rate))
        print(f"(c) {compression}: {shard_bytes / 1e6:.0f} MB, pack {len(tasks) / pack_s:.1f} v/s, "
              f"frame clips {frame_rate:.0f}/s, mask clips {mask_rate:.0f}/s", file=sys.stderr)
        close_shard_handles()

    # (b) clip reads per process: default-format shards vs PNG folders vs memcpy of the same bytes.
    from hpcvp.data.shards import DEFAULT_COMPRESSION, DEFAULT_MASK_COMPRESSION

    default_dir = args.work_dir / "packed-default"
    shutil.rmtree(default_dir, ignore_errors=True)
    manifest = pack_dataset(raw, default_dir, splits=["train"], workers=args.workers, quiet=True)
    warm_page_cache([default_dir / s.path for s in manifest.shards])
    uncompressed = packed_dirs.get("none")
    rows_b = []
    png_frames = PngFolderClips(videos, with_masks=False)
    png_both = PngFolderClips(videos, with_masks=True)
    png_frames_rate = rate(lambda i: png_frames[i], len(videos), args.seconds)
    png_both_rate = rate(lambda i: png_both[i], len(videos), args.seconds)
    # memcpy baseline: the same bytes already in memory, copied into a fresh array per item.
    in_memory = min(len(videos), 64)  # 64 clips = 160 MB: beyond the CPU caches, like the page cache
    preload = ClipDataset(default_dir, "train", frames=True, masks=True)
    frame_sources, mask_sources = [], []
    for i in range(in_memory):
        item = preload[i]
        frame_sources.append(np.concatenate([item["frames_in"].numpy(), item["frames_out"].numpy()]))
        mask_sources.append(np.concatenate([item["masks_in"].numpy(), item["masks_out"].numpy()]))
    close_shard_handles()
    memcpy_frames_rate = rate(lambda i: frame_sources[i].copy(), in_memory, args.seconds)
    memcpy_both_rate = rate(lambda i: (frame_sources[i].copy(), mask_sources[i].copy()), in_memory, args.seconds)
    for label, data_dir in [("shards, frames none (uncompressed)", uncompressed),
                            (f"shards, default (frames {DEFAULT_COMPRESSION}, masks {DEFAULT_MASK_COMPRESSION})",
                             default_dir)]:
        if data_dir is None:
            continue
        frames_only = ClipDataset(data_dir, "train", frames=True, masks=False)
        both = ClipDataset(data_dir, "train", frames=True, masks=True)
        frames_rate = rate(lambda i: frames_only[i], len(frames_only), args.seconds)
        both_rate = rate(lambda i: both[i], len(both), args.seconds)
        rows_b.append((label, frames_rate, both_rate))
        close_shard_handles()
    print(f"(b) png {png_frames_rate:.1f}/{png_both_rate:.1f}, memcpy {memcpy_frames_rate:.0f}/{memcpy_both_rate:.0f}, "
          f"shards {rows_b}", file=sys.stderr)

    # (d) files and inodes before/after, and projected to the competition's size.
    shard_files = len(manifest.shards) + 1  # + manifest.json
    bytes_per_video = manifest.totals()["bytes"] / len(tasks)
    raw_files_15k = sum(n * 23 if split in ("train", "val") else n * 22 for split, n in COMPETITION_COUNTS.items())
    raw_dirs_15k = sum(COMPETITION_COUNTS.values())
    shards_15k = sum(math.ceil(n / DEFAULT_SHARD_SIZE) for n in COMPETITION_COUNTS.values())
    hidden_shards = math.ceil(COMPETITION_HIDDEN / DEFAULT_SHARD_SIZE)

    # ----------------------------------------------------------------- markdown
    lines = []
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines.append(f"### Data layer (`tools/bench_data.py`), {now}")
    lines.append("")
    lines.append(f"Machine: {machine_description()}; work dir {args.work_dir} on {filesystem_of(args.work_dir)}.")
    lines.append(f"Data: {len(tasks)} synthetic train videos at {size[0]}x{size[1]} (22 PNG frames + mask.npy each, "
                 f"{png_bytes / 1e6:.0f} MB of files), shards of {DEFAULT_SHARD_SIZE} videos. Files in the page cache "
                 f"for every read measurement; other jobs may share the CPUs, so compare rows side by side.")
    lines.append(f"Command: `python tools/bench_data.py --videos {args.videos} --workers {args.workers} "
                 f"--seconds {args.seconds:g} --repeats {args.repeats}`")
    lines.append("")
    lines.append("**(a) Packing vs decoding the PNGs** (best of %d; same videos, same worker count)" % args.repeats)
    lines.append("")
    lines.append("| workers | PNG+mask decode pass (videos/s) | pack, frames uncompressed (videos/s) | pack / decode (target >= 0.8) |")
    lines.append("|---:|---:|---:|---:|")
    for workers, decode_rate, pack_rate in rows_a:
        lines.append(f"| {workers} | {decode_rate:.1f} | {pack_rate:.1f} | {pack_rate / decode_rate:.2f}x |")
    lines.append("")
    lines.append("**(b) Clip reads per process** (one DataLoader worker's view; random order; clip = 22 frames)")
    lines.append("")
    lines.append("| source | frame clips/s | vs PNG loader (target >= 20x) | vs memcpy (target >= 0.3x) "
                 "| frame+mask clips/s | vs PNG loader | vs memcpy |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    lines.append(f"| PNG folder decoded per item (competition repos) | {png_frames_rate:.1f} | 1x | "
                 f"{png_frames_rate / memcpy_frames_rate:.3f}x | {png_both_rate:.1f} | 1x | {png_both_rate / memcpy_both_rate:.3f}x |")
    for label, frames_rate, both_rate in rows_b:
        lines.append(f"| {label} | {frames_rate:.0f} | {frames_rate / png_frames_rate:.0f}x | "
                     f"{frames_rate / memcpy_frames_rate:.2f}x | {both_rate:.0f} | {both_rate / png_both_rate:.0f}x | "
                     f"{both_rate / memcpy_both_rate:.2f}x |")
    lines.append(f"| memcpy of the same bytes (numpy copy into a new array) | {memcpy_frames_rate:.0f} | "
                 f"{memcpy_frames_rate / png_frames_rate:.0f}x | 1x | {memcpy_both_rate:.0f} | "
                 f"{memcpy_both_rate / png_both_rate:.0f}x | 1x |")
    lines.append("")
    lines.append("**(c) Compression** (same setting for frames and masks; sizes include masks and video ids)")
    lines.append("")
    lines.append("| compression | shard bytes (MB) | vs PNG files | pack (videos/s) | frame clips/s | mask clips/s |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for compression, shard_bytes, pack_rate, frame_rate, mask_rate in rows_c:
        lines.append(f"| {compression} | {shard_bytes / 1e6:.0f} | {shard_bytes / png_bytes:.2f}x | {pack_rate:.1f} | "
                     f"{frame_rate:.0f} | {mask_rate:.0f} |")
    lines.append(f"| default: frames {DEFAULT_COMPRESSION}, masks {DEFAULT_MASK_COMPRESSION} | "
                 f"{manifest.totals()['bytes'] / 1e6:.0f} | {manifest.totals()['bytes'] / png_bytes:.2f}x | | "
                 f"{rows_b[-1][1]:.0f} | |")
    lines.append("")
    lines.append("**(d) Files** (inode quota counts files and directories)")
    lines.append("")
    lines.append("| | raw layout | packed |")
    lines.append("|---|---:|---:|")
    lines.append(f"| this run ({len(tasks)} videos) | {len(files)} files + {directories} dirs | {shard_files} files |")
    lines.append(f"| projected: 15,000 videos (1,000 train + 1,000 val + 13,000 unlabeled) | {raw_files_15k:,} files + "
                 f"{raw_dirs_15k:,} dirs | {shards_15k + 1} files (target <= 100), ~{bytes_per_video * 15000 / 1e9:.0f} GB |")
    lines.append(f"| projected: + 2,000 hidden videos (11 frames) | +{COMPETITION_HIDDEN * 11:,} files + "
                 f"{COMPETITION_HIDDEN:,} dirs | +{hidden_shards} files |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
