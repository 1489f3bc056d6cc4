"""The one checkpoint format.

A checkpoint is a directory ``checkpoints/step_00001000/``:

    state.pt   torch.save of a plain dict (model, optimizer, scheduler, scaler, step, epoch,
               sampler position, train config, identity, ...); loads with weights_only=True
    ranks.pt   list indexed by rank of per-rank state (RNG states, the rank's metrics window)
    extra.pt   optional: the task's extra state (any picklable object; trusted, weights_only=False)
    meta.json  format version, step, and per file its size and CRC32

It is written as ``step_00001000.tmp-<pid>``, every file fsynced, then renamed; only a directory
with the final name is a checkpoint.  torch.load does not notice a flipped byte inside a tensor,
hence the CRC32 of every file, checked on load.  A latest checkpoint that fails to load is skipped
(with a warning) for the previous one.

What goes into those files is decided by a :class:`Checkpointer` from named :class:`Stateful`
parts (each part owns its ``state_dict()`` / ``load_state_dict()``); the trainer only lists them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from hpcvp.atomic import atomic_write_json, fsync_dir

from .dist import broadcast_from_main, control_group

log = logging.getLogger("hpcvp.train")

FORMAT_VERSION = 1  # the directory layout and meta.json
STATE_VERSION = 1  # the layout of state.pt (the Checkpointer's parts)
STATE_FILE = "state.pt"
RANKS_FILE = "ranks.pt"
EXTRA_FILE = "extra.pt"
META_FILE = "meta.json"
_NAME_RE = re.compile(r"^step_(\d{8,})$")
_LEFTOVER_RE = re.compile(r"^step_\d{8,}\.(tmp|deleting|replaced)-(\d+)")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    pass


class CheckpointWarning(UserWarning):
    pass


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    ranks: list | None = None
    extra: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):08d}"


def _checkpoints_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory (or RunDir) or its checkpoints/ directory."""
    path = Path(os.fspath(path))
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete (renamed) checkpoints as (step, path), oldest first.  Does not verify contents."""
    root = _checkpoints_dir(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME_RE.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Step of the newest complete checkpoint of a run (or None); cheap, for status tables."""
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else None


# --------------------------------------------------------------------------- writing


class _CrcFile:
    """File wrapper computing size and CRC32 of what torch.save writes through it."""

    def __init__(self, f):
        self._f = f
        self.crc = 0
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()


def _write_torch(path: Path, obj: Any) -> dict[str, int]:
    with open(path, "wb") as f:
        wrapped = _CrcFile(f)
        torch.save(obj, wrapped)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": wrapped.size, "crc32": wrapped.crc}


def _remove_dir(path: Path, tag: str) -> None:
    """Rename first (one atomic step: the name stops looking like a checkpoint), then delete."""
    doomed = path.with_name(f"{path.name}.{tag}-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary/half-deleted directories left by a killed writer (not our own)."""
    root = Path(checkpoints_dir)
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        m = _LEFTOVER_RE.match(entry.name)
        if m and int(m.group(2)) != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    ranks: list | None = None,
    extra: Any = None,
    keep_last: int = 3,
    keep_steps: frozenset[int] = frozenset(),
) -> Path:
    """Atomically write checkpoint ``step`` and prune all but the newest ``keep_last`` (checkpoints
    whose step is in ``keep_steps`` are never pruned and do not count toward ``keep_last``).

    Single writer: call on one process (the trainer calls it on rank 0 with every rank's RNG
    state gathered into ``ranks``).  Returns the final directory.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {STATE_FILE: _write_torch(tmp / STATE_FILE, state)}
    if ranks is not None:
        files[RANKS_FILE] = _write_torch(tmp / RANKS_FILE, ranks)
    if extra is not None:
        files[EXTRA_FILE] = _write_torch(tmp / EXTRA_FILE, extra)
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    atomic_write_json(tmp / META_FILE, meta)
    fsync_dir(tmp)  # the torch files' directory entries
    if final.exists():
        # e.g. a corrupt step_N we fell back from and have now trained past again
        _remove_dir(final, "replaced")
    os.rename(tmp, final)
    fsync_dir(root)
    prunable = [(s, path) for s, path in list_checkpoints(root) if s not in keep_steps]
    for _, old in prunable[: max(0, len(prunable) - keep_last)]:
        _remove_dir(old, "deleting")
    return final


# --------------------------------------------------------------------------- reading


def _verify_file(path: Path, expected: dict[str, int]) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{path}: {size} bytes, meta.json says {expected['bytes']} (truncated?)")
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    if crc != expected["crc32"]:
        raise CheckpointError(f"{path}: CRC32 mismatch (file corrupted)")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file a checkpoint's meta.json lists (size and CRC32) without loading it; raises
    CheckpointError naming the first bad file."""
    path = Path(path)
    meta_path = path / META_FILE
    try:
        files = json.loads(meta_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
    if STATE_FILE not in files:
        raise CheckpointError(f"{meta_path}: no {STATE_FILE} listed")
    for name, expected in files.items():
        _verify_file(path / name, expected)


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    load_ranks: bool = True,
    load_extra: bool = True,
) -> Checkpoint:
    """Load and verify one checkpoint directory; raises CheckpointError naming the file."""
    path = Path(path)
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, this hpcvp reads {FORMAT_VERSION}")
    files = meta.get("files", {})
    if STATE_FILE not in files:
        raise CheckpointError(f"{meta_path}: no {STATE_FILE} listed")
    wanted = [STATE_FILE]
    if load_ranks and RANKS_FILE in files:
        wanted.append(RANKS_FILE)
    if load_extra and EXTRA_FILE in files:
        wanted.append(EXTRA_FILE)
    loaded: dict[str, Any] = {}
    for name in wanted:
        file_path = path / name
        _verify_file(file_path, files[name])
        try:
            loaded[name] = torch.load(file_path, map_location=map_location, weights_only=(name != EXTRA_FILE))
        except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError/...
            raise CheckpointError(f"{file_path}: cannot load ({type(exc).__name__}: {exc})") from exc
    state = loaded[STATE_FILE]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: expected a dict, got {type(state).__name__}")
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        state=state,
        ranks=loaded.get(RANKS_FILE),
        extra=loaded.get(EXTRA_FILE),
        meta=meta,
    )


