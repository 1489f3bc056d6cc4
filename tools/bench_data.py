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
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcvp.data.layout import (
    HEIGHT,
    SPLIT_NUM_FRAMES,
    WIDTH,
    list_videos,
    read_flow,
    read_video,
)

COMPRESSIONS = ("none", "lzf", "gzip:1", "gzip:4", "lz4", "blosc:lz4:5:byte", "blosc:zstd:1:bit")
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


def _decode_plain(task) -> int:
    """What a user would write: Pillow decodes each PNG into an array, numpy loads mask.npy (and
    flow.npy where the folder has one: the packer reads it too)."""
    from PIL import Image

    split, folder, _size = task
    folder = Path(folder)
    count = 0
    for t in range(SPLIT_NUM_FRAMES[split]):
        with Image.open(folder / f"image_{t}.png") as image:
            count += np.asarray(image).shape[0]
    for name in ("mask.npy", "flow.npy"):
        if (folder / name).exists():
            count += np.load(folder / name).shape[0]
    return count


def _decode_hpcvp(task) -> int:
    """hpcvp's own decode path (``read_video``: same Pillow decoder, fewer copies) into memory."""
    split, folder, size = task
    frames, _masks = read_video(folder, split, size)
    if (Path(folder) / "flow.npy").exists():
        read_flow(Path(folder) / "flow.npy", size)
    return frames.shape[0]


def decode_pass(tasks, workers: int, how: str = "plain") -> float:
    """Seconds for ``workers`` processes to decode every video (PNGs + mask.npy), results dropped."""
    function = _decode_plain if how == "plain" else _decode_hpcvp
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for _ in pool.imap(function, tasks, chunksize=1):
            pass
    return time.perf_counter() - start


def without_flow(raw: Path, split: str = "train") -> Path:
    """The competition's files only (PNGs + mask.npy, no synthetic flow.npy): hard links under
    ``<raw>-noflow``, so both sides of (a) read exactly what a user's pack of the real set reads."""
    view = raw.parent / f"{raw.name}-noflow"
    for source in [raw / "hpcvp_synthetic.json", *sorted((raw / split).glob("video_*/*"))]:
        if source.name == "flow.npy" or not source.is_file():
            continue
        target = view / source.relative_to(raw)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
    return view


def with_sensor_noise(raw: Path, split: str = "train", sigma: float = 1.5) -> Path:
    """The competition files with frames the size of the real ones: each PNG re-encoded with
    Gaussian noise (sigma 1.5 grey levels, fixed seed) under ``<raw>-noisy``, mask.npy hard-linked.

    The synthetic renders are flat and compress to ~2.5 KB per frame; the course's rendered frames
    carry render noise and weigh tens of KB, so inflating them is most of a real decode. At sigma
    1.5 a 160x240 frame is ~50 KB."""
    from PIL import Image

    view = raw.parent / f"{raw.name}-noisy"
    rng = np.random.default_rng(0)
    for source in [raw / "hpcvp_synthetic.json", *sorted((raw / split).glob("video_*/*"))]:
        if source.name == "flow.npy" or not source.is_file():
            continue
        target = view / source.relative_to(raw)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix != ".png":
            os.link(source, target)
            continue
        frame = np.asarray(Image.open(source)).astype(np.float32)
        noisy = np.clip(np.rint(frame + rng.normal(0.0, sigma, frame.shape)), 0, 255).astype(np.uint8)
        partial = target.with_name(f".{target.name}.tmp")
        Image.fromarray(noisy).save(partial, format="PNG")
        partial.rename(target)
    return view


