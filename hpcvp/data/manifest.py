"""manifest.json: what a packed dataset directory holds, and what the packer left out.

A packed dataset directory holds ``manifest.json`` and shards ``<split>-<k:03d>.h5``, each with
``frames`` uint8 (N, T, H, W, 3) chunked one frame per chunk, ``masks`` uint8 (N, 22, H, W)
(train/val) chunked one frame per chunk, optionally ``flow`` float16 (N, 21, 2, H, W) (synthetic
train/val: ground-truth flow of frame t to t+1; the shard entry says ``has_flow``), and
``video_ids`` int64 (N,). The manifest lists every
shard with its size and checksum (``"xxh3_128:<hex>"``; format_version 1 recorded ``sha256``), the
pseudo-mask shards added later, the videos the packer skipped
(``--on-error skip``) and the raw folders it ignored (misnamed, or an empty split folder).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcvp.atomic import atomic_write_json

from .layout import SPLITS
from .shard_files import split_checksum

FORMAT_NAME = "hpcvp-shards"
# 2: shard checksums as "<algorithm>:<hex>" under "checksum" (xxh3_128). 1: "sha256" (still read).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".manifest.lock"  # serialises manifest rewrites (packer's last step, pseudo-mask adds)
SHARD_NAME_PATTERN = re.compile(r"^(train|val|unlabeled|hidden)-(\d{3,})\.h5$")


class ManifestError(ValueError):
    """manifest.json is missing, malformed, or from an unsupported format version."""


class IncompleteSplitError(ManifestError):
    """A split lacks videos the raw set had (skipped when packing), where every one is needed."""


@dataclass(frozen=True)
class ShardEntry:
    split: str
    path: str  # relative to the dataset directory
    video_ids: tuple[int, ...]
    bytes: int
    checksum: str  # "<algorithm>:<hex>", see shard_files.CHECKSUM
    has_masks: bool
    num_frames: int
    has_flow: bool = False  # optional ``flow`` dataset (synthetic sets' ground-truth flow)


@dataclass(frozen=True)
class PseudoMaskEntry:
    split: str
    path: str
    video_ids: tuple[int, ...]
    bytes: int
    checksum: str
    run: str
    num_frames: int


@dataclass(frozen=True)
class SkippedVideo:
    split: str
    video_id: int
    path: str  # the offending file
    reason: str
    shard: str | None = None  # the shard it was planned for when the failure showed at decode time


@dataclass(frozen=True)
class IgnoredEntry:
    """A raw entry the packer did not read: a folder not named ``video_<digits>``, or an empty split."""

    split: str
    path: str
    reason: str


@dataclass
class Manifest:
    root: Path
    frame_size: tuple[int, int]
    compression: dict
    shards: list[ShardEntry] = field(default_factory=list)
    pseudo_masks: list[PseudoMaskEntry] = field(default_factory=list)
    skipped: list[SkippedVideo] = field(default_factory=list)
    ignored: list[IgnoredEntry] = field(default_factory=list)
    source: str | None = None
    # the version it was read as; it is always written as FORMAT_VERSION (entries carry "checksum")
    format_version: int = FORMAT_VERSION

    def shards_for(self, split: str) -> list[ShardEntry]:
        return [shard for shard in self.shards if shard.split == split]

    def pseudo_for(self, split: str) -> list[PseudoMaskEntry]:
        return [entry for entry in self.pseudo_masks if entry.split == split]

    def video_ids(self, split: str) -> list[int]:
        return [video_id for shard in self.shards_for(split) for video_id in shard.video_ids]

    @property
    def splits(self) -> list[str]:
        return [split for split in SPLITS if self.shards_for(split)]

    def totals(self) -> dict:
        per_split = {}
        for split in SPLITS:
            shards = self.shards_for(split)
            if shards:
                per_split[split] = {
                    "videos": sum(len(s.video_ids) for s in shards),
                    "shards": len(shards),
                    "bytes": sum(s.bytes for s in shards),
                }
        return {
            "videos": sum(len(s.video_ids) for s in self.shards),
            "shards": len(self.shards),
            "bytes": sum(s.bytes for s in self.shards),
            "pseudo_mask_shards": len(self.pseudo_masks),
            "pseudo_mask_bytes": sum(e.bytes for e in self.pseudo_masks),
            "skipped_videos": len(self.skipped),
            "ignored_entries": len(self.ignored),
            "files": len(self.shards) + len(self.pseudo_masks) + 1,
            "per_split": per_split,
        }

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "frame_size": list(self.frame_size),
            "compression": dict(self.compression),
            "source": self.source,
            "totals": self.totals(),
            "shards": [_entry_json(s) for s in self.shards],
            "pseudo_masks": [_entry_json(e) for e in self.pseudo_masks],
            "skipped": [asdict(s) for s in self.skipped],
            "ignored": [asdict(i) for i in self.ignored],
        }


def _entry_json(entry) -> dict:
    payload = asdict(entry)
    payload["video_ids"] = list(entry.video_ids)
    return payload


def manifest_path(data_dir: os.PathLike | str) -> Path:
    return Path(data_dir) / MANIFEST_NAME


def load_manifest(data_dir: os.PathLike | str) -> Manifest:
    path = manifest_path(data_dir)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; pack the raw data with tools/pack_hdf5.py first") from None
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: unreadable manifest ({error})") from None
    if payload.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: not an hpcvp manifest (format={payload.get('format')!r})")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise ManifestError(
            f"{path}: format_version {payload.get('format_version')} is not supported "
            f"(this hpcvp reads {', '.join(map(str, READABLE_VERSIONS))}); re-pack the data with this hpcvp"
        )
    try:
        return Manifest(
            root=Path(data_dir),
            frame_size=(int(payload["frame_size"][0]), int(payload["frame_size"][1])),
            compression=dict(payload["compression"]),
            shards=[shard_from_json(s) for s in payload["shards"]],
            pseudo_masks=[pseudo_from_json(e) for e in payload.get("pseudo_masks", [])],
            skipped=[SkippedVideo(**s) for s in payload.get("skipped", [])],
            ignored=[IgnoredEntry(**i) for i in payload.get("ignored", [])],
            source=payload.get("source"),
            format_version=int(payload["format_version"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ManifestError(f"{path}: malformed manifest ({error!r})") from None


def checksum_from_json(payload: dict) -> str:
    """A shard entry's checksum: ``checksum`` (format 2), or format 1's ``sha256`` hex digest."""
    if "checksum" in payload:
        split_checksum(payload["checksum"])  # ValueError (-> malformed manifest) for anything else
        return payload["checksum"]
    return f"sha256:{payload['sha256']}"


def shard_from_json(payload: dict) -> ShardEntry:
    return ShardEntry(
        split=payload["split"],
        path=payload["path"],
        video_ids=tuple(int(v) for v in payload["video_ids"]),
        bytes=int(payload["bytes"]),
        checksum=checksum_from_json(payload),
        has_masks=bool(payload["has_masks"]),
        num_frames=int(payload["num_frames"]),
        has_flow=bool(payload.get("has_flow", False)),
    )


def pseudo_from_json(payload: dict) -> PseudoMaskEntry:
    return PseudoMaskEntry(
        split=payload["split"],
        path=payload["path"],
        video_ids=tuple(int(v) for v in payload["video_ids"]),
        bytes=int(payload["bytes"]),
        checksum=checksum_from_json(payload),
        run=payload["run"],
        num_frames=int(payload["num_frames"]),
    )


def write_manifest(data_dir: os.PathLike | str, manifest: Manifest) -> Path:
    path = manifest_path(data_dir)
    atomic_write_json(path, manifest.to_json(), indent=1)
    return path


def missing_hidden_ids(manifest: Manifest, split: str = "hidden") -> list[int]:
    """Ids the raw ``split`` had that are not packed (skipped with ``--on-error skip``), sorted.

    A submission must cover every hidden video, so ``predict`` refuses to write one while this is
    not empty.
    """
    packed = set(manifest.video_ids(split))
    return sorted({video.video_id for video in manifest.skipped if video.split == split} - packed)


def require_complete_split(manifest: Manifest, split: str = "hidden") -> None:
    """Raise ``IncompleteSplitError`` naming the ids of ``split`` the pack skipped, if any."""
    missing = missing_hidden_ids(manifest, split)
    if not missing:
        return
    shown = ", ".join(str(video_id) for video_id in missing[:20]) + (", ..." if len(missing) > 20 else "")
    raise IncompleteSplitError(
        f"{manifest_path(manifest.root)}: the raw {split} set had {len(missing)} video(s) that were skipped when "
        f"packing (ids {shown}; see 'skipped' there for why). A submission must cover every {split} video, so "
        f"none is written: fix those videos and pack again with --splits {split}"
    )
