"""The competition's raw layout and its constants.

``<root>/{train,val,unlabeled,hidden}/video_<id>/image_<0..21>.png`` plus ``mask.npy``
(22, 160, 240) in train and val; hidden videos carry image_0..image_10 only.
"""

from __future__ import annotations

NUM_CLASSES = 49  # 3 shapes x 2 materials x 8 colours + background (class 0)
HEIGHT, WIDTH = 160, 240
NUM_FRAMES = 22
NUM_INPUT_FRAMES = 11  # frames 1..11 are given; frame 22 (index 21) is scored
TARGET_FRAME_INDEX = NUM_FRAMES - 1

SPLITS = ("train", "val", "unlabeled", "hidden")
# Inclusive-exclusive id ranges per split; hidden has no upper bound.
SPLIT_ID_RANGES = {
    "train": (0, 1000),
    "val": (1000, 2000),
    "unlabeled": (2000, 15000),
    "hidden": (15000, None),
}
SPLIT_HAS_MASKS = {"train": True, "val": True, "unlabeled": False, "hidden": False}
SPLIT_NUM_FRAMES = {"train": NUM_FRAMES, "val": NUM_FRAMES, "unlabeled": NUM_FRAMES, "hidden": NUM_INPUT_FRAMES}