def interleaved_rates(candidates: dict, seconds: float, rounds: int) -> dict[str, float]:
    """Median calls/s of each ``name -> (function(i), count)``, measured in alternating rounds.

    The CPUs are shared with other jobs, so every candidate gets a slice of each round and a load
    spike hits all of them alike; the median over rounds discards the worst slices.
    """
    orders = {}
    for name, (function, count) in candidates.items():
        order = list(range(count))
        random.Random(0).shuffle(order)
        orders[name] = order
        function(order[0])  # open files, warm caches
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    cursor = {name: 0 for name in candidates}
    for _ in range(rounds):
        for name, (function, count) in candidates.items():
            done = 0
            start = time.perf_counter()
            while True:
                function(orders[name][cursor[name] % count])
                cursor[name] += 1
                done += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds / rounds and done >= 5:
                    break
            samples[name].append(done / elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


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


class InRamMasks:
    """The strongest public solution's mask loader, re-implemented from its description: every
    mask of the split is loaded into RAM once (one ``torch.load``ed int64 tensor (N, 22, H, W), in
    every DataLoader worker), and an item is one slice of it."""

    def __init__(self, path: Path):
        import torch

        self.masks = torch.load(path)  # int64, as the public solution keeps them

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict:
        masks = self.masks[index]
        return {"masks_in": masks[:11], "masks_out": masks[11:]}


def save_in_ram_masks(dataset, path: Path) -> None:
    """Write the reference loader's file: the dataset's masks as one int64 tensor."""
    import torch

    masks = [torch.cat([dataset[i]["masks_in"], dataset[i]["masks_out"]]) for i in range(len(dataset))]
    torch.save(torch.stack(masks).long(), path)


def worker_items(dataset, batch: int = 4):
    """What one DataLoader worker does per batch: ``batch`` items, then ``default_collate``;
    returns a function of a start index for ``interleaved_rates`` (counts batches)."""
    from torch.utils.data import default_collate

    def run(index: int):
        return default_collate([dataset[(index + k) % len(dataset)] for k in range(batch)])

    return run


# ----------------------------------------------------------------------------- main


def storage_bytes(data_dir: Path, manifest, dataset: str) -> int:
    import h5py

    total = 0
    for shard in manifest.shards:
        with h5py.File(data_dir / shard.path, "r", locking=False) as handle:
            if dataset in handle:
                total += handle[dataset].id.get_storage_size()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=200, help="full-size train videos to generate and pack")
    parser.add_argument("--workers", type=int, default=2, help="largest decoder process count to compare")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hpcvp-bench"))
    parser.add_argument("--seconds", type=float, default=4.0, help="time per candidate in each read comparison")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds per read comparison (median)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of decode/pack (best of)")
    parser.add_argument("--compressions", default=",".join(COMPRESSIONS))
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--only-pack", action="store_true", help="measure (a) only (for quick checks)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="videos per shard in (a) (default: the packer's, 250: 100 videos make one shard, whose "
        "sha256 runs after the last write; in a full pack each shard's hash overlaps the next shard)",
    )
    parser.add_argument(
        "--sources",
        default="competition,noisy,flow",
        help="(a)'s raw sets: competition (no flow.npy), noisy (the same with ~50 KB noisy PNGs, the real "
        "frames' size), flow (synthetic, + flow.npy)",
    )
    args = parser.parse_args(argv)

    # here, not at the top: the decode-only passes' spawned processes re-import this file and
    # should load what a user's decode script would (numpy, Pillow), not the packer
    from hpcvp.data.datasets import ClipDataset, close_shard_handles
    from hpcvp.data.pack import DEFAULT_COMPRESSION, DEFAULT_MASK_COMPRESSION, DEFAULT_SHARD_SIZE, pack_dataset
    from hpcvp.data.synthetic_set import generate_dataset

    raw = args.work_dir / f"raw-{args.videos}"
    size = (HEIGHT, WIDTH)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"generating/checking {args.videos} synthetic {size[0]}x{size[1]} videos under {raw}")
    generate_dataset(raw, {"train": args.videos}, seed=0, size=size, workers=max(args.workers, 1), progress=True)
    videos = list_videos(raw, "train")[: args.videos]
    files, directories = raw_files(raw, videos)
    png_bytes = warm_page_cache(files)
    tasks = [("train", str(folder), size) for _, folder in videos]

    # (a) pack (default settings) vs a decode-only pass over the same files; same decoder process
    # count, alternating. Two sources: the competition's files (PNGs + mask.npy: what a user packs)
    # and the synthetic set as generated (+ flow.npy, which the packer stores and the decode reads).
    shard_size = args.shard_size or DEFAULT_SHARD_SIZE
    all_sources = {
        "competition": ("competition files", without_flow),
        "noisy": ("competition files, frames re-encoded with noise (~50 KB PNGs)", with_sensor_noise),
        "flow": ("synthetic, + flow.npy", None),
    }
    sources = {}
    for key in args.sources.split(","):
        label, view = all_sources[key.strip()]
        sources[f"{label}, shards of {shard_size}"] = view(raw) if view else raw
    rows_a = []
    for source, source_root in sources.items():
        source_tasks = [("train", str(source_root / Path(folder).relative_to(raw)), size) for _, folder, size in tasks]
        for workers in range(1, args.workers + 1):
            pack_dir = args.work_dir / f"packed-a-{workers}"
            decode_times, own_times, pack_times = [], [], []
            for _ in range(args.repeats):
                decode_times.append(decode_pass(source_tasks, workers, "plain"))
                shutil.rmtree(pack_dir, ignore_errors=True)
                start = time.perf_counter()
                pack_dataset(
                    source_root, pack_dir, splits=["train"], workers=workers, shard_size=shard_size, quiet=True
                )
                pack_times.append(time.perf_counter() - start)
                own_times.append(decode_pass(source_tasks, workers, "hpcvp"))
            shutil.rmtree(pack_dir, ignore_errors=True)
            decode_rate, pack_rate = len(tasks) / min(decode_times), len(tasks) / min(pack_times)
            own_rate = len(tasks) / min(own_times)
            # Each pack sits between a Pillow pass and a read_video pass: the median of these paired
            # ratios follows the load less than best-of does.
            paired = statistics.median(d / p for d, p in zip(decode_times, pack_times, strict=True))
            rows_a.append((source, workers, decode_rate, own_rate, pack_rate, paired))
            log(
                f"(a) {source}, workers={workers}: decode (Pillow) {decode_rate:.1f} videos/s, decode (hpcvp "
                f"read_video) {own_rate:.1f} videos/s, pack {pack_rate:.1f} videos/s: {pack_rate / decode_rate:.2f}x "
                f"best-of, {paired:.2f}x median paired; vs read_video {pack_rate / own_rate:.2f}x "
                f"(load {os.getloadavg()[0]:.1f})"
            )

    if args.only_pack:
        return 0

    # (c) every compression applied to frames and masks: pack speed, stored size, read speed.
    compressions = [c.strip() for c in args.compressions.split(",") if c.strip()]
    packed = {}
    pack_rates = {}
    for compression in compressions:
        pack_dir = args.work_dir / f"packed-{compression.replace(':', '')}"
        shutil.rmtree(pack_dir, ignore_errors=True)
        start = time.perf_counter()
        manifest = pack_dataset(
            raw,
            pack_dir,
            splits=["train"],
            compression=compression,
            mask_compression=compression,
            workers=args.workers,
            quiet=True,
        )
        pack_rates[compression] = len(tasks) / (time.perf_counter() - start)
        packed[compression] = (pack_dir, manifest)
        warm_page_cache([pack_dir / s.path for s in manifest.shards])
        log(f"(c) packed {compression}: {pack_rates[compression]:.1f} videos/s")
    frame_candidates, mask_candidates = {}, {}
    for compression, (pack_dir, _) in packed.items():
        frames_only = ClipDataset(pack_dir, "train", frames=True, masks=False)
        masks_only = ClipDataset(pack_dir, "train", frames=False, masks=True)
        frame_candidates[compression] = (frames_only.__getitem__, len(frames_only))
        mask_candidates[compression] = (masks_only.__getitem__, len(masks_only))
    frame_rates = interleaved_rates(frame_candidates, args.seconds * len(frame_candidates), args.rounds)
    mask_rates = interleaved_rates(mask_candidates, args.seconds * len(mask_candidates), args.rounds)
    rows_c = []
    for compression, (pack_dir, manifest) in packed.items():
        rows_c.append(
            (
                compression,
                storage_bytes(pack_dir, manifest, "frames"),
                storage_bytes(pack_dir, manifest, "masks"),
                manifest.totals()["bytes"],
                pack_rates[compression],
                frame_rates[compression],
                mask_rates[compression],
            )
        )
    close_shard_handles()

    # (b) clip reads in one process: shards vs PNG folders vs memcpy of the same bytes, alternating.
    default_dir = args.work_dir / "packed-default"
    shutil.rmtree(default_dir, ignore_errors=True)
    manifest = pack_dataset(raw, default_dir, splits=["train"], workers=args.workers, quiet=True)
    warm_page_cache([default_dir / s.path for s in manifest.shards])
    in_memory = min(len(videos), 64)  # 64 clips = 220 MB: beyond the CPU caches, like the page cache
    preload = ClipDataset(default_dir, "train", frames=True, masks=True)
    frame_sources, mask_sources = [], []
    for i in range(in_memory):
        item = preload[i]
        frame_sources.append(np.concatenate([item["frames_in"].numpy(), item["frames_out"].numpy()]))
        mask_sources.append(np.concatenate([item["masks_in"].numpy(), item["masks_out"].numpy()]))
    png_frames = PngFolderClips(videos, with_masks=False)
    png_both = PngFolderClips(videos, with_masks=True)
    uncompressed_dir = packed["none"][0] if "none" in packed else default_dir
    shard_frames = ClipDataset(uncompressed_dir, "train", frames=True, masks=False)
    default_both = ClipDataset(default_dir, "train", frames=True, masks=True)
    uncompressed_both = ClipDataset(uncompressed_dir, "train", frames=True, masks=True)
    candidates = {
        "png_frames": (png_frames.__getitem__, len(videos)),
        "png_both": (png_both.__getitem__, len(videos)),
        "shard_frames": (shard_frames.__getitem__, len(shard_frames)),
        "shard_both_default": (default_both.__getitem__, len(default_both)),
        "shard_both_none": (uncompressed_both.__getitem__, len(uncompressed_both)),
        "memcpy_frames": (lambda i: frame_sources[i].copy(), in_memory),
        "memcpy_both": (lambda i: (frame_sources[i].copy(), mask_sources[i].copy()), in_memory),
    }
    b = interleaved_rates(candidates, args.seconds * 3, args.rounds)
    close_shard_handles()
    log(f"(b) {b}")

    # (e) mask clips per process: default shards vs the public in-RAM int64 loader vs the shared
    # uint8 cache, each as a DataLoader worker runs it (4 items, then default_collate).
    import torch

    torch.set_num_threads(1)
    reference_path = args.work_dir / f"masks-int64-{args.videos}.pt"
    default_masks = ClipDataset(default_dir, "train", frames=False, masks=True)
    if not reference_path.exists():
        save_in_ram_masks(default_masks, reference_path)
    in_ram = InRamMasks(reference_path)
    cached_masks = ClipDataset(default_dir, "train", frames=False, masks=True, mask_cache=True)
    e_candidates = {
        "in_ram_int64": (worker_items(in_ram), len(in_ram)),
        "shards_default": (worker_items(default_masks), len(default_masks)),
        "shared_cache_u8": (worker_items(cached_masks), len(cached_masks)),
    }
    for key, codec in (("shards_gzip1", "gzip:1"), ("shards_lz4", "lz4")):
        codec_dir = packed.get(codec, (None,))[0]
        if codec_dir is not None:
            codec_masks = ClipDataset(codec_dir, "train", frames=False, masks=True)
            e_candidates[key] = (worker_items(codec_masks), len(codec_masks))
    e_collated = interleaved_rates(e_candidates, args.seconds * len(e_candidates), args.rounds)
    e_items = interleaved_rates(
        {
            "in_ram_int64": (in_ram.__getitem__, len(in_ram)),
            "shards_default": (default_masks.__getitem__, len(default_masks)),
            "shared_cache_u8": (cached_masks.__getitem__, len(cached_masks)),
        },
        args.seconds * 3,
        args.rounds,
    )
    close_shard_handles()
    log(f"(e) collated batches/s {e_collated}; items/s {e_items}")
    del in_ram

    # (d) files and inodes before/after, and projected to the competition's size.
    shard_files = len(manifest.shards) + 1  # + manifest.json
    raw_files_15k = sum(n * 23 if split in ("train", "val") else n * 22 for split, n in COMPETITION_COUNTS.items())
    raw_dirs_15k = sum(COMPETITION_COUNTS.values())
    shards_15k = sum(math.ceil(n / DEFAULT_SHARD_SIZE) for n in COMPETITION_COUNTS.values())
    hidden_shards = math.ceil(COMPETITION_HIDDEN / DEFAULT_SHARD_SIZE)
    frames_per_video = storage_bytes(default_dir, manifest, "frames") / len(tasks)
    masks_per_video = storage_bytes(default_dir, manifest, "masks") / len(tasks)
    projected_bytes = frames_per_video * 15000 + masks_per_video * 2000

    # ----------------------------------------------------------------- markdown
    default_label = f"frames {DEFAULT_COMPRESSION}, masks {DEFAULT_MASK_COMPRESSION}"
    lines = []
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines.append(f"### Data layer (`tools/bench_data.py`), {now}")
    lines.append("")
    lines.append(
        f"Machine: {machine_description()}; work dir {args.work_dir} on {filesystem_of(args.work_dir)}; "
        f"load average at the end {os.getloadavg()[0]:.1f}."
    )
    lines.append(
        f"Data: {len(tasks)} synthetic train videos at {size[0]}x{size[1]} (22 PNG frames + mask.npy each, "
        f"{png_bytes / 1e6:.0f} MB of files), shards of {DEFAULT_SHARD_SIZE} videos. All files in the page "
        "cache for every measurement. The CPUs are shared with other jobs: candidates run alternately "
        "and the table gives best-of (packing) or median-of-rounds (reads), so compare within a table."
    )
    lines.append(
        f"Command: `python tools/bench_data.py --videos {args.videos} --workers {args.workers} "
        f"--seconds {args.seconds:g} --rounds {args.rounds} --repeats {args.repeats}`"
    )
    lines.append("")
    lines.append(
        f"**(a) Packing vs decoding the PNGs** (best of {args.repeats}, alternating; pack = W decoder "
        f"processes + the writer, default settings: {default_label}; decode = W processes decoding "
        "and discarding: Pillow = `np.asarray(Image.open(png))` per frame + `np.load(mask.npy)` (+ "
        "`np.load(flow.npy)` where the folder has one), what a user would write; read_video = hpcvp's own "
        "decode path; competition files = the same set without flow.npy)"
    )
    lines.append("")
    lines.append(
        "| source | decoder processes W | decode-only, Pillow (videos/s) | decode-only, hpcvp read_video (videos/s) "
        "| pack (videos/s) | pack / Pillow decode, best-of (target >= 0.85) | median of paired rounds "
        "| pack / read_video decode |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for source, workers, decode_rate, own_rate, pack_rate, paired in rows_a:
        lines.append(
            f"| {source} | {workers} | {decode_rate:.1f} | {own_rate:.1f} | {pack_rate:.1f} | {pack_rate / decode_rate:.2f}x "
            f"| {paired:.2f}x | {pack_rate / own_rate:.2f}x |"
        )
    lines.append("")
    lines.append(
        "**(b) Clip reads in one process** (what one DataLoader worker gets; random order; clip = 22 "
        "frames, with masks = + 22 mask planes)"
    )
    lines.append("")
    lines.append("| source | clips/s | vs PNG loader (target >= 20x) | vs memcpy (target >= 0.3x uncompressed) |")
    lines.append("|---|---:|---:|---:|")
    rows_b = [
        ("frames: PNG folder decoded per item (competition repos)", "png_frames", "png_frames", "memcpy_frames"),
        ("frames: shards, uncompressed (default)", "shard_frames", "png_frames", "memcpy_frames"),
        (
            "frames: memcpy of the same bytes (numpy copy into a new array)",
            "memcpy_frames",
            "png_frames",
            "memcpy_frames",
        ),
        ("frames + masks: PNG folder + mask.npy per item", "png_both", "png_both", "memcpy_both"),
        (f"frames + masks: shards, default ({default_label})", "shard_both_default", "png_both", "memcpy_both"),
        ("frames + masks: shards, both uncompressed", "shard_both_none", "png_both", "memcpy_both"),
        ("frames + masks: memcpy of the same bytes", "memcpy_both", "png_both", "memcpy_both"),
    ]
    for label, key, png_key, memcpy_key in rows_b:
        lines.append(f"| {label} | {b[key]:.0f} | {b[key] / b[png_key]:.1f}x | {b[key] / b[memcpy_key]:.2f}x |")
    lines.append("")
    lines.append(
        f"**(c) Compression** (the setting applied to frames and masks; stored bytes for {len(tasks)} videos; "
        "reads per process, median of alternating rounds)"
    )
    lines.append("")
    lines.append(
        "| compression | frames (MB) | masks (MB) | shard files vs PNG files | pack (videos/s) "
        "| frame clips/s | mask clips/s |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for compression, frame_bytes, mask_bytes, total_bytes, pack_rate, frame_rate, mask_rate in rows_c:
        lines.append(
            f"| {compression} | {frame_bytes / 1e6:.1f} | {mask_bytes / 1e6:.1f} | "
            f"{total_bytes / png_bytes:.2f}x | {pack_rate:.1f} | {frame_rate:.0f} | {mask_rate:.0f} |"
        )
    lines.append("")
    lines.append(
        "**(e) Mask clips per process** (22 mask planes per clip; as one DataLoader worker runs it: 4 items "
        "then `default_collate`, median of alternating rounds; the in-RAM reference holds every mask as "
        f"int64 in each worker: {len(tasks) * 22 * size[0] * size[1] * 8 / 1e6:.0f} MB here; the shared "
        f"cache holds uint8 once for all workers: {len(tasks) * 22 * size[0] * size[1] / 1e6:.0f} MB)"
    )
    lines.append("")
    lines.append("| source | clips/s (collated) | vs in-RAM int64 (target >= 1.5x) | items/s (no collate) |")
    lines.append("|---|---:|---:|---:|")
    labels_e = {
        "in_ram_int64": "public in-RAM loader: int64 tensor, one slice per item",
        "shards_default": f"shards, default masks {DEFAULT_MASK_COMPRESSION}",
        "shards_lz4": "shards, masks lz4 (the default until 2026-12-04; pseudo-masks' codec)",
        "shards_gzip1": "shards, masks gzip:1 (the default before that)",
        "shared_cache_u8": "shared-RAM uint8 cache (`mask_cache=True`)",
    }
    for key, label in labels_e.items():
        if key in e_collated:
            items = f"{e_items[key]:.0f}" if key in e_items else "-"
            lines.append(
                f"| {label} | {e_collated[key] * 4:.0f} | {e_collated[key] / e_collated['in_ram_int64']:.2f}x | {items} |"
            )
    lines.append("")
    lines.append(
        "Without a collate the reference's item is a view (no bytes move), so its items/s only count "
        "Python overhead; the collated rate is what a worker hands to training."
    )
    lines.append("")
    lines.append("**(d) Files** (the inode quota counts files and directories)")
    lines.append("")
    lines.append("| | raw layout | packed |")
    lines.append("|---|---:|---:|")
    lines.append(
        f"| this run ({len(tasks)} videos) | {len(files):,} files + {directories} dirs | {shard_files} files |"
    )
    lines.append(
        f"| projected: 15,000 videos (1,000 train + 1,000 val + 13,000 unlabeled) | {raw_files_15k:,} files + "
        f"{raw_dirs_15k:,} dirs | {shards_15k + 1} files (target <= 100), ~{projected_bytes / 1e9:.0f} GB "
        f"({default_label}) |"
    )
    lines.append(
        f"| projected: + 2,000 hidden videos (11 frames) | +{COMPETITION_HIDDEN * 11:,} files + "
        f"{COMPETITION_HIDDEN:,} dirs | +{hidden_shards} files |"
    )
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
