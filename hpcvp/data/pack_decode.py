"""The packer's decoders: ``workers`` processes read PNG folders straight into shared-memory slots
(and deflate chunks themselves when gzip is chosen), so the writer only copies finished chunks."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np

from .layout import NUM_FRAMES, SPLIT_HAS_MASKS, SPLIT_NUM_FRAMES, RawDataError, read_video
from .shard_files import chunk_encoder


def _slot_bytes(size: tuple[int, int]) -> int:
    height, width = size
    return NUM_FRAMES * height * width * 4  # 22 RGB frames + 22 mask planes


def slot_views(slots: np.ndarray, slot: int, split: str, size: tuple[int, int]):
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


_ENCODERS: dict = {}


def _encoder(codec: str):
    """This process's chunk encoder for ``codec`` (None: HDF5 compresses in the writer)."""
    if codec not in _ENCODERS:
        _ENCODERS[codec] = chunk_encoder(codec)
    return _ENCODERS[codec]


_DECODER_SLOTS: np.ndarray | None = None  # this decoder process's view of the shared slots


def _init_decoder(shared, slot_count: int, slot_bytes: int) -> None:
    global _DECODER_SLOTS
    _DECODER_SLOTS = np.frombuffer(shared, dtype=np.uint8).reshape(slot_count, slot_bytes)


def _decode_into_slot(task, slots: np.ndarray | None = None):
    """Decode one video into its slot; compress chunks here when the codec allows (gzip, lz4).

    Errors come back as values so the writer decides between stopping and skipping.
    """
    split, video_id, folder, size, slot, frames_codec, masks_codec = task
    slots = _DECODER_SLOTS if slots is None else slots
    frames, masks = slot_views(slots, slot, split, size)
    try:
        read_video(folder, split, size, frames_out=frames, masks_out=masks)
    except RawDataError as error:
        return ("error", video_id, str(error.path), error.reason)
    frame_chunks = mask_chunks = None
    if (encode := _encoder(frames_codec)) is not None:
        frame_chunks = [encode(frame) for frame in frames]
    if masks is not None and (encode := _encoder(masks_codec)) is not None:
        mask_chunks = [encode(plane) for plane in masks]
    return ("ok", video_id, slot, frame_chunks, mask_chunks)


class Decoder:
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
