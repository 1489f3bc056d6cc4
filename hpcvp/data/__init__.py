"""Data layer: the competition's raw layout, the synthetic generator, sharded HDF5 and datasets.

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
)
from .shards import (
    Manifest,
    ManifestError,
    StagingError,
    add_pseudo_masks,
    load_manifest,
    pack_dataset,
    stage_to_local,
    verify_dataset,
)
