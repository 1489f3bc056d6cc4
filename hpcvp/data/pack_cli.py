"""``hpcvp-pack`` / ``tools/pack_hdf5.py``: pack the raw layout, verify a packed directory, or stage
it to node-local disk. Every failure a user can cause ends with one line naming the file, flag or
directory, and a non-zero exit: 2 for bad input or settings, 1 for a set that does not verify,
3 when another packer holds ``--out``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .layout import SPLITS, RawDataError
from .manifest import ManifestError, manifest_path
from .pack import (
    DEFAULT_COMPRESSION,
    DEFAULT_MASK_COMPRESSION,
    DEFAULT_SHARD_SIZE,
    PackError,
    PackLockedError,
    pack_dataset,
    parse_frame_size,
)
from .staging import StagingError, stage_to_local
from .verify import verify_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcvp-pack",
        description="Pack the competition's raw layout into sharded HDF5 (+ manifest.json), verify a packed "
        "directory, or stage it to node-local disk.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--src", type=Path, help="raw root holding train/ val/ unlabeled/ hidden/")
    action.add_argument("--verify", type=Path, metavar="DIR", help="re-hash the shards of a packed directory")
    action.add_argument("--stage", type=Path, metavar="DIR", help="copy a packed directory to node-local disk")
    parser.add_argument("--out", type=Path, help="packed output directory (with --src)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoder processes feeding the writer; 0 decodes in the writer (default: CPUs - 1)",
    )
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="videos per shard")
    parser.add_argument("--compression", default=DEFAULT_COMPRESSION, help="frames: none | lzf | gzip:L")
    parser.add_argument(
        "--mask-compression",
        default=DEFAULT_MASK_COMPRESSION,
        help="masks: none | lzf | gzip:L | lz4 | blosc:CODEC:L:SHUFFLE",
    )
    parser.add_argument(
        "--frame-size",
        type=parse_frame_size,
        default=None,
        metavar="HxW",
        help="expected frame size (default: hpcvp_synthetic.json 'size' if present, else 160x240)",
    )
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to pack")
    parser.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="bad input: stop naming the file (default) or skip the video and record it",
    )
    parser.add_argument(
        "--stage-dest",
        type=Path,
        default=None,
        help="with --stage: destination root (default $SLURM_TMPDIR, else $TMPDIR)",
    )
    parser.add_argument(
        "--stage-splits", default=None, help="with --stage: comma-separated splits to copy (default: all packed splits)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify is not None:
            report = verify_dataset(args.verify, quiet=args.quiet)
            for path, reason in report.bad:
                print(f"BAD {path}: {reason}", file=sys.stderr)
            print(f"verified {len(report.checked)} shard(s): {len(report.bad)} bad")
            return 0 if report.ok else 1
        if args.stage is not None:
            stage_splits = None if args.stage_splits is None else _split_list(args.stage_splits)
            print(stage_to_local(args.stage, args.stage_dest, splits=stage_splits, quiet=args.quiet))
            return 0
        if args.out is None:
            parser.error("--src needs --out")
        splits = _split_list(args.splits)
        pack_dataset(
            args.src,
            args.out,
            splits=splits,
            shard_size=args.shard_size,
            compression=args.compression,
            mask_compression=args.mask_compression,
            frame_size=args.frame_size,
            workers=args.workers,
            on_error=args.on_error,
            quiet=args.quiet,
        )
        print(manifest_path(args.out))
        return 0
    except PackLockedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except PackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (RawDataError, ManifestError, StagingError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # permissions, disk full, a path that is a file: str() names the path
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
