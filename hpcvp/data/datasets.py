"""Map-style datasets over packed shards: clips, single frames, frame pairs, hidden inputs.

Items are dicts of uint8 tensors with channel-last frames plus the ``video_id`` (normalise on the
device with ``frames_to_float``). Every process (main, each DataLoader worker, each DDP rank) opens
its own HDF5 handle on first use: handles are cached per process id, so a handle inherited
through fork is never shared. All datasets have a fixed length and index deterministically, so
``DistributedSampler`` splits them across ranks as usual.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .layout import NUM_FRAMES, NUM_INPUT_FRAMES, SPLIT_NUM_FRAMES, SPLITS
from .manifest import Manifest, load_manifest
from .shard_files import open_h5

MASK_SOURCES = ("true", "pseudo", "any")

# (pid, path) -> open h5py.File / _PlaneReader; entries of other pids were inherited through fork
# and are left alone (the parent still owns them).
_OPEN_FILES: dict[tuple[int, str], object] = {}
_FRAME_READERS: dict[tuple[int, str], _PlaneReader] = {}
_MASK_READERS: dict[tuple[int, str], _PlaneReader] = {}


def shard_handle(path: os.PathLike | str):
    """This process's read-only h5py handle on one shard, opened on first use."""
    key = (os.getpid(), str(path))
    handle = _OPEN_FILES.get(key)
    if handle is None:
        # No chunk cache: items are whole chunks read once in random order, and the cache would
        # only add a copy (and for compressed masks, a slower path).
        handle = open_h5(path, "r", rdcc_nbytes=0)
        _OPEN_FILES[key] = handle
    return handle


def close_shard_handles() -> None:
    """Close this process's handles (e.g. before deleting or replacing shard files)."""
    pid = os.getpid()
    for key in [k for k in _FRAME_READERS if k[0] == pid]:
        _FRAME_READERS.pop(key).close()
    for key in [k for k in _MASK_READERS if k[0] == pid]:
        _MASK_READERS.pop(key).close()
    for key in [k for k in _OPEN_FILES if k[0] == pid]:
        _OPEN_FILES.pop(key).close()


class _PlaneReader:
    """Reads planes (frames or mask planes) of one shard dataset, one chunk per plane.

    For an unfiltered dataset the chunks' byte offsets come from HDF5's own chunk index (read
    once), and a clip becomes one ``preadv`` per run of adjacent chunks straight into the output
    array: close to memcpy speed from the page cache, where h5py slicing pays per-chunk overhead.
    Filtered (compressed) datasets go through HDF5, one ``read_direct`` call per item (all the
    planes of the item in one call, decompressed straight into the output array).
    """

    def __init__(self, path: str, name: str):
        self.dataset = shard_handle(path)[name]
        self.fd = None
        self.offsets = None
        dataset = self.dataset
        self.plane_shape = tuple(dataset.shape[2:])
        self.plane_bytes = int(np.prod(self.plane_shape))
        raw = (
            dataset.dtype == np.uint8
            and dataset.chunks == (1, 1, *self.plane_shape)
            and dataset.id.get_create_plist().get_nfilters() == 0
        )
        if raw and dataset.shape[0] > 0:
            offsets = np.full(dataset.shape[:2], -1, dtype=np.int64)
            sizes = np.zeros(dataset.shape[:2], dtype=np.int64)

            def record(info) -> None:
                offsets[info.chunk_offset[0], info.chunk_offset[1]] = info.byte_offset
                sizes[info.chunk_offset[0], info.chunk_offset[1]] = info.size

            dataset.id.chunk_iter(record)
            if (offsets >= 0).all() and (sizes == self.plane_bytes).all():
                self.offsets = offsets
                self.fd = os.open(path, os.O_RDONLY)

    def read(self, row: int, start: int, stop: int) -> np.ndarray:
        """Planes ``start:stop`` of video ``row`` as a new uint8 array (stop - start, *plane)."""
        out = np.empty((stop - start, *self.plane_shape), dtype=self.dataset.dtype)
        if self.offsets is None:
            if stop > start:
                self.dataset.read_direct(out, np.s_[row, start:stop])
            return out
        flat = out.reshape(stop - start, self.plane_bytes)
        offsets = self.offsets[row]
        t = start
        while t < stop:
            end = t + 1
            while end < stop and offsets[end] == offsets[end - 1] + self.plane_bytes:
                end += 1
            wanted = (end - t) * self.plane_bytes
            got = os.preadv(self.fd, [flat[t - start : end - start]], int(offsets[t]))
            if got != wanted:
                raise OSError(f"{self.dataset.file.filename}: short read of planes {t}..{end - 1} of row {row}")
            t = end
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _plane_reader(cache: dict, path: os.PathLike | str, name: str) -> _PlaneReader:
    key = (os.getpid(), str(path))
    reader = cache.get(key)
    if reader is None:
        reader = _PlaneReader(str(path), name)
        cache[key] = reader
    return reader


