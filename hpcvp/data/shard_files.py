"""Small file helpers shared by packing, verification, pseudo-masks and staging: hashing a shard,
checking it against its recorded size and checksum, opening HDF5, locking, compression settings."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import h5py

HASH_BLOCK = 8 << 20  # staging copies in blocks this big

# Shard checksums are "<algorithm>:<hex digest>". They guard against corruption (a bad copy, a
# truncated write, a node crash), not tampering, so the packer uses XXH3-128: ~10x sha256's speed
# with SHA-NI here, where sha256 was most of the packing process's own CPU (BENCHMARKS.md).
# sha256: manifests of format_version 1 (hpcvp before 2026-12-05) are still read and verified.
CHECKSUM = "xxh3_128"
CHECKSUM_ALGORITHMS = ("xxh3_128", "sha256")


BLOSC_CODECS = ("lz4", "lz4hc", "zstd", "zlib", "blosclz")
BLOSC_SHUFFLES = {"none": 0, "byte": 1, "bit": 2}


def _hdf5plugin():
    """hdf5plugin registers the Blosc/LZ4 HDF5 filters in this process (readers need it too)."""
    import hdf5plugin

    return hdf5plugin


def parse_compression(text: str) -> dict:
    """A compression setting -> h5py ``create_dataset`` keyword arguments.

    ``none`` | ``lzf`` | ``gzip:L`` (L in 0..9) | ``lz4`` (hdf5plugin's LZ4 filter) |
    ``blosc:CODEC:L:SHUFFLE`` (hdf5plugin's Blosc filter; CODEC in lz4, lz4hc, zstd, zlib,
    blosclz; L in 0..9; SHUFFLE none | byte | bit), e.g. ``blosc:lz4:5:bit``.
    """
    value = text.strip().lower()
    if value == "none":
        return {}
    if value == "lzf":
        return {"compression": "lzf"}
    match = re.fullmatch(r"gzip(?::(\d))?", value)
    if match:
        level = int(match.group(1)) if match.group(1) is not None else 4
        return {"compression": "gzip", "compression_opts": level}
    if value == "lz4":
        return dict(_hdf5plugin().LZ4())
    match = re.fullmatch(r"blosc(?::(\w+))?(?::(\d))?(?::(none|byte|bit))?", value)
    if match and (match.group(1) or "lz4") in BLOSC_CODECS:
        codec, level, shuffle = match.group(1) or "lz4", int(match.group(2) or 5), match.group(3) or "bit"
        return dict(_hdf5plugin().Blosc(cname=codec, clevel=level, shuffle=BLOSC_SHUFFLES[shuffle]))
    raise ValueError(
        f"unknown compression {text!r}; expected none, lzf, gzip:L (L in 0..9), lz4 or "
        f"blosc:CODEC:L:SHUFFLE (CODEC in {', '.join(BLOSC_CODECS)}; SHUFFLE none, byte or bit)"
    )


def canonical_compression(text: str) -> str:
    value = text.strip().lower()
    kwargs = parse_compression(value)
    if not kwargs:
        return "none"
    if kwargs["compression"] == "lzf":
        return "lzf"
    if kwargs["compression"] == "gzip":
        return f"gzip:{kwargs['compression_opts']}"
    if value == "lz4":
        return "lz4"
    parts = (value.split(":") + [None] * 3)[1:4]
    codec, level, shuffle = parts[0] or "lz4", parts[1] or "5", parts[2] or "bit"
    return f"blosc:{codec}:{level}:{shuffle}"


def chunk_encoder(codec: str):
    """A function ``contiguous uint8 array -> stored chunk bytes`` that produces exactly what the
    HDF5 filter of ``codec`` stores, so decoder processes compress and the writer only writes
    (``write_direct_chunk``); None when only HDF5 itself can compress (``none``, ``lzf``, ``blosc``).

    gzip:L is a zlib stream; lz4 is hdf5plugin's LZ4 filter format: the original size (8 bytes,
    big-endian), the block size (4 bytes), then per block its stored size (4 bytes) and the LZ4
    block (or the raw block when LZ4 does not make it smaller). One block per chunk here.
    """
    value = canonical_compression(codec)
    if value.startswith("gzip:"):
        level = int(value.split(":")[1])
        return lambda array: zlib.compress(array, level)
    if value == "lz4":
        import lz4.block

        def encode(array) -> bytes:
            data = memoryview(array).cast("B")
            size = len(data)
            packed = lz4.block.compress(data, store_size=False)
            body = packed if len(packed) < size else bytes(data)
            return struct.pack(">QII", size, size, len(body)) + body

        return encode
    return None


def filtered(dataset) -> bool:
    """Whether an h5py dataset's chunks pass through any HDF5 filter (compression)."""
    return dataset.id.get_create_plist().get_nfilters() > 0


