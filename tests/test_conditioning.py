"""Buckets, image/mask preprocessing (golden + by hand), audio windows and Lab colour correction."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from support.golden import cases_with_prefix, load_case
from wan.generation.conditioning import (
    audio_window,
    audio_window_index,
    choose_bucket,
    image_to_tensor,
    lab_to_rgb,
    latent_masks,
    match_colors,
    resize_and_center_crop,
    rgb_to_lab,
    speaker_masks,
)

DIT_CASES = cases_with_prefix("dit_")


def _case_masks(name: str):
    """Build the masks of a dit_* case from its case.json, converting the reference's boxes to [x1, y1, x2, y2]."""
    build = load_case(name).meta["mask_build"]
    (src_h, src_w), (h, w), (lat_h, lat_w) = build["src_h_w"], build["target_h_w"], build["latent_h_w"]
    # The reference indexes mask[b[0]:b[2], b[1]:b[3]]: its boxes are [row0, col0, row1, col1].
    boxes = None if build["bbox"] is None else [[b[1], b[0], b[3], b[2]] for b in build["bbox"].values()]
    extra = {} if build["face_scale"] is None else {"face_scale": build["face_scale"]}
    masks = speaker_masks(src_h, src_w, build["human_number"], boxes, **extra)
    return masks, (h, w, lat_h, lat_w), boxes


@pytest.mark.parametrize("name", DIT_CASES)
def test_golden_mask_build(name: str) -> None:
    case = load_case(name)
    inputs = case.inputs()
    masks, (h, w, lat_h, lat_w), boxes = _case_masks(name)
    assert torch.equal(masks, inputs["mask_build.src_res_masks"].float())
    cropped = resize_and_center_crop(masks, h, w, "nearest")
    assert torch.equal(cropped, inputs["mask_build.after_resize_centercrop"].float())
    latent = latent_masks(masks, h, w, lat_h, lat_w, boxes)
    assert latent.dtype == torch.float32
    assert torch.equal(latent, inputs["ref_target_masks"])


def test_golden_pipeline_image_masks_and_audio_windows() -> None:
    case = load_case("pipeline_e2e")
    inputs, outputs = case.inputs(), case.outputs()
    config = case.meta["config"]
    h, w = config["target_h_w"]
    _, _, lat_h, lat_w = config["latent(C,T,H,W)"]
    pixels = inputs["cond_image_uint8_hwc"]
    image = Image.fromarray(pixels.numpy())
    assert torch.equal(image_to_tensor(image, h, w), outputs["cond_image_normalized"])
    masks = speaker_masks(pixels.shape[0], pixels.shape[1], config["human_number"], face_scale=config["face_scale"])
    assert torch.equal(latent_masks(masks, h, w, lat_h, lat_w), outputs["ref_target_masks"])
    full = inputs["audio_emb_person1"]
    index = audio_window_index(0, config["frame_num"], full.shape[0])
    assert torch.equal(index, outputs["audio_window_index"])
    assert torch.equal(audio_window(full, 0, config["frame_num"]), full[outputs["audio_window_index"]])


def test_choose_bucket() -> None:
    assert choose_bucket(480, 854, "multitalk-480") == (448, 896)  # 0.562 -> 0.50
    assert choose_bucket(1024, 1024, "multitalk-480") == (640, 640)
    assert choose_bucket(720, 1280, "multitalk-720") == (704, 1280)  # 0.5625 -> 0.55
    assert choose_bucket(1920, 1080, "multitalk-480") == (832, 448)  # 1.78 -> 1.86
    # exact ties go to the first key in table order
    assert choose_bucket(9, 4, "multitalk-480") == (896, 448)  # 2.25: 2.00 before 2.50
    assert choose_bucket(8, 25, "multitalk-480") == (320, 1216)  # 0.32: 0.26 before 0.38
    assert choose_bucket(9, 4, "multitalk-720") == (1408, 640)  # 2.25: 2.20 before 2.30
    with pytest.raises(ValueError):
        choose_bucket(10, 10, "multitalk-1080")