def load_latest(
    checkpoints_dir: str | os.PathLike,
    map_location: Any = "cpu",
    quarantine: bool = False,
    load_ranks: bool = True,
    load_extra: bool = True,
) -> Checkpoint | None:
    """Newest checkpoint that loads and verifies; older ones are tried when it fails (warning).

    Returns None when there is no checkpoint; raises CheckpointError when there are some but
    none loads (starting over silently would be worse).  ``quarantine`` renames the failed ones
    to ``step_N.corrupt-<time>`` so they are kept for inspection but never picked again.
    """
    root = _checkpoints_dir(checkpoints_dir)
    candidates = list_checkpoints(root)
    failures = []
    for step, path in reversed(candidates):
        try:
            ckpt = load_checkpoint(path, map_location, load_ranks=load_ranks, load_extra=load_extra)
        except CheckpointError as exc:
            failures.append(str(exc))
            message = f"checkpoint {path} is unusable, falling back to the previous one: {exc}"
            log.warning(message)
            warnings.warn(message, CheckpointWarning, stacklevel=2)
            if quarantine:
                try:
                    os.rename(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))
                except OSError as rename_exc:
                    log.warning("could not set aside %s: %s", path, rename_exc)
            continue
        if ckpt.step != step:
            log.warning("%s: meta.json says step %d", path, ckpt.step)
        return ckpt
    if failures:
        raise CheckpointError(f"no usable checkpoint in {root}; tried newest first:\n  " + "\n  ".join(failures))
    return None


def load_model_state(run_or_checkpoints_dir: str | os.PathLike, map_location: Any = "cpu"):
    """(step, model state_dict) of the newest usable checkpoint, for inference stages."""
    ckpt = load_latest(run_or_checkpoints_dir, map_location, load_ranks=False, load_extra=False)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {_checkpoints_dir(run_or_checkpoints_dir)}")
    return ckpt.step, ckpt.state["model"]


# --------------------------------------------------------------------------- stateful parts


