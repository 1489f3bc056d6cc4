"""The competition's raw layout and its constants.

``<root>/{train,val,unlabeled,hidden}/video_<id>/image_<0..21>.png`` plus ``mask.npy``
(22, 160, 240) in train and val; hidden videos carry image_0..image_10 only.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

try:
    import pyspng
except ImportError:  # no wheel for this platform (see setup.cfg): Pillow decodes every frame
    pyspng = None

NUM_CLASSES = 49  # 3 shapes x 2 materials x 8 colours + background (class 0)
HEIGHT, WIDTH = 160, 240
NUM_FRAMES = 22
NUM_INPUT_FRAMES = 11  # frames 1..11 are given; frame 22 (index 21) is scored
TARGET_FRAME_INDEX = NUM_FRAMES - 1

SPLITS = ("train", "val", "unlabeled", "hidden")
# Inclusive-exclusive id ranges per split in the course release the synthetic generator imitates
# (hidden has no upper bound). Not enforced when reading: other releases number videos differently,
# and the split a video belongs to is the folder it is in.
SPLIT_ID_RANGES = {
    "train": (0, 1000),
    "val": (1000, 2000),
    "unlabeled": (2000, 15000),
    "hidden": (15000, None),
}
SPLIT_HAS_MASKS = {"train": True, "val": True, "unlabeled": False, "hidden": False}
SPLIT_NUM_FRAMES = {"train": NUM_FRAMES, "val": NUM_FRAMES, "unlabeled": NUM_FRAMES, "hidden": NUM_INPUT_FRAMES}

VIDEO_DIR_PATTERN = re.compile(r"^video_(\d+)$")
MASK_FILE_NAME = "mask.npy"
# Optional, synthetic sets only (the competition's data has none): ground-truth optical flow of
# each frame to the next, float16 (21, 2, H, W), (dx, dy) in pixels; next to mask.npy.
FLOW_FILE_NAME = "flow.npy"
SYNTHETIC_INFO_FILE_NAME = "hpcvp_synthetic.json"


class RawDataError(ValueError):
    """A raw video is missing, unreadable or malformed; ``path`` names the offending file."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps (path, reason) when the error crosses a process boundary
        return (type(self), (str(self.path), self.reason))


def frame_file_name(t: int) -> str:
    return f"image_{t}.png"


@dataclass
class SplitScan:
    """One split folder: its videos ``(video_id, folder)`` sorted by id, and the entries not read."""

    videos: list[tuple[int, Path]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)


