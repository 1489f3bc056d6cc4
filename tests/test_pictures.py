"""Pictures: palette, mask colouring, PNG grids (size, pixels, atomic write), flow and slot images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpcvp.eval.pictures import (
    CELL_GAP,
    PALETTE,
    colorize_mask,
    flow_image,
    image_to_uint8,
    save_grid,
    slot_masks_image,
    slot_tiles,
)


def test_palette_is_fixed_distinct_with_black_background():
    assert PALETTE.shape == (49, 3) and PALETTE.dtype == np.uint8
    assert tuple(PALETTE[0]) == (0, 0, 0)
    assert len({tuple(color) for color in PALETTE}) == 49
    # Every object colour is clearly brighter than the background.
    assert PALETTE[1:].max(axis=1).min() >= 150
    with pytest.raises(ValueError):
        PALETTE[1, 0] = 1  # read-only: nobody can change the colours in place


def test_colorize_mask_numpy_and_torch():
    mask = torch.randint(0, 49, (2, 16, 24), dtype=torch.uint8)
    rgb = colorize_mask(mask)
    assert rgb.shape == (2, 16, 24, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[1, 3, 5], PALETTE[int(mask[1, 3, 5])])
    assert np.array_equal(colorize_mask(mask.numpy()), rgb)
    with pytest.raises(ValueError, match="49"):
        colorize_mask(np.full((4, 4), 49))
    with pytest.raises(TypeError):
        colorize_mask(np.zeros((4, 4), dtype=np.float32))


def test_image_to_uint8_layouts():
    chw = torch.rand(3, 10, 12)
    hwc = image_to_uint8(chw)
    assert hwc.shape == (10, 12, 3) and hwc.dtype == np.uint8
    assert hwc[2, 3, 1] == round(float(chw[1, 2, 3]) * 255)
    assert image_to_uint8(np.full((5, 6), 2.0)).max() == 255  # clamped grey
    with pytest.raises(ValueError):
        image_to_uint8(np.zeros((2, 5, 6, 3), np.uint8))


def _png(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path)
    image.load()
    return image


def test_save_grid_size_and_pixels_without_titles(tmp_path):
    height, width = 40, 60
    first = colorize_mask(np.random.randint(0, 49, (height, width)))
    second = np.full((height, width, 3), 200, np.uint8)
    rows = [[first, second, first], [second, first, second]]
    path = save_grid(tmp_path / "sub" / "grid.png", rows)
    image = _png(path)
    assert image.mode == "RGB"
    assert image.size == (3 * width + 2 * CELL_GAP, 2 * height + CELL_GAP)
    pixels = np.asarray(image)
    assert np.array_equal(pixels[:height, :width], first)
    assert np.array_equal(pixels[height + CELL_GAP :, width + CELL_GAP : 2 * width + CELL_GAP], first)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left


def test_save_grid_with_titles_and_mixed_inputs(tmp_path):
    height, width = 160, 240
    frame = torch.rand(3, height, width)  # float CHW frame
    mask = colorize_mask(torch.randint(0, 49, (height, width)))
    flow = flow_image(torch.randn(2, height, width) * 3)
    rows = [[frame, mask], [flow, mask]]
    path = save_grid(tmp_path / "titled.png", rows, titles=[["frame 22 (true)", "mask (true)"], "flow 11->12"])
    image = _png(path)
    width_px, height_px = image.size
    assert width_px == 2 * width + CELL_GAP
    label_strip = (height_px - 2 * height - CELL_GAP) / 2
    assert label_strip == int(label_strip) and 8 <= label_strip <= 30
    pixels = np.asarray(image)
    strip = pixels[: int(label_strip), :width]
    assert (strip < 128).any(), "the label text should be drawn"
    assert np.array_equal(pixels[int(label_strip) : int(label_strip) + height, width + CELL_GAP :], mask)
    # Overwriting is atomic and replaces the file.
    save_grid(path, [[mask]])
    assert _png(path).size == (width, height)
    with pytest.raises(ValueError, match="titles"):
        save_grid(tmp_path / "bad.png", rows, titles=["only one"])
    assert not (tmp_path / "bad.png").exists()


def test_flow_image_shapes():
    single = flow_image(torch.randn(2, 20, 30))
    assert single.shape == (20, 30, 3) and single.dtype == np.uint8
    batch = flow_image(torch.randn(4, 2, 20, 30))
    assert batch.shape == (4, 20, 30, 3)
    zero = flow_image(torch.zeros(2, 8, 8))
    assert (zero == 255).all()  # no motion is white in the flow colour wheel
    with pytest.raises(ValueError):
        flow_image(torch.randn(3, 20, 30))


def test_slot_pictures(tmp_path):
    masks = torch.randn(5, 1, 20, 30).softmax(dim=0)
    blended = slot_masks_image(masks)
    assert blended.shape == (20, 30, 3) and blended.dtype == np.uint8
    hard = torch.zeros(5, 1, 20, 30)
    hard[2] = 1.0
    assert np.array_equal(slot_masks_image(hard)[0, 0], PALETTE[3])  # slot k -> palette colour k+1
    tiles = slot_tiles(masks, torch.rand(5, 3, 20, 30))
    assert len(tiles) == 5 and all(t.shape == (20, 30, 3) for t in tiles)
    grey = slot_tiles(masks)
    assert grey[0].shape == (20, 30, 3)
    path = save_grid(tmp_path / "slots.png", [[blended] + tiles, grey], titles=["slots", None])
    assert _png(path).size[0] == 6 * 30 + 5 * CELL_GAP
