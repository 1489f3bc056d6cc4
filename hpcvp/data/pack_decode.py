"""The packer's decoders: ``workers`` processes read PNG folders (and mask.npy, and flow.npy where
the shard stores flow) straight into shared-memory slots and compress the chunks themselves when
the codec allows (gzip, lz4), so the single writer only writes finished chunks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .layout import FLOW_FILE_NAME, NUM_FRAMES, SPLIT_HAS_MASKS, SPLIT_NUM_FRAMES, RawDataError, read_flow, read_video
from .shard_files import chunk_encoder


def _slot_bytes(size: tuple[int, int], with_flow: bool) -> int:
    height, width = size
    flow = (NUM_FRAMES - 1) * 2 * height * width * 2 if with_flow else 0  # float16 (21, 2, H, W)
    return NUM_FRAMES * height * width * 4 + flow  # 22 RGB frames + 22 mask planes (+ flow)


def slot_views(slots: np.ndarray, slot: int, split: str, size: tuple[int, int], with_flow: bool = False):
    """(frames (T,H,W,3), masks (22,H,W) | None, flow float16 (21,2,H,W) | None) views on one
    shared-memory slot; ``flow`` only when ``with_flow`` (the slots were made with room for it)."""
    height, width = size
    buffer = slots[slot]
    num_frames = SPLIT_NUM_FRAMES[split]
    frames = buffer[: num_frames * height * width * 3].reshape(num_frames, height, width, 3)
    masks = flow = None
    start = NUM_FRAMES * height * width * 3
    if SPLIT_HAS_MASKS[split]:
        masks = buffer[start : start + NUM_FRAMES * height * width].reshape(NUM_FRAMES, height, width)
    if with_flow:
        start += NUM_FRAMES * height * width
        flow_bytes = buffer[start : start + (NUM_FRAMES - 1) * 2 * height * width * 2]
        flow = flow_bytes.view(np.float16).reshape(NUM_FRAMES - 1, 2, height, width)
    return frames, masks, flow


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

    ``flow_codec`` (None: the shard stores no flow) is the flow's codec (pack.flow_compression).
    Errors come back as values so the writer decides between stopping and skipping.
    """
    split, video_id, folder, size, slot, frames_codec, masks_codec, flow_codec = task
    slots = _DECODER_SLOTS if slots is None else slots
    frames, masks, flow = slot_views(slots, slot, split, size, flow_codec is not None)
    try:
        read_video(folder, split, size, frames_out=frames, masks_out=masks)
        if flow is not None:
            read_flow(Path(folder) / FLOW_FILE_NAME, size, out=flow)
    except RawDataError as error:
        return ("error", video_id, str(error.path), error.reason)
    chunks = {"frames": None, "masks": None, "flow": None}
    if (encode := _encoder(frames_codec)) is not None:
        chunks["frames"] = [encode(frame) for frame in frames]
    if masks is not None and (encode := _encoder(masks_codec)) is not None:
        chunks["masks"] = [encode(plane) for plane in masks]
    if flow is not None and (encode := _encoder(flow_codec)) is not None:
        chunks["flow"] = [encode(pair.view(np.uint8)) for pair in flow]
    return ("ok", video_id, slot, chunks)


def _decoder_main(connection, shared, slot_count: int, slot_bytes: int) -> None:
    """A decoder process: decode the tasks that arrive on ``connection`` in order, reply to each;
    ``None`` ends it. Its pipe is its own, so killing it never leaves a lock held for another."""
    _init_decoder(shared, slot_count, slot_bytes)
    while (task := connection.recv()) is not None:
        try:
            reply = ("done", _decode_into_slot(task))
        except BaseException as error:  # anything unexpected: the writer raises it with the traceback
            import traceback

            reply = ("failed", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        connection.send(reply)


class DecoderDied(RuntimeError):
    """A decoder process ended without answering (killed, out of memory, crashed)."""


class Decoder:
    """Decodes tasks in order with ``workers`` processes (0: in this process) into ``slots``.

    At most ``slot_count`` videos are in flight; a slot is reused only after the writer asked for
    the next result, i.e. once it has finished with the video in that slot. Task ``i`` goes to
    process ``i % workers`` over that process's own pipe and its reply is read in task order, so
    order needs no bookkeeping. (Not ``multiprocessing.Pool``: its ``terminate()`` can deadlock on
    the shared task queue's lock, and it waits forever for a worker that was killed.)
    """

    def __init__(self, workers: int, size: tuple[int, int], with_flow: bool = False):
        self.workers = workers
        self.with_flow = with_flow  # slots have room for flow (some task asks for it)
        self.slot_count = max(2, workers * 3)
        slot_bytes = _slot_bytes(size, with_flow)
        self.processes: list = []
        self.connections: list = []
        self._unanswered = 0
        if workers == 0:
            self.slots = np.empty((self.slot_count, slot_bytes), dtype=np.uint8)
            return
        import multiprocessing

        # spawn: the caller may hold threads (torch, h5py) that make fork unsafe.
        context = multiprocessing.get_context("spawn")
        shared = context.RawArray("B", self.slot_count * slot_bytes)
        self.slots = np.frombuffer(shared, dtype=np.uint8).reshape(self.slot_count, slot_bytes)
        try:
            for index in range(workers):
                ours, theirs = context.Pipe(duplex=True)
                process = context.Process(
                    target=_decoder_main,
                    args=(theirs, shared, self.slot_count, slot_bytes),
                    name=f"hpcvp-pack-decoder-{index}",
                    daemon=True,
                )
                process.start()
                theirs.close()
                self.processes.append(process)
                self.connections.append(ours)
        except BaseException:
            self.close()
            raise

    def _died(self, worker: int) -> DecoderDied:
        process = self.processes[worker]
        process.join(timeout=1)
        return DecoderDied(
            f"pack decoder process {process.name} (pid {process.pid}) ended without answering "
            f"(exit code {process.exitcode}): killed, or out of memory? Pack again: finished shards are kept"
        )

    def _send(self, task_index: int, task) -> None:
        worker = task_index % self.workers
        try:
            self.connections[worker].send(task)
        except (BrokenPipeError, ConnectionResetError):
            raise self._died(worker) from None
        self._unanswered += 1

    def _receive(self, task_index: int):
        worker = task_index % self.workers
        try:
            kind, value = self.connections[worker].recv()
        except (EOFError, ConnectionResetError):
            raise self._died(worker) from None
        self._unanswered -= 1
        if kind == "failed":
            raise RuntimeError(f"pack decoder process {self.processes[worker].name} failed: {value}")
        return value

    def results(self, tasks: list) -> Iterator:
        if self.workers == 0:
            for index, task in enumerate(tasks):
                yield _decode_into_slot((*task[:4], index % self.slot_count, *task[4:]), self.slots)
            return
        sent = received = 0
        while received < len(tasks):
            while sent < len(tasks) and sent - received < self.slot_count:
                task = tasks[sent]
                self._send(sent, (*task[:4], sent % self.slot_count, *task[4:]))
                sent += 1
            result = self._receive(received)
            received += 1
            yield result

    def close(self) -> None:
        """End the processes: politely when every reply was read, at once otherwise (an error
        stopped the writer; a process may be blocked sending a reply nobody will read)."""
        polite = self._unanswered == 0
        for connection in self.connections:
            if polite:
                with contextlib.suppress(OSError):
                    connection.send(None)
        for process in self.processes:
            if polite:
                process.join(timeout=10)
            if process.is_alive():
                process.kill()
            process.join()
        for connection in self.connections:
            connection.close()
        self.processes, self.connections = [], []
