"""``--verify``: re-hash every shard of a packed directory against its manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpcvp.progress import Progress

from .manifest import load_manifest
from .shard_files import check_file


@dataclass
class VerifyReport:
    checked: list[str]
    bad: list[tuple[str, str]]  # (path, reason)

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_dataset(data_dir: os.PathLike | str, quiet: bool = True) -> VerifyReport:
    """Re-hash every shard (and pseudo-mask shard) and compare size and checksum with the manifest."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    entries = [*manifest.shards, *manifest.pseudo_masks]
    report = VerifyReport(checked=[], bad=[])
    with Progress(len(entries), "verify", unit="shards", enabled=not quiet) as progress:
        for entry in entries:
            path = data_dir / entry.path
            report.checked.append(str(path))
            problem = check_file(path, entry.bytes, entry.checksum)
            if problem:
                report.bad.append((str(path), problem))
            progress.advance(1)
    return report
