"""Atomic, durable file writes: the one way hpcvp writes a file that others may read.

A reader (another rank, a requeued job, ``--verify``) must see either the old file or the whole new
one, never half of it, even if the writer is killed. So each write goes to a temporary name in the
same directory (``.<name>.tmp-<pid>``: unique per writer, so two processes never share one),
is flushed and fsynced, renamed over the final name, and the directory is fsynced so that the
rename itself survives a crash. A failed write removes its temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or unlink inside ``directory`` durable (ignored where the filesystem refuses)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_name(path: str | os.PathLike) -> Path:
    """The temporary sibling this process writes ``path`` through."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w") as f: ...`` writes ``path`` all at once or not at all."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Any:
    """Call ``write(handle)`` on a binary handle (``torch.save``, ``np.save``) atomically; returns
    what ``write`` returned."""
    with atomic_open(path, "wb") as handle:
        return write(handle)
