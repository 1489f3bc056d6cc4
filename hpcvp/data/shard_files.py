"""Small file helpers shared by packing, verification, pseudo-masks and staging: hashing a shard,
checking it against its recorded size and sha256, opening HDF5, locking, compression settings."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import h5py

HASH_BLOCK = 8 << 20


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


def sha256_file(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, size: int, sha256: str) -> str | None:
    """None if ``path`` has this size and sha256, else why not (size first: it costs no read)."""
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