def new_hasher(algorithm: str = CHECKSUM):
    """A hashlib-style object (update, hexdigest) for one of CHECKSUM_ALGORITHMS."""
    if algorithm == "xxh3_128":
        import xxhash  # here: the packer's decoder processes import this module and never hash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"checksum algorithm {algorithm!r}: expected one of {CHECKSUM_ALGORITHMS}")


def split_checksum(checksum: str) -> tuple[str, str]:
    """``"<algorithm>:<hex>"`` -> (algorithm, hex), with a clear error for anything else."""
    algorithm, sep, digest = checksum.partition(":")
    if not sep or algorithm not in CHECKSUM_ALGORITHMS or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(
            f"checksum {checksum!r}: expected <algorithm>:<hex digest>, algorithm in {CHECKSUM_ALGORITHMS}"
        )
    return algorithm, digest


def file_checksum(path: os.PathLike | str, algorithm: str = CHECKSUM) -> str:
    """``"<algorithm>:<hex>"`` of a file, hashed through a read-only memory map: the pages are
    hashed where they lie in the page cache, no copy into a buffer (a 257 MB shard: 18 vs 35 ms
    with readinto, XXH3-128)."""
    digest = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as handle:
        if os.fstat(handle.fileno()).st_size:  # an empty file cannot be mapped
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
    return f"{algorithm}:{digest.hexdigest()}"


def publish_shard(tmp_path: Path, final_path: Path) -> tuple[str, int]:
    """Hash a written shard and give it its final name; returns (checksum, size). On failure the
    temporary file is removed. The packer runs it in a thread, pseudo-labelling inline.

    No fsync of the shard data: a process crash loses nothing (the page cache survives it), and
    after a node crash every shard is checked against its recorded checksum before it is trusted
    again (resume, --verify, staging), so durability comes from verification; fsyncing hundreds of
    MB per shard would stall the pack on slow disks.
    """
    try:
        digest = file_checksum(tmp_path)
        size = tmp_path.stat().st_size
        os.replace(tmp_path, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    return digest, size


def check_file(path: Path, size: int, checksum: str) -> str | None:
    """None if ``path`` has this size and checksum (``"<algorithm>:<hex>"``), else why not (size
    first: it costs no read)."""
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if actual_size != size:
        return f"size {actual_size} bytes, manifest says {size}"
    algorithm, expected = split_checksum(checksum)
    _, actual = split_checksum(file_checksum(path, algorithm))
    if actual != expected:
        return f"{algorithm} {actual[:16]}... does not match the manifest's {expected[:16]}..."
    return None


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
    """h5py.File with HDF5 file locking off: POSIX locks are broken or slow on Lustre/GPFS/NFS.

    Registers hdf5plugin's filters first, so Blosc/LZ4 datasets read in every process."""
    import h5py  # here, not at the top: the packer's decoder processes import this module without it

    _hdf5plugin()
    return h5py.File(path, mode, locking=False, **kwargs)
