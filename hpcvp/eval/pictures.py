"""Pictures written at each evaluation: a fixed 49-colour palette, labelled PNG grids, flow and slot images.

Everything returns / accepts channel-last uint8 numpy arrays (H, W, 3); torch tensors are accepted
as inputs and moved to the CPU.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from hpcvp.data.layout import NUM_CLASSES


def _build_palette(num_colors: int) -> np.ndarray:
    """Class 0 (background) black; the others spread around the hue circle by the golden angle,
    cycling three saturation/value levels so neighbouring ids stay distinguishable."""
    colors = [(0, 0, 0)]
    levels = [(0.95, 1.0), (0.6, 0.9), (1.0, 0.65)]
    for i in range(1, num_colors):
        hue = (i * 0.618033988749895) % 1.0
        saturation, value = levels[i % len(levels)]
        red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
        colors.append((round(red * 255), round(green * 255), round(blue * 255)))
    palette = np.array(colors, dtype=np.uint8)
    palette.setflags(write=False)
    return palette


PALETTE: np.ndarray = _build_palette(NUM_CLASSES)  # (49, 3) uint8, read-only

LABEL_PAD = 2
CELL_GAP = 2


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def colorize_mask(mask) -> np.ndarray:
    """Integer class mask (..., H, W) -> (..., H, W, 3) uint8 in PALETTE colours."""
    labels = _to_numpy(mask)
    if labels.dtype.kind not in "iub":
        raise TypeError(f"colorize_mask wants integer class labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(PALETTE)):
        raise ValueError(f"mask values must be in [0, {len(PALETTE)}), found [{labels.min()}, {labels.max()}]")
    return PALETTE[labels]


def image_to_uint8(image) -> np.ndarray:
    """A frame as (H, W, 3) uint8: accepts uint8 (H, W, 3), float in [0, 1] (clamped), (3, H, W) or (H, W) gray."""
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W, 3), (3, H, W) or (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind == "f":
        return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array.astype(np.uint8) * 255)
    raise TypeError(f"cannot turn dtype {array.dtype} into an image (use uint8 or float in [0, 1])")


def flow_image(flow) -> np.ndarray:
    """Optical flow (2, H, W) or (B, 2, H, W) -> (H, W, 3) or (B, H, W, 3) uint8 via torchvision.utils.flow_to_image."""
    from torchvision.utils import flow_to_image

    tensor = flow if isinstance(flow, torch.Tensor) else torch.as_tensor(np.asarray(flow))
    tensor = tensor.detach().cpu().float()
    if tensor.ndim not in (3, 4) or tensor.shape[-3] != 2:
        raise ValueError(f"flow must be (2, H, W) or (B, 2, H, W), got {tuple(tensor.shape)}")
    rgb = flow_to_image(tensor)
    return np.ascontiguousarray(rgb.movedim(-3, -1).numpy())


def slot_masks_image(masks) -> np.ndarray:
    """Slot alpha masks (K, 1, H, W) or (K, H, W), summing to 1 over K -> (H, W, 3) uint8.

    Each slot k gets palette colour k+1 (background black is skipped); pixels blend the colours by
    their alpha, so sharp masks give flat regions and uncertain pixels look mixed.
    """
    alpha = _to_numpy(masks).astype(np.float32)
    if alpha.ndim == 4 and alpha.shape[1] == 1:
        alpha = alpha[:, 0]
    if alpha.ndim != 3:
        raise ValueError(f"slot masks must be (K, 1, H, W) or (K, H, W), got shape {alpha.shape}")
    num_slots = alpha.shape[0]
    colors = PALETTE[1 + np.arange(num_slots) % (len(PALETTE) - 1)].astype(np.float32)
    blended = np.einsum("khw,kc->hwc", alpha, colors)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def slot_tiles(masks, recons=None) -> list[np.ndarray]:
    """One (H, W, 3) uint8 tile per slot: the slot's RGB reconstruction (values in [0, 1]) times its
    mask over white when ``recons`` (K, 3, H, W) is given, else the mask in grey levels."""
    alpha = _to_numpy(masks).astype(np.float32)
    if alpha.ndim == 4 and alpha.shape[1] == 1:
        alpha = alpha[:, 0]
    if alpha.ndim != 3:
        raise ValueError(f"slot masks must be (K, 1, H, W) or (K, H, W), got shape {alpha.shape}")
    if recons is None:
        return [image_to_uint8(np.clip(a, 0.0, 1.0)) for a in alpha]
    rgb = np.clip(_to_numpy(recons).astype(np.float32), 0.0, 1.0)
    if rgb.ndim != 4 or rgb.shape[0] != alpha.shape[0] or rgb.shape[1] != 3 or rgb.shape[2:] != alpha.shape[1:]:
        raise ValueError(f"slot recons must be (K, 3, H, W) matching masks {alpha.shape}, got {rgb.shape}")
    tiles = []
    for k in range(alpha.shape[0]):
        weight = alpha[k][None]
        tiles.append(image_to_uint8(rgb[k] * weight + (1.0 - weight)))
    return tiles


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _cell_titles(titles, rows) -> list[list[str | None]]:
    """Normalise titles: None, or per row a str (labels the row's first cell) or a list of str per cell."""
    if titles is None:
        return [[None] * len(row) for row in rows]
    if len(titles) != len(rows):
        raise ValueError(f"titles has {len(titles)} entries for {len(rows)} rows")
    out = []
    for row_index, (row, title) in enumerate(zip(rows, titles)):
        if title is None or isinstance(title, str):
            out.append([title] + [None] * (len(row) - 1))
        else:
            title = list(title)
            if len(title) != len(row):
                raise ValueError(f"titles[{row_index}] has {len(title)} labels for {len(row)} images")
            out.append(title)
    return out


def save_grid(path, rows: Sequence[Sequence], titles=None) -> Path:
    """Write a grid of images as one PNG, atomically (temporary name + os.replace).

    rows: list of rows, each a list of images (H, W, 3) uint8 (anything ``image_to_uint8`` accepts;
    cells may differ in size and are placed top-left in cells of the largest size).
    titles: None, or one entry per row: a str labelling the row's first image, or a list with one
    str (or None) per image. Labels are drawn in a strip above each image.
    """
    rows = [[image_to_uint8(image) for image in row] for row in rows]
    if not rows or not any(rows):
        raise ValueError("save_grid needs at least one image")
    labels = _cell_titles(titles, rows)
    font = _font()
    any_label = any(label for row in labels for label in row)
    label_height = 0
    if any_label:
        _left, _top, _right, bottom = font.getbbox("Ag")
        label_height = bottom + 2 * LABEL_PAD
    cell_h = max(image.shape[0] for row in rows for image in row)
    cell_w = max(image.shape[1] for row in rows for image in row)
    num_cols = max(len(row) for row in rows)
    step_y = cell_h + label_height + CELL_GAP
    step_x = cell_w + CELL_GAP
    canvas = Image.new("RGB", (num_cols * step_x - CELL_GAP, len(rows) * step_y - CELL_GAP), (255, 255, 255))
    for row_index, row in enumerate(rows):
        for col_index, image in enumerate(row):
            x0, y0 = col_index * step_x, row_index * step_y
            canvas.paste(Image.fromarray(image), (x0, y0 + label_height))
            label = labels[row_index][col_index]
            if label:
                # Draw into a strip of the cell's width so long labels are clipped, not spilled.
                strip = Image.new("RGB", (cell_w, label_height), (255, 255, 255))
                ImageDraw.Draw(strip).text((LABEL_PAD, LABEL_PAD), str(label), fill=(0, 0, 0), font=font)
                canvas.paste(strip, (x0, y0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
