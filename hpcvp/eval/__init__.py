"""Evaluation: the competition's Jaccard score and the PNG pictures written at each evaluation."""

from hpcvp.eval.jaccard import ConfusionMatrix
from hpcvp.eval.pictures import (
    PALETTE,
    colorize_mask,
    flow_image,
    image_to_uint8,
    save_grid,
    slot_masks_image,
    slot_tiles,
)

__all__ = [
    "PALETTE",
    "ConfusionMatrix",
    "colorize_mask",
    "flow_image",
    "image_to_uint8",
    "save_grid",
    "slot_masks_image",
    "slot_tiles",
]
