"""Data layer: the competition's raw layout, the synthetic generator, sharded HDF5 and datasets.

Modules: ``layout`` (raw folders), ``manifest`` (packed-set format), ``pack`` + ``pack_decode``
(raw -> shards), ``verify``, ``pseudo_masks``, ``staging`` (node-local copy), ``pack_cli`` (the
``hpcvp-pack`` command), ``shard_files`` (hashing, locking, HDF5 opening), ``datasets``,
``synthetic``, ``default``.

Heavy imports (torch for the datasets, pybullet for the generator) stay in their submodules:
``from hpcvp.data.datasets import ClipDataset``. The names below are imported on first use, so a
process that needs one submodule (the packer's spawned decoders) does not load h5py and the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ensure_default_dataset": "default",
    "HEIGHT": "layout",
    "NUM_CLASSES": "layout",
    "NUM_FRAMES": "layout",
    "NUM_INPUT_FRAMES": "layout",
    "SPLIT_HAS_MASKS": "layout",
    "SPLIT_ID_RANGES": "layout",
    "SPLIT_NUM_FRAMES": "layout",
    "SPLITS": "layout",
    "TARGET_FRAME_INDEX": "layout",
    "WIDTH": "layout",
    "RawDataError": "layout",
    "list_videos": "layout",
    "read_video": "layout",
    "scan_split": "layout",
    "IncompleteSplitError": "manifest",
    "Manifest": "manifest",
    "ManifestError": "manifest",
    "load_manifest": "manifest",
    "missing_hidden_ids": "manifest",
    "require_complete_split": "manifest",
    "PackError": "pack",
    "PackLockedError": "pack",
    "pack_dataset": "pack",
    "add_pseudo_masks": "pseudo_masks",
    "StagingError": "staging",
    "stage_to_local": "staging",
    "verify_dataset": "verify",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .default import ensure_default_dataset
    from .layout import (
        HEIGHT,
        NUM_CLASSES,
        NUM_FRAMES,
        NUM_INPUT_FRAMES,
        SPLIT_HAS_MASKS,
        SPLIT_ID_RANGES,
        SPLIT_NUM_FRAMES,
        SPLITS,
        TARGET_FRAME_INDEX,
        WIDTH,
        RawDataError,
        list_videos,
        read_video,
        scan_split,
    )
    from .manifest import (
        IncompleteSplitError,
        Manifest,
        ManifestError,
        load_manifest,
        missing_hidden_ids,
        require_complete_split,
    )
    from .pack import PackError, PackLockedError, pack_dataset
    from .pseudo_masks import add_pseudo_masks
    from .staging import StagingError, stage_to_local
    from .verify import verify_dataset