@runtime_checkable
class Stateful(Protocol):
    """Anything that can put its state into a checkpoint and take it back (model, optimizer,
    scheduler, scaler, sampler, RNG, ...)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Checkpointer:
    """Saves and restores a set of named :class:`Stateful` parts in the checkpoint format above.

    - ``parts``: one copy for the whole job (rank 0's), in ``state.pt`` under their name; the
      parts named in ``flat`` put their keys at the top level of ``state.pt`` instead (format 1
      layout: ``step``, ``epoch``, ``position``, ... beside ``model``), and get the whole top
      level back on load (so a part can read ``world_size``).
    - ``rank_parts``: one copy per rank (RNG states, ...), gathered into ``ranks.pt``; restored
      only when the world size is unchanged (a rank's RNG state means nothing for another split).
    - ``extra``: a part whose state may be any picklable object, in ``extra.pt``; skipped when
      its ``state_dict()`` is None.

    ``save(step)`` and ``load()`` are collectives (call them on every rank): rank 0 writes and
    picks, then tells the others, so no rank runs on alone after a failed write or read.
    ``validate(checkpoint)``, when given, runs before any part is restored (and may raise).
    """

    def __init__(
        self,
        checkpoints_dir: str | os.PathLike,
        env: Any,
        parts: Mapping[str, Stateful],
        rank_parts: Mapping[str, Stateful] | None = None,
        extra: Stateful | None = None,
        flat: tuple[str, ...] = (),
        keep_last: int = 3,
        validate: Callable[[Checkpoint], None] | None = None,
        keep_steps: frozenset[int] = frozenset(),
    ):
        self.root = Path(checkpoints_dir)
        self.env = env
        self.parts = dict(parts)
        self.rank_parts = dict(rank_parts or {})
        self.extra = extra
        self.flat = tuple(flat)
        self.keep_last = keep_last
        self.keep_steps = frozenset(keep_steps)
        self.validate = validate
        self.last_step: int | None = None  # step of the checkpoint last written or loaded
        self.last_path: str | None = None

    # ------------------------------------------------------------------ collectives
    def _gather(self, obj: Any) -> list | None:
        if not self.env.distributed:
            return [obj]
        gathered = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(obj, gathered, dst=0, group=control_group())
        return gathered

    # ------------------------------------------------------------------ save
    def state(self, step: int) -> dict[str, Any]:
        """This process's ``state.pt`` dict for ``step``."""
        state: dict[str, Any] = {"version": STATE_VERSION, "step": int(step), "world_size": self.env.world_size}
        for name, part in self.parts.items():
            value = part.state_dict()
            if name not in self.flat:
                state[name] = value
                continue
            clash = set(value) & set(state)
            if clash:
                raise ValueError(f"checkpoint part {name!r} repeats top-level key(s) {sorted(clash)}")
            state.update(value)
        return state

    def save(self, step: int) -> str:
        """Write checkpoint ``step`` (once: a second call for the same step does nothing)."""
        if self.last_step == step and self.last_path is not None:
            return self.last_path
        ranks = self._gather({name: part.state_dict() for name, part in self.rank_parts.items()})
        result: tuple[str | None, str | None] = (None, None)
        if self.env.is_main:
            try:
                extra = self.extra.state_dict() if self.extra is not None else None
                ranks_arg = ranks if self.rank_parts else None
                path = save_checkpoint(
                    self.root, step, self.state(step), ranks_arg, extra, self.keep_last, self.keep_steps
                )
                result = (None, str(path))
            except Exception as exc:
                log.exception("checkpoint save at step %d failed", step)
                result = (f"checkpoint save at step {step} failed on rank 0: {exc!r}", None)
        error, path = broadcast_from_main(self.env, result)
        if error:
            raise CheckpointError(error)
        self.last_step, self.last_path = int(step), path
        return path

    # ------------------------------------------------------------------ load
    def load(self) -> Checkpoint | None:
        """Restore every part from the newest usable checkpoint (falling back past corrupt ones,
        which rank 0 sets aside); None when the run has none yet."""
        chosen: Checkpoint | None = None
        message: tuple[str | None, str | None] | None = None
        if self.env.is_main:
            try:
                chosen = load_latest(self.root, map_location="cpu", quarantine=True)
                message = (None, None if chosen is None else str(chosen.path))
            except CheckpointError as exc:
                message = (str(exc), None)
        error, path = broadcast_from_main(self.env, message)
        if error:
            raise CheckpointError(error)
        if path is None:
            return None
        ckpt = chosen if chosen is not None else load_checkpoint(Path(path), map_location="cpu")
        self.restore(ckpt)
        self.last_step, self.last_path = ckpt.step, str(ckpt.path)
        return ckpt

    def restore(self, ckpt: Checkpoint) -> None:
        """Hand each part its state from a loaded checkpoint."""
        state = ckpt.state
        if state.get("version", 1) > STATE_VERSION:
            raise CheckpointError(f"{ckpt.path}: state version {state['version']}, this hpcvp reads {STATE_VERSION}")
        if self.validate is not None:
            self.validate(ckpt)
        for name, part in self.parts.items():
            if name in self.flat:
                part.load_state_dict(state)
            elif name not in state:
                raise CheckpointError(f"{ckpt.path / STATE_FILE}: no {name!r} state")
            elif state[name]:  # an empty state (e.g. a disabled GradScaler's) leaves the part as built
                part.load_state_dict(state[name])
        saved_world = int(state.get("world_size", self.env.world_size))
        ranks = ckpt.ranks or []
        if self.rank_parts and saved_world == self.env.world_size and len(ranks) == saved_world:
            mine = ranks[self.env.rank]
            for name, part in self.rank_parts.items():
                if name in mine:
                    part.load_state_dict(mine[name])
        elif self.rank_parts and self.env.is_main:
            log.warning(
                "resuming %s with %d rank(s), checkpoint has %d: per-rank state (%s) is not restored "
                "(not bitwise reproducible)",
                ckpt.path,
                self.env.world_size,
                saved_world,
                ", ".join(self.rank_parts),
            )
        if self.extra is not None and ckpt.extra is not None:
            self.extra.load_state_dict(ckpt.extra)
