"""The raw competition layout: listing (both paddings), decoding, and every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SIZE, tiny_video_arrays, write_tiny_video
from PIL import Image

from hpcvp.data.layout import (
    NUM_FRAMES,
    NUM_INPUT_FRAMES,
    RawDataError,
    list_videos,
    missing_files,
    read_video,
    scan_split,
)


def test_list_videos_accepts_unpadded_and_zero_padded_names(tmp_path):
    write_tiny_video(tmp_path, "unlabeled", 2000)  # video_2000
    write_tiny_video(tmp_path, "unlabeled", 2001, padding=5)  # video_02001
    write_tiny_video(tmp_path, "val", 1370, padding=5)  # video_01370
    write_tiny_video(tmp_path, "train", 7, padding=3)  # video_007
    (tmp_path / "unlabeled" / "notes.txt").write_text("not a video")
    (tmp_path / "unlabeled" / "video_abc").mkdir()

    unlabeled = list_videos(tmp_path, "unlabeled")
    assert [video_id for video_id, _ in unlabeled] == [2000, 2001]
    assert [folder.name for _, folder in unlabeled] == ["video_2000", "video_02001"]
    assert list_videos(tmp_path, "val") == [(1370, tmp_path / "val" / "video_01370")]
    assert list_videos(tmp_path, "train") == [(7, tmp_path / "train" / "video_007")]
    assert list_videos(tmp_path, "hidden") == []  # absent split folder


def test_list_videos_refuses_duplicates_naming_both_and_accepts_any_id_per_split(tmp_path):
    first = write_tiny_video(tmp_path, "train", 5)
    second = write_tiny_video(tmp_path, "train", 5, padding=4)
    with pytest.raises(RawDataError, match="video id 5 also appears") as caught:
        list_videos(tmp_path, "train")
    assert str(first) in str(caught.value) and str(second) in str(caught.value)

    # the split is the folder: ids outside the course release's ranges are accepted
    write_tiny_video(tmp_path, "val", 12)
    write_tiny_video(tmp_path, "hidden", 1370, padding=5)
    write_tiny_video(tmp_path, "hidden", 3)
    assert [video_id for video_id, _ in list_videos(tmp_path, "val")] == [12]
    assert [video_id for video_id, _ in list_videos(tmp_path, "hidden")] == [3, 1370]
    with pytest.raises(ValueError, match="unknown split"):
        list_videos(tmp_path, "test")


def test_scan_split_lists_misnamed_entries_and_empty_split_folders(tmp_path):
    write_tiny_video(tmp_path, "train", 1)
    (tmp_path / "train" / "video_abc").mkdir()
    (tmp_path / "train" / "video_2").write_text("a file, not a folder")
    (tmp_path / "train" / ".DS_Store").write_text("")
    (tmp_path / "val").mkdir()
    train = scan_split(tmp_path, "train")
    assert [video_id for video_id, _ in train.videos] == [1]
    assert train.ignored == [
        (tmp_path / "train" / "video_2", "not a folder"),
        (tmp_path / "train" / "video_abc", "not named video_<digits>"),
    ]
    val = scan_split(tmp_path, "val")
    assert val.videos == [] and [why for _, why in val.ignored] == ["empty split folder (no video_<digits> folders)"]
    assert scan_split(tmp_path, "hidden").ignored == []  # an absent split folder is not an error


@pytest.mark.parametrize("split, video_id", [("train", 3), ("val", 1003), ("unlabeled", 2003), ("hidden", 15003)])
def test_read_video_returns_exact_pixels_and_masks(tmp_path, split, video_id):
    folder = write_tiny_video(tmp_path, split, video_id)
    frames, masks = read_video(folder, split, TINY_SIZE)
    expected_frames, expected_masks = tiny_video_arrays(video_id, split)
    assert frames.dtype == np.uint8 and frames.shape == (len(expected_frames), *TINY_SIZE, 3)
    assert frames.shape[0] == (NUM_INPUT_FRAMES if split == "hidden" else NUM_FRAMES)
    np.testing.assert_array_equal(frames, expected_frames)
    if expected_masks is None:
        assert masks is None
    else:
        assert masks.dtype == np.uint8
        np.testing.assert_array_equal(masks, expected_masks)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.int16, np.int8, np.uint8])
def test_any_integer_mask_dtype_is_accepted_as_uint8(tmp_path, dtype):
    folder = write_tiny_video(tmp_path, "train", 1, mask_dtype=dtype)
    _, masks = read_video(folder, "train", TINY_SIZE)
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, tiny_video_arrays(1, "train")[1])


def test_rgba_and_grey_pngs_are_read_as_rgb(tmp_path):
    folder = write_tiny_video(tmp_path, "unlabeled", 2000)
    rgb = np.asarray(Image.open(folder / "image_0.png"))
    alpha = np.full((*TINY_SIZE, 1), 255, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(folder / "image_0.png")
    Image.fromarray(rgb[..., 0], "L").save(folder / "image_1.png")
    frames, _ = read_video(folder, "unlabeled", TINY_SIZE)
    np.testing.assert_array_equal(frames[0], rgb)
    np.testing.assert_array_equal(frames[1], np.repeat(rgb[..., :1], 3, axis=-1))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    # name: (how to break video_4 of train, the file the error must name, a phrase of the reason)
    "truncated_png": (lambda f: _truncate(f / "image_5.png"), "image_5.png", "unreadable PNG"),
    "unreadable_png": (
        lambda f: (f / "image_2.png").write_bytes(b"this is not a png"),
        "image_2.png",
        "unreadable PNG",
    ),
    "missing_frame": (lambda f: (f / "image_21.png").unlink(), "image_21.png", "missing frame"),
    "wrong_image_size": (
        lambda f: Image.fromarray(np.zeros((TINY_SIZE[0] + 2, TINY_SIZE[1], 3), np.uint8)).save(f / "image_9.png"),
        "image_9.png",
        "is 42x60 (HxW), expected 40x60",
    ),
    "mask_wrong_shape": (
        lambda f: np.save(f / "mask.npy", np.zeros((21, *TINY_SIZE), np.uint8)),
        "mask.npy",
        "mask shape is (21, 40, 60)",
    ),
    "mask_value_too_high": (
        lambda f: np.save(f / "mask.npy", np.full((22, *TINY_SIZE), 49, np.int64)),
        "mask.npy",
        "values span 49..49",
    ),
    "mask_value_negative": (
        lambda f: np.save(f / "mask.npy", np.full((22, *TINY_SIZE), -1, np.int32)),
        "mask.npy",
        "values span -1..-1",
    ),
    "mask_float_dtype": (
        lambda f: np.save(f / "mask.npy", np.zeros((22, *TINY_SIZE), np.float32)),
        "mask.npy",
        "dtype is float32",
    ),
    "mask_unreadable": (lambda f: (f / "mask.npy").write_bytes(b"garbage"), "mask.npy", "unreadable mask"),
    "mask_missing": (lambda f: (f / "mask.npy").unlink(), "mask.npy", "missing mask"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_read_video_names_the_bad_file(tmp_path, case):
    breaker, bad_name, reason = BAD_INPUTS[case]
    folder = write_tiny_video(tmp_path, "train", 4)
    breaker(folder)
    with pytest.raises(RawDataError) as caught:
        read_video(folder, "train", TINY_SIZE)
    assert caught.value.path == folder / bad_name
    assert str(folder / bad_name) in str(caught.value)
    assert reason in str(caught.value)


def test_missing_files_lists_absent_frames_and_mask_without_reading(tmp_path):
    folder = write_tiny_video(tmp_path, "val", 1001)
    (folder / "image_3.png").unlink()
    (folder / "mask.npy").unlink()
    assert missing_files(folder, "val") == [folder / "image_3.png", folder / "mask.npy"]
    hidden = write_tiny_video(tmp_path, "hidden", 15000)
    assert missing_files(hidden, "hidden") == []


def test_synthetic_generator_output_reads_back_exactly(synthetic_raw):
    from hpcvp.data.synthetic import render_video

    videos = list_videos(synthetic_raw, "train")
    video_id, folder = videos[0]
    frames, masks = read_video(folder, "train", TINY_SIZE)
    expected_frames, expected_masks = render_video(video_id, 3, TINY_SIZE)
    np.testing.assert_array_equal(frames, expected_frames)
    np.testing.assert_array_equal(masks, expected_masks)
    hidden_id, hidden_folder = list_videos(synthetic_raw, "hidden")[0]
    hidden_frames, hidden_masks = read_video(hidden_folder, "hidden", TINY_SIZE)
    assert hidden_id >= 15000 and hidden_frames.shape[0] == NUM_INPUT_FRAMES and hidden_masks is None


@pytest.mark.parametrize("decoder", ["libspng", "pillow"])
def test_png_frames_decode_like_pillow_on_multi_chunk_and_every_filter(tmp_path, monkeypatch, decoder):
    from hpcvp.data import layout

    if decoder == "libspng":
        assert layout.pyspng is not None, "pyspng is installed with hpcvp on Linux x86_64 (setup.cfg)"
    else:
        monkeypatch.setattr(layout, "pyspng", None)  # a platform without a pyspng wheel
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (160, 240, 3), dtype=np.uint8)  # incompressible: several IDAT chunks
    ramp = np.broadcast_to(np.arange(240, dtype=np.uint8)[None, :, None], (160, 240, 3)).copy()
    for index, (image, options) in enumerate([(noise, {}), (ramp, {"optimize": True}), (ramp, {"compress_level": 0})]):
        path = tmp_path / f"image_{index}.png"
        Image.fromarray(image).save(path, **options)
        out = np.full_like(image, 7)
        assert layout.read_frame(path, (160, 240), out) is out
        np.testing.assert_array_equal(out, image)
    with pytest.raises(RawDataError, match="image is 160x240"):
        layout.read_frame(tmp_path / "image_0.png", (240, 160))
    data = (tmp_path / "image_0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(RawDataError, match=r"cut\.png.*unreadable PNG"):
        layout.read_frame(tmp_path / "cut.png", (160, 240))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10  # one bit inside the image data: the chunk's CRC no longer matches
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    with pytest.raises(RawDataError, match=r"flipped\.png.*unreadable PNG"):
        layout.read_frame(tmp_path / "flipped.png", (160, 240))


def test_uint8_mask_is_read_into_the_buffer_and_still_checked(tmp_path):
    folder = write_tiny_video(tmp_path, "train", 3)
    expected = tiny_video_arrays(3, "train")[1]
    out = np.full((NUM_FRAMES, *TINY_SIZE), 7, np.uint8)
    _, masks = read_video(folder, "train", TINY_SIZE, masks_out=out)
    assert masks is out
    np.testing.assert_array_equal(out, expected)
    np.save(folder / "mask.npy", np.asfortranarray(expected.astype(np.uint8)))  # other order: np.load path
    _, masks = read_video(folder, "train", TINY_SIZE, masks_out=out)
    np.testing.assert_array_equal(masks, expected)
    bad = expected.astype(np.uint8)
    bad[0, 0, 0] = 60
    np.save(folder / "mask.npy", bad)
    with pytest.raises(RawDataError, match="mask values span"):
        read_video(folder, "train", TINY_SIZE, masks_out=out)