def test_nearest_resize_and_crop_by_hand() -> None:
    src = torch.arange(24, dtype=torch.float32).view(1, 4, 6)
    # scale max(2/4, 2/6) = 0.5 -> 2x3, nearest picks rows 0, 2 and cols 0, 2, 4; crop offset round(0.5) = 0
    assert torch.equal(resize_and_center_crop(src, 2, 2, "nearest"), src[:, [0, 2]][:, :, [0, 2]])
    src = torch.arange(20, dtype=torch.float32).view(1, 2, 10)
    # scale max(2/2, 2/10) = 1 -> unchanged; offset round((10 - 7)/2) = round(1.5) = 2
    assert torch.equal(resize_and_center_crop(src, 2, 7, "nearest"), src[:, :, 2:9])


def test_bilinear_resize_and_crop_geometry() -> None:
    # 100x300 -> scale 0.64 -> 64x192, crop columns 48..143 of the resized image: the middle third of the source.
    pixels = torch.zeros(100, 300, 3, dtype=torch.uint8)
    pixels[:, :75] = 255  # left quarter white, cut off by the crop
    pixels[:, 225:, 1] = 255  # right quarter green, cut off too
    pixels[:, 75:225, 2] = 200  # middle half blue
    out = resize_and_center_crop(Image.fromarray(pixels.numpy()), 64, 96)
    assert out.shape == (3, 64, 96) and out.dtype == torch.uint8
    assert torch.equal(out[:, :, 2:94], torch.tensor([0, 0, 200], dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 92))


def test_image_to_tensor_range() -> None:
    pixels = torch.tensor([[[0, 128, 255], [255, 255, 255]]], dtype=torch.uint8).expand(2, 2, 3).contiguous()
    x = image_to_tensor(Image.fromarray(pixels.numpy()), 2, 2)
    assert x.shape == (1, 3, 1, 2, 2) and x.dtype == torch.float32
    assert x[0, 0, 0, 0, 0].item() == -1.0 and x[0, 2, 0, 0, 0].item() == 1.0
    assert x[0, 1, 0, 0, 0].item() == pytest.approx((128 / 255 - 0.5) * 2, abs=1e-6)


def test_speaker_masks_box_convention_and_clipping() -> None:
    masks = speaker_masks(10, 20, 2, [[2, 1, 8, 5], [-5, 6, 50, 99]])
    expected1 = torch.zeros(10, 20)
    expected1[1:5, 2:8] = 1  # x = columns 2..7, y = rows 1..4
    expected2 = torch.zeros(10, 20)
    expected2[6:, :] = 1  # clipped to the image
    assert torch.equal(masks[0], expected1)
    assert torch.equal(masks[1], expected2)
    assert torch.equal(masks[2], ((expected1 + expected2) == 0).float())
    assert torch.equal(speaker_masks(10, 20, 1), torch.ones(3, 10, 20))


def test_speaker_masks_default_halves() -> None:
    masks = speaker_masks(100, 200, 2)
    # rows int(5.0):int(95.0); columns int(100·0.05):int(100·0.95) and the same + 100
    expected = torch.zeros(2, 100, 200)
    expected[0, 5:95, 5:95] = 1
    expected[1, 5:95, 105:195] = 1
    assert torch.equal(masks[:2], expected)
    assert masks[2].sum().item() == 100 * 200 - 2 * 90 * 90


