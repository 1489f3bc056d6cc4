"""Staging: copy a packed dataset to node-local disk, checking every shard against the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from hpcvp.atomic import atomic_write_bytes, temporary_name
from hpcvp.progress import Progress

from .manifest import MANIFEST_NAME, load_manifest, manifest_path
from .shard_files import HASH_BLOCK, check_file, file_lock, new_hasher, split_checksum


class StagingError(RuntimeError):
    """A shard could not be staged or does not match the manifest."""


def local_scratch_dir() -> Path | None:
    """Node-local scratch: $SLURM_TMPDIR (set by some sites' Slurm prolog), else $TMPDIR."""
    for variable in ("SLURM_TMPDIR", "TMPDIR"):
        value = os.environ.get(variable)
        if value:
            return Path(value)
    return None


def stage_to_local(
    data_dir: os.PathLike | str,
    dest_root: os.PathLike | str | None = None,
    splits: Sequence[str] | None = None,
    quiet: bool = True,
) -> Path:
    """Copy a packed dataset to node-local disk, checking every shard against the manifest.

    The copy goes to ``<dest_root or $SLURM_TMPDIR or $TMPDIR>/hpcvp-data/<name>-<key>`` (the key
    hashes the manifest and ``splits``); shards already there with the manifest's size and checksum
    are not copied again. ``splits`` limits the copy (and the staged manifest) to those splits, e.g.
    a segmentation stage needs train and val only. Ranks on one node may call this together: a lock
    serialises them and the later ones find the copy done. Returns the staged directory.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    root = Path(dest_root) if dest_root is not None else local_scratch_dir()
    if root is None:
        raise StagingError("no node-local directory: set $SLURM_TMPDIR or $TMPDIR, or pass dest_root")
    manifest_bytes = manifest_path(data_dir).read_bytes()
    key_source = manifest_bytes
    if splits is not None:
        unknown = [s for s in splits if s not in manifest.splits]
        if unknown:
            raise StagingError(f"{data_dir}: split(s) {unknown} are not packed there (packed: {manifest.splits})")
        manifest.shards = [s for s in manifest.shards if s.split in splits]
        manifest.pseudo_masks = [e for e in manifest.pseudo_masks if e.split in splits]
        manifest.skipped = [v for v in manifest.skipped if v.split in splits]
        manifest_bytes = (json.dumps(manifest.to_json(), indent=1) + "\n").encode()
        key_source += ",".join(splits).encode()
    key = hashlib.sha256(key_source).hexdigest()[:12]
    dest = root / "hpcvp-data" / f"{data_dir.resolve().name}-{key}"
    entries = [*manifest.shards, *manifest.pseudo_masks]
    with file_lock(root / "hpcvp-data" / f".{dest.name}.lock"):
        dest.mkdir(parents=True, exist_ok=True)
        staged_manifest = dest / MANIFEST_NAME
        with Progress(len(entries), "stage", unit="shards", enabled=not quiet) as progress:
            for entry in entries:
                target = dest / entry.path
                if check_file(target, entry.bytes, entry.checksum) is not None:
                    _copy_checked(data_dir / entry.path, target, entry)
                progress.advance(1)
        if not staged_manifest.exists() or staged_manifest.read_bytes() != manifest_bytes:
            atomic_write_bytes(staged_manifest, manifest_bytes)  # last: a staged manifest means complete
    return dest


def _copy_checked(source: Path, target: Path, entry) -> None:
    """Copy ``source`` to ``target`` hashing the bytes on the way; refuse a mismatch with the manifest."""
    tmp = temporary_name(target)
    algorithm, expected = split_checksum(entry.checksum)
    digest = new_hasher(algorithm)
    try:
        with open(source, "rb") as reader, open(tmp, "wb") as writer:
            while block := reader.read(HASH_BLOCK):
                digest.update(block)
                writer.write(block)
        copied = tmp.stat().st_size
        if copied != entry.bytes or digest.hexdigest() != expected:
            raise StagingError(
                f"{source}: does not match the manifest (bytes {copied} vs {entry.bytes}, "
                f"{algorithm} {digest.hexdigest()[:16]}... vs {expected[:16]}...); run --verify and re-pack"
            )
        os.replace(tmp, target)
    except FileNotFoundError:
        raise StagingError(f"{source}: listed in the manifest but missing") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