def scan_split(root: os.PathLike | str, split: str) -> SplitScan:
    """List one split's videos; a missing split folder is empty, and nothing is dropped silently.

    The split a video belongs to is the folder it is in, and any non-negative id is accepted
    (releases differ between semesters), unpadded (``video_2000``) or zero-padded
    (``video_01370``). Two folders naming the same id are an error naming both. Entries that are
    not ``video_<digits>`` folders, and a split folder without videos, are returned in ``ignored``
    so the packer can warn and record them. Hidden entries (``.name``) are not listed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_dir = Path(root) / split
    scan = SplitScan()
    if not split_dir.is_dir():
        return scan
    videos: dict[int, Path] = {}
    with os.scandir(split_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            match = VIDEO_DIR_PATTERN.match(entry.name)
            if match is None or not entry.is_dir():
                why = "not a folder" if match is not None else "not named video_<digits>"
                scan.ignored.append((Path(entry.path), why))
                continue
            video_id = int(match.group(1))
            folder = Path(entry.path)
            if video_id in videos:
                raise RawDataError(
                    folder, f"video id {video_id} also appears as {videos[video_id]}; remove one of the two folders"
                )
            videos[video_id] = folder
    if not videos:
        scan.ignored.append((split_dir, "empty split folder (no video_<digits> folders)"))
    scan.videos = sorted(videos.items())
    return scan


def list_videos(root: os.PathLike | str, split: str) -> list[tuple[int, Path]]:
    """Videos of one split as ``(video_id, folder)`` sorted by id (see ``scan_split``)."""
    return scan_split(root, split).videos


def missing_files(folder: os.PathLike | str, split: str) -> list[Path]:
    """Files the split requires in a video folder that are absent (one directory listing, no reads)."""
    folder = Path(folder)
    try:
        present = set(os.listdir(folder))
    except OSError as error:
        return [folder / f"({error.strerror})"]
    required = [frame_file_name(t) for t in range(SPLIT_NUM_FRAMES[split])]
    if SPLIT_HAS_MASKS[split]:
        required.append(MASK_FILE_NAME)
    return [folder / name for name in required if name not in present]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The IHDR chunk comes first in every PNG: length 13, type, then width, height, depth, colour type.
_IHDR_HEAD = struct.Struct(">8sI4sIIBB")
_CHUNK_HEAD = struct.Struct(">I4s")


def _is_rgb8_png(data: bytes, path: Path, size: tuple[int, int]) -> bool:
    """True for an intact 8-bit RGB PNG of ``size`` (the competition's frames): those go to libspng.

    False for anything else (palette, grey, alpha, 16-bit, not a PNG): ``Image.open`` decodes it,
    with Pillow's conversion rules. Raises ``RawDataError`` for an RGB8 PNG of another size, a
    truncated chunk or a chunk whose CRC does not match: pyspng does not check CRCs, and a flipped
    bit in the image data would otherwise decode to wrong pixels without an error.
    """
    if len(data) < _IHDR_HEAD.size:
        return False
    signature, length, kind, width, height, depth, colour = _IHDR_HEAD.unpack_from(data)
    if signature != _PNG_SIGNATURE or length != 13 or kind != b"IHDR" or depth != 8 or colour != 2:
        return False
    if (height, width) != tuple(size):
        raise RawDataError(path, f"image is {height}x{width} (HxW), expected {size[0]}x{size[1]}")
    view = memoryview(data)
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            raise RawDataError(path, f"unreadable PNG (truncated {kind.decode('latin-1')} chunk)")
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            raise RawDataError(path, f"unreadable PNG (broken {kind.decode('latin-1')} chunk checksum)")
        if kind == b"IEND":
            break
        pos = end + 4
    return True


def read_frame(path: Path, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Decode one PNG into ``out`` (H, W, 3) uint8; alpha is dropped, grey is expanded.

    8-bit RGB PNGs (the competition's) are decoded by libspng (``pyspng``: ~30 % less CPU per
    160x240 frame than Pillow, BENCHMARKS.md) after every chunk's CRC is checked; anything else, and
    every PNG where pyspng has no wheel, through ``Image.open``. Both decoders are lossless, so the
    pixels are the same either way.
    """
    height, width = size
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise RawDataError(path, "missing frame") from None
    except OSError as error:
        raise RawDataError(path, f"unreadable PNG ({error})") from None
    if pyspng is not None and _is_rgb8_png(data, path, size):
        try:
            out[...] = pyspng.load(data, format="RGB")
        except (RuntimeError, ValueError) as error:  # libspng's "could not decode image: <reason>"
            raise RawDataError(path, f"unreadable PNG ({error})") from None
        return out
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (width, height):
                raise RawDataError(path, f"image is {image.size[1]}x{image.size[0]} (HxW), expected {height}x{width}")
            if image.mode != "RGB":
                image = image.convert("RGB")
            out[...] = np.asarray(image)
    except RawDataError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation/corruption as these
        raise RawDataError(path, f"unreadable PNG ({error})") from None
    return out


def _read_uint8_npy_into(path: Path, out: np.ndarray) -> bool:
    """Read a C-order uint8 ``.npy`` of ``out``'s shape straight into ``out`` (one read, no
    temporary); False (nothing trusted in ``out``) for any other dtype, order or shape."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                return False
            if dtype != np.uint8 or fortran or tuple(shape) != out.shape or not out.flags.c_contiguous:
                return False
            return handle.readinto(memoryview(out).cast("B")) == out.nbytes
    except (OSError, ValueError, EOFError):  # FileNotFoundError included: np.load says it the usual way
        return False


def read_mask(path: Path, split: str, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Load ``mask.npy`` as uint8 (22, H, W); any integer dtype with values in 0..48 is accepted.

    With ``out`` (uint8 (22, H, W)) the mask is stored there; a uint8 file is read into it directly.
    """
    expected_shape = (NUM_FRAMES, *size)
    if out is not None and _read_uint8_npy_into(path, out):
        high = int(out.max())
        if high >= NUM_CLASSES:
            raise RawDataError(path, f"mask values span {int(out.min())}..{high}, expected 0..{NUM_CLASSES - 1}")
        return out
    try:
        mask = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RawDataError(path, f"missing mask (every {split} video has one)") from None
    except (OSError, ValueError, EOFError) as error:
        raise RawDataError(path, f"unreadable mask ({error})") from None
    if not np.issubdtype(mask.dtype, np.integer):
        raise RawDataError(path, f"mask dtype is {mask.dtype}, expected an integer dtype")
    if mask.shape != expected_shape:
        raise RawDataError(path, f"mask shape is {mask.shape}, expected {expected_shape}")
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high >= NUM_CLASSES:
        raise RawDataError(path, f"mask values span {low}..{high}, expected 0..{NUM_CLASSES - 1}")
    if out is not None:
        out[...] = mask
        return out
    return mask.astype(np.uint8, copy=False)


def _all_finite(array: np.ndarray) -> bool:
    """``np.isfinite(array).all()``; for float16 (the generator's flow) from the exponent bits in
    one integer pass: ~3x faster than numpy's float16 isfinite."""
    if array.dtype == np.float16 and array.size:
        return int((array.view(np.uint16) & 0x7FFF).max()) < 0x7C00  # exponent all ones: inf or NaN
    return bool(np.isfinite(array).all())


def read_flow(path: Path, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Load ``flow.npy`` as float16 (21, 2, H, W); any float dtype with finite values is accepted.

    With ``out`` (float16 (21, 2, H, W), e.g. a packer's shared slot) the flow is stored there."""
    expected_shape = (NUM_FRAMES - 1, 2, *size)
    try:
        flow = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RawDataError(path, "missing flow") from None
    except (OSError, ValueError, EOFError) as error:
        raise RawDataError(path, f"unreadable flow ({error})") from None
    if not np.issubdtype(flow.dtype, np.floating):
        raise RawDataError(path, f"flow dtype is {flow.dtype}, expected a float dtype")
    if flow.shape != expected_shape:
        raise RawDataError(path, f"flow shape is {flow.shape}, expected {expected_shape}")
    if not _all_finite(flow):
        raise RawDataError(path, "flow has non-finite values")
    if out is not None:
        out[...] = flow
        return out
    return flow.astype(np.float16, copy=False)


def read_video(
    path: os.PathLike | str,
    split: str,
    size: tuple[int, int] = (HEIGHT, WIDTH),
    frames_out: np.ndarray | None = None,
    masks_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one video folder: frames uint8 (T, H, W, 3) and masks uint8 (22, H, W) or None.

    T is 22, or 11 for hidden. Raises ``RawDataError`` naming the first bad file. ``frames_out``
    and ``masks_out`` are optional preallocated uint8 buffers (e.g. shared memory) to decode into.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder = Path(path)
    if not folder.is_dir():
        raise RawDataError(folder, "video folder does not exist")
    num_frames = SPLIT_NUM_FRAMES[split]
    frames = np.empty((num_frames, size[0], size[1], 3), dtype=np.uint8) if frames_out is None else frames_out
    for t in range(num_frames):
        read_frame(folder / frame_file_name(t), size, out=frames[t])
    masks = None
    if SPLIT_HAS_MASKS[split]:
        masks = read_mask(folder / MASK_FILE_NAME, split, size, out=masks_out)
    return frames, masks