def test_mask_errors() -> None:
    with pytest.raises(ValueError, match="speakers"):
        speaker_masks(10, 20, 3)
    with pytest.raises(ValueError, match="2 speakers"):
        speaker_masks(10, 20, 2, [[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="speaker 2"):
        speaker_masks(10, 20, 2, [[0, 0, 5, 5], [25, 0, 30, 5]])  # right of the image
    # 100x300 cropped to 64x96 keeps source columns ~75..224: a box on the far left disappears
    boxes = [[0, 0, 50, 100], [100, 0, 200, 100]]
    masks = speaker_masks(100, 300, 2, boxes)
    with pytest.raises(ValueError, match=r"speaker 1 mask \(box \[0, 0, 50, 100\]\)"):
        latent_masks(masks, 64, 96, 8, 12, boxes)


def test_audio_window_clamps_both_ends() -> None:
    index = audio_window_index(6, 5, 10)
    expected = torch.tensor(
        [[4, 5, 6, 7, 8], [5, 6, 7, 8, 9], [6, 7, 8, 9, 9], [7, 8, 9, 9, 9], [8, 9, 9, 9, 9]], dtype=torch.int64
    )
    assert torch.equal(index, expected)
    full = torch.arange(10 * 2 * 3, dtype=torch.float32).view(10, 2, 3)
    window = audio_window(full, 6, 5)
    assert window.shape == (5, 5, 2, 3)
    assert torch.equal(window[4, 1], full[9]) and torch.equal(window[0, 0], full[4])


# Published CIE Lab (D65, 2°) of the sRGB primaries (Lindbloom / easyrgb), and mid grey 128/255.
KNOWN_LAB = [
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((128 / 255,) * 3, (53.585, 0.0, 0.0)),
]


@pytest.mark.parametrize("rgb,lab", KNOWN_LAB)
def test_rgb_lab_known_values(rgb, lab) -> None:
    actual = rgb_to_lab(torch.tensor(rgb))
    assert torch.allclose(actual, torch.tensor(lab, dtype=torch.float64), atol=0.02)
    assert torch.allclose(lab_to_rgb(actual), torch.tensor(rgb, dtype=torch.float64), atol=1e-6)


def _ramp_image(h: int = 6, w: int = 8) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-0.6, 0.6, h), torch.linspace(-0.5, 0.7, w), indexing="ij")
    return torch.stack([xx, yy, 0.3 * xx - 0.2 * yy])


def test_match_colors_behaviour() -> None:
    reference = _ramp_image()
    same = reference[:, None].repeat(1, 2, 1, 1)
    assert torch.allclose(match_colors(same, reference, 1.0), same, atol=1e-5)
    assert match_colors(same, reference, 0.0) is same
    # a frame with shifted Lab statistics is mapped back onto the reference's
    lab = rgb_to_lab((reference.permute(1, 2, 0) + 1) / 2)
    shifted_lab = (lab - lab.mean((0, 1))) * torch.tensor([1.1, 0.9, 1.1], dtype=torch.float64) + lab.mean((0, 1))
    shifted_lab = shifted_lab + torch.tensor([3.0, -2.0, 2.0], dtype=torch.float64)
    shifted_rgb = lab_to_rgb(shifted_lab)
    assert 0 < shifted_rgb.min() and shifted_rgb.max() < 1  # in gamut, so the shift is exactly representable
    shifted = (shifted_rgb * 2 - 1).permute(2, 0, 1).float()[:, None]
    assert (shifted[:, 0] - reference).abs().max() > 0.05
    corrected = match_colors(shifted, reference, 1.0)
    assert torch.allclose(corrected[:, 0], reference, atol=1e-4)
    half = match_colors(shifted, reference, 0.5)
    assert torch.allclose(half[:, 0], (shifted[:, 0] + reference) / 2, atol=1e-4)


def test_match_colors_constant_frame_takes_reference_mean() -> None:
    reference = _ramp_image()
    flat = torch.full((3, 1, 6, 8), -0.2)
    out = match_colors(flat, reference, 1.0)
    out_lab = rgb_to_lab((out[:, 0].permute(1, 2, 0) + 1) / 2)
    ref_lab = rgb_to_lab((reference.permute(1, 2, 0) + 1) / 2)
    assert torch.allclose(out_lab.mean((0, 1)), ref_lab.mean((0, 1)), atol=0.05)
    assert out_lab.std((0, 1)).max() < 1e-4


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_match_colors_strength_range(strength: float) -> None:
    with pytest.raises(ValueError):
        match_colors(torch.zeros(3, 1, 2, 2), torch.zeros(3, 2, 2), strength)
