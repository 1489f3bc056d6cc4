"""Data layer: the competition's raw layout, the synthetic generator, sharded HDF5 and datasets.

Modules: ``layout`` (raw folders), ``manifest`` (packed-set format), ``pack`` + ``pack_decode``
(raw -> shards), ``verify``, ``pseudo_masks``, ``staging`` (node-local copy), ``pack_cli`` (the
``hpcvp-pack`` command), ``shard_files`` (hashing, locking, HDF5 opening), ``datasets``,
``synthetic``, ``default``.

Heavy imports (torch for the datasets, pybullet for the generator) stay in their submodules:
``from hpcvp.data.datasets import ClipDataset``.
"""

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