def mask_dataset(path: os.PathLike | str):
    """This process's h5py ``masks`` dataset of one shard (true or pseudo masks)."""
    return mask_reader(path).dataset


def mask_reader(path: os.PathLike | str) -> _PlaneReader:
    """This process's reader of the ``masks`` of one shard (true or pseudo masks)."""
    return _plane_reader(_MASK_READERS, path, "masks")


def frame_reader(path: os.PathLike | str) -> _PlaneReader:
    """This process's frame reader for one shard, created on first use."""
    return _plane_reader(_FRAME_READERS, path, "frames")


def frames_to_float(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> ``dtype`` (..., 3, H, W) in [0, 1]; call it after moving to the device."""
    return frames.movedim(-1, -3).to(dtype).div_(255.0)


class SharedMaskCache:
    """Every listed video's 22 mask planes as one uint8 tensor in shared memory.

    Built once in the process that builds the dataset, before DataLoader workers start: forked
    workers inherit the pages, spawned workers receive a handle to the same shared memory (torch's
    multiprocessing pickling), so N workers hold one copy, 1 byte per pixel: 0.84 MB per video,
    11 GB for 13,000 videos (the public solutions' loaders hold int64 masks in every worker, 8x
    that per worker). Items are copies of slices, so no item aliases the cache.
    """

    def __init__(self, refs, frame_size: tuple[int, int]):
        self.tensor = torch.empty((len(refs), NUM_FRAMES, *frame_size), dtype=torch.uint8).share_memory_()
        array = self.tensor.numpy()
        for index, ref in enumerate(refs):
            array[index] = mask_reader(ref.mask_shard).read(ref.mask_row, 0, NUM_FRAMES)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()


@dataclass(frozen=True)
class _VideoRef:
    video_id: int
    shard: str  # absolute path of the frames shard
    row: int
    mask_shard: str | None  # absolute path of the file holding this video's masks
    mask_row: int
    has_flow: bool = False  # the frames shard holds this video's ground-truth flow


def _video_refs(manifest: Manifest, split: str, mask_source: str | None) -> list[_VideoRef]:
    """Videos of ``split`` in manifest order with where their masks live under ``mask_source``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if mask_source is not None and mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {MASK_SOURCES} or None, not {mask_source!r}")
    root = manifest.root
    pseudo: dict[int, tuple[str, int]] = {}
    for entry in manifest.pseudo_for(split):  # later entries override earlier ones
        for row, video_id in enumerate(entry.video_ids):
            pseudo[video_id] = (str(root / entry.path), row)
    refs = []
    for shard in manifest.shards_for(split):
        shard_path = str(root / shard.path)
        for row, video_id in enumerate(shard.video_ids):
            mask_shard, mask_row = None, -1
            if mask_source in ("true", "any") and shard.has_masks:
                mask_shard, mask_row = shard_path, row
            elif mask_source in ("pseudo", "any") and video_id in pseudo:
                mask_shard, mask_row = pseudo[video_id]
            refs.append(_VideoRef(video_id, shard_path, row, mask_shard, mask_row, shard.has_flow))
    return refs


class _ShardDataset(Dataset):
    def __init__(
        self,
        data_dir: os.PathLike | str,
        split: str,
        masks: bool | None,
        mask_source: str | None,
        mask_cache: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.split = split
        manifest = load_manifest(self.data_dir)
        if not manifest.shards_for(split):
            raise ValueError(f"{self.data_dir}: no packed {split!r} shards (packed splits: {manifest.splits})")
        self.frame_size = manifest.frame_size
        self.num_frames = SPLIT_NUM_FRAMES[split]
        refs = _video_refs(manifest, split, mask_source if masks is not False else None)
        with_masks = [ref for ref in refs if ref.mask_shard is not None]
        if masks is None:  # "when available": masks only if the source covers some videos
            masks = bool(with_masks)
        if masks:
            if not with_masks:
                hint = "" if mask_source == "pseudo" else "; use mask_source='pseudo' after the seg stage labels it"
                raise ValueError(f"{self.data_dir}: split {split!r} has no {mask_source} masks{hint}")
            refs = with_masks  # only videos that have masks from the chosen source
        self.with_masks = bool(masks)
        self.mask_source = mask_source if self.with_masks else None
        self.videos = refs
        self.video_ids = [ref.video_id for ref in refs]
        self.mask_cache: SharedMaskCache | None = None
        if mask_cache:
            self.share_masks()

    def _frames(self, ref: _VideoRef, start: int, stop: int) -> np.ndarray:
        return frame_reader(ref.shard).read(ref.row, start, stop)

    def _masks(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Mask planes ``start:stop`` of video ``index`` (a new uint8 tensor), from the shared
        cache when the dataset has one, else from the shard in one read."""
        if self.mask_cache is not None:
            return self.mask_cache.tensor[index, start:stop].clone()
        ref = self.videos[index]
        return torch.from_numpy(mask_reader(ref.mask_shard).read(ref.mask_row, start, stop))

    def share_masks(self) -> SharedMaskCache:
        """Load every listed video's masks once into a shared-memory uint8 tensor (see
        ``SharedMaskCache``); call it before DataLoader workers start. Returns the cache."""
        if not self.with_masks:
            raise ValueError(f"{self.data_dir}: this {self.split!r} dataset reads no masks; nothing to cache")
        if self.mask_cache is None:
            self.mask_cache = SharedMaskCache(self.videos, self.frame_size)
        return self.mask_cache


class ClipDataset(_ShardDataset):
    """One item per video: frames/masks 1-11 as input and 12-22 as target.

    -> {"video_id", "frames_in" (11,H,W,3), "frames_out" (11,H,W,3), "masks_in" (11,H,W),
    "masks_out" (11,H,W)}, keys present as requested.
    """

    def __init__(
        self,
        data_dir: os.PathLike | str,
        split: str,
        frames: bool = True,
        masks: bool = True,
        mask_source: str = "true",
        mask_cache: bool = False,
    ):
        if SPLIT_NUM_FRAMES.get(split) != NUM_FRAMES:
            raise ValueError(f"split {split!r} has only the 11 input frames; use HiddenDataset")
        if not (frames or masks):
            raise ValueError("ClipDataset needs frames=True or masks=True")
        super().__init__(data_dir, split, masks=masks, mask_source=mask_source, mask_cache=mask_cache)
        self.with_frames = frames

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        ref = self.videos[index]
        item = {"video_id": ref.video_id}
        if self.with_frames:
            clip = torch.from_numpy(self._frames(ref, 0, NUM_FRAMES))
            item["frames_in"], item["frames_out"] = clip[:NUM_INPUT_FRAMES], clip[NUM_INPUT_FRAMES:]
        if self.with_masks:
            masks = self._masks(index, 0, NUM_FRAMES)
            item["masks_in"], item["masks_out"] = masks[:NUM_INPUT_FRAMES], masks[NUM_INPUT_FRAMES:]
        return item


class FrameDataset(_ShardDataset):
    """Every frame of every video -> {"video_id", "t", "frame" (H,W,3), "mask" (H,W) when available}.

    ``masks=None`` includes masks when ``mask_source`` has some for this split (then only videos with
    masks are listed); True requires them; False never reads them.
    """

    def __init__(
        self,
        data_dir: os.PathLike | str,
        split: str,
        mask_source: str = "true",
        masks: bool | None = None,
        mask_cache: bool = False,
    ):
        super().__init__(data_dir, split, masks=masks, mask_source=mask_source, mask_cache=mask_cache)

    def __len__(self) -> int:
        return len(self.videos) * self.num_frames

    def __getitem__(self, index: int) -> dict:
        video_index, t = divmod(int(index), self.num_frames)
        if not 0 <= video_index < len(self.videos):
            raise IndexError(index)
        ref = self.videos[video_index]
        item = {"video_id": ref.video_id, "t": t, "frame": torch.from_numpy(self._frames(ref, t, t + 1)[0])}
        if self.with_masks:
            item["mask"] = self._masks(video_index, t, t + 1)[0]
        return item


class PairDataset(_ShardDataset):
    """Consecutive frames (t, t+1) -> {"video_id", "t", "frame0", "frame1", ["mask0", "mask1"], ["flow"]}.

    ``flow`` (ground-truth flow of frame t to t+1, float32 (2, H, W), only synthetic sets have it):
    False never reads it; True requires it (only videos with flow are listed); None includes it
    when every listed video has it.
    """

    def __init__(
        self,
        data_dir: os.PathLike | str,
        split: str,
        mask_source: str = "true",
        masks: bool | None = None,
        mask_cache: bool = False,
        flow: bool | None = False,
    ):
        super().__init__(data_dir, split, masks=masks, mask_source=mask_source, mask_cache=mask_cache)
        if flow:
            with_flow = [ref for ref in self.videos if ref.has_flow]
            if not with_flow:
                raise ValueError(f"{self.data_dir}: split {split!r} has no ground-truth flow (synthetic sets only)")
            self.videos = with_flow
            self.video_ids = [ref.video_id for ref in with_flow]
            if self.mask_cache is not None and len(with_flow) != len(self.mask_cache.tensor):
                # the cache is indexed like self.videos: rebuild it for the narrowed list
                self.mask_cache = None
                self.share_masks()
        self.with_flow = bool(self.videos) and all(ref.has_flow for ref in self.videos) if flow is not False else False

    def __len__(self) -> int:
        return len(self.videos) * (self.num_frames - 1)

    def __getitem__(self, index: int) -> dict:
        video_index, t = divmod(int(index), self.num_frames - 1)
        if not 0 <= video_index < len(self.videos):
            raise IndexError(index)
        ref = self.videos[video_index]
        pair = torch.from_numpy(self._frames(ref, t, t + 2))
        item = {"video_id": ref.video_id, "t": t, "frame0": pair[0], "frame1": pair[1]}
        if self.with_masks:
            masks = self._masks(video_index, t, t + 2)
            item["mask0"], item["mask1"] = masks[0], masks[1]
        if self.with_flow:
            item["flow"] = torch.from_numpy(shard_handle(ref.shard)["flow"][ref.row, t].astype(np.float32))
        return item


class HiddenDataset(_ShardDataset):
    """The 11 given frames of each video -> {"video_id", "frames_in" (11,H,W,3)} (any split)."""

    def __init__(self, data_dir: os.PathLike | str, split: str = "hidden"):
        super().__init__(data_dir, split, masks=False, mask_source=None)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        ref = self.videos[index]
        return {"video_id": ref.video_id, "frames_in": torch.from_numpy(self._frames(ref, 0, NUM_INPUT_FRAMES))}
