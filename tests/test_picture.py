"""The source picture as a viewer shows it: EXIF orientation (all eight, by the EXIF spec's own transforms), alpha
over white (hand-computed), 16-bit grey (hand-computed), and a phone-style portrait photo served upright through the
runner (the mp4 read by ffprobe)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.video import PictureInputError, read_picture
from support.cog_inputs import run_inputs
from support.ffmpeg_tools import ffmpeg_tool

ORIENTATION = 0x0112
# The picture one sees, 3 rows x 2 columns of distinct colours: any flip or turn moves some colour.
UPRIGHT = np.array(
    [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]], [[0, 255, 255], [255, 0, 255]]], dtype=np.uint8
)


def _stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for `upright` under EXIF `orientation`: the tag says how to turn the stored pixels
    to show them (6: 90 degrees clockwise), so the camera stored the inverse turn."""
    return {
        1: upright,
        2: upright[:, ::-1],  # shown mirrored left-right
        3: upright[::-1, ::-1],  # shown turned 180 degrees
        4: upright[::-1],  # shown mirrored top-bottom
        5: upright.transpose(1, 0, 2),  # shown transposed (mirrored about the main diagonal)
        6: np.rot90(upright, 1),  # shown turned 90 degrees clockwise: stored turned counter-clockwise
        7: np.rot90(upright, 2).transpose(1, 0, 2),  # shown mirrored about the anti-diagonal (its own inverse)
        8: np.rot90(upright, -1),  # shown turned 90 degrees counter-clockwise: stored turned clockwise
    }[orientation]


def _file(tmp_path: Path, image: Image.Image, name: str, **save) -> Path:
    path = tmp_path / name
    image.save(path, **save)
    return path


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_upright(tmp_path, orientation):
    stored = Image.fromarray(np.ascontiguousarray(_stored(UPRIGHT, orientation)))
    path = _file(tmp_path, stored, "photo.png", exif=_exif(orientation))
    np.testing.assert_array_equal(np.asarray(read_picture(path)), UPRIGHT)


def test_a_phone_jpeg_turned_on_its_side_reads_upright(tmp_path):
    # A 64 x 32 landscape sensor image, top half red and bottom half blue as one sees it; tag 6 stores it on its side.
    upright = np.zeros((64, 32, 3), np.uint8)
    upright[:32, :, 0] = 255
    upright[32:, :, 2] = 255
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    assert stored.size == (64, 32)
    picture = read_picture(_file(tmp_path, stored, "phone.jpg", exif=_exif(6), quality=95))
    assert picture.size == (32, 64) and picture.mode == "RGB"
    shown = np.asarray(picture).astype(int)
    assert np.abs(shown[4:28, 4:28] - [255, 0, 0]).max() < 8  # away from the JPEG's edge between the halves
    assert np.abs(shown[36:60, 4:28] - [0, 0, 255]).max() < 8


@pytest.mark.parametrize("exif", [b"Exif\x00\x00" + b"\xff" * 30, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"])
def test_a_damaged_exif_block_reads_as_stored_rather_than_failing(tmp_path, exif):
    stored = np.ascontiguousarray(np.repeat(np.repeat(UPRIGHT, 8, 0), 8, 1))  # 8 x 8 blocks: JPEG keeps them flat
    path = _file(tmp_path, Image.fromarray(stored), "odd.jpg", exif=exif, quality=95, subsampling=0)
    shown = np.asarray(read_picture(path))  # Pillow warns of the damage and keeps the stored orientation
    assert shown.shape == stored.shape and np.abs(shown.astype(int) - stored).mean() < 4


def test_transparency_lies_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)  # transparent black, as cut-out tools leave the background
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red: unchanged
    rgba[0, 1] = [255, 0, 0, 51]  # 20 % red over white: 255 - 0.2 x 255 = 204 in green and blue
    rgba[1, 0] = [0, 0, 0, 204]  # 80 % black over white: 0.2 x 255 = 51
    shown = np.asarray(read_picture(_file(tmp_path, Image.fromarray(rgba), "cutout.png"))).astype(int)
    expected = np.array([[[255, 0, 0], [255, 204, 204]], [[51, 51, 51], [255, 255, 255]]])
    assert np.abs(shown - expected).max() <= 1


def test_a_palette_image_with_a_transparent_index_lies_over_white(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    palette.putdata([0, 1])  # index 0 is declared transparent below; index 1 is green
    path = _file(tmp_path, palette, "sticker.png", transparency=0)
    np.testing.assert_array_equal(np.asarray(read_picture(path)), [[[255, 255, 255], [0, 128, 0]]])


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257, 32896], [65535, 128 * 257 + 128, 1000]], dtype=np.uint16)
    shown = np.asarray(read_picture(_file(tmp_path, Image.fromarray(wide), "scan.png")))
    # v / 257, rounded: 0, 1, 128; 255, 128.498 -> 128, 3.89 -> 4; the same in all three channels.
    expected = np.array([[0, 1, 128], [255, 128, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(shown, np.repeat(expected[..., None], 3, axis=2))


def test_an_ordinary_picture_reads_as_convert_rgb(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(read_picture(_file(tmp_path, Image.fromarray(pixels), "a.png"))), pixels)
    grey = pixels[..., 0]
    np.testing.assert_array_equal(
        np.asarray(read_picture(_file(tmp_path, Image.fromarray(grey), "g.png"))), np.repeat(grey[..., None], 3, 2)
    )


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"not an image at all"])
def test_a_file_that_is_no_picture_names_the_input_and_not_the_path(tmp_path, content):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(PictureInputError) as refused:
        read_picture(path, name="image")
    message = str(refused.value)
    assert message.startswith("image: cannot read the file as an image") and "PNG, JPEG or WebP" in message
    assert str(tmp_path) not in message


def test_a_truncated_picture_fails_rather_than_reading_grey(tmp_path):
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(PictureInputError, match="^image: "):
        read_picture(path)


def test_a_portrait_phone_photo_makes_a_portrait_video(runner, tmp_path):
    """The runner picks its size bucket from the picture one sees: a landscape sensor image tagged to be shown
    turned (EXIF 6) is a portrait picture, and the video comes out portrait."""
    with Image.open("examples/two_people.png") as example:
        upright = np.asarray(example.convert("RGB").resize((128, 256)))  # portrait, 1:2
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # landscape on disk
    photo = _file(tmp_path, stored, "portrait.jpg", exif=_exif(6), quality=95)
    video = runner.run(**run_inputs(image=str(photo), audio="examples/person1.wav", num_frames=5, seed=1, fast=True))
    try:
        command = [ffmpeg_tool("ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_streams", "-of", "json"]
        stream = json.loads(subprocess.run([*command, str(video)], capture_output=True, check=True).stdout)["streams"][
            0
        ]
    finally:
        Path(video).unlink()
    assert stream["height"] > stream["width"], stream
