"""Conditioning inputs of the pipeline: size buckets, image preprocessing, speaker masks, audio windows, and the
Lab colour correction applied to decoded clips.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..configs import ASPECT_RATIO_BUCKETS, VAE_STRIDE

MAX_SPEAKERS = 2


class SpeakerRegionError(ValueError):
    """A speaker whose region (their box, or the default half) holds nothing the DiT can attend to: no pixel of the
    image, or nothing of the part the crop to the video's size keeps. `speaker` counts from 1."""

    def __init__(self, speaker: int, message: str):
        super().__init__(message)
        self.speaker = speaker


def choose_bucket(src_h: int, src_w: int, size_bucket: str | Mapping[str, Sequence[int]]) -> tuple[int, int]:
    """Target (h, w) of the bucket whose key is closest to src_h / src_w (first in table order on ties).

    `size_bucket` names a table of `ASPECT_RATIO_BUCKETS` or is a custom table `{"h/w": [h, w]}`.
    """
    if isinstance(size_bucket, Mapping):
        buckets = size_bucket
    elif size_bucket in ASPECT_RATIO_BUCKETS:
        buckets = ASPECT_RATIO_BUCKETS[size_bucket]
    else:
        raise ValueError(f"unknown size bucket {size_bucket!r}; expected one of {list(ASPECT_RATIO_BUCKETS)}")
    ratio = src_h / src_w
    key = min(buckets, key=lambda k: abs(float(k) - ratio))
    h, w = buckets[key]
    return h, w


def _resized_size(src_h: int, src_w: int, h: int, w: int) -> tuple[int, int]:
    """Smallest size covering (h, w) at the source aspect ratio: ceil(s·src) with s = max(h/src_h, w/src_w)."""
    scale = max(h / src_h, w / src_w)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def _center_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop the last two dims to (h, w) with offsets round((size - target) / 2) (Python round, half to even)."""
    top = int(round((x.shape[-2] - h) / 2.0))
    left = int(round((x.shape[-1] - w) / 2.0))
    return x[..., top : top + h, left : left + w]


def resize_and_center_crop(img: Image.Image | torch.Tensor, h: int, w: int, mode: str = "bilinear") -> torch.Tensor:
    """Scale to cover (h, w), keeping the aspect ratio, then center-crop to exactly (h, w).

    `bilinear`: a PIL image (or uint8 `[3, H, W]` tensor) resized by PIL's antialiased bilinear filter; returns uint8
    `[3, h, w]`. `nearest`: a `[C, H, W]` tensor (masks) resized by PyTorch `nearest` (src = floor(dst·in/out));
    returns `[C, h, w]` in the input dtype.
    """
    if mode == "bilinear":
        if isinstance(img, torch.Tensor):
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        new_h, new_w = _resized_size(img.height, img.width, h, w)
        resized = np.asarray(img.convert("RGB").resize((new_w, new_h), resample=Image.BILINEAR))
        return _center_crop(torch.from_numpy(resized.copy()).permute(2, 0, 1), h, w).contiguous()
    if mode == "nearest":
        if not isinstance(img, torch.Tensor) or img.ndim != 3:
            raise ValueError("nearest mode takes a [C, H, W] tensor")
        new_h, new_w = _resized_size(img.shape[-2], img.shape[-1], h, w)
        resized = F.interpolate(img[None], size=(new_h, new_w), mode="nearest")[0]
        return _center_crop(resized, h, w).contiguous()
    raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")


def image_to_tensor(img: Image.Image, h: int, w: int) -> torch.Tensor:
    """Condition image → `[1, 3, 1, h, w]` float32 in [-1, 1] (resize, center crop, /255, (x - 0.5)·2)."""
    pixels = resize_and_center_crop(img, h, w, "bilinear")
    x = pixels[None, :, None] / 255
    return (x - 0.5) * 2


def speaker_masks(
    src_h: int,
    src_w: int,
    num_speakers: int,
    bboxes: Sequence[Sequence[float]] | None = None,
    face_scale: float = 0.05,
) -> torch.Tensor:
    """`[3, src_h, src_w]` float masks (speaker 1, speaker 2, background) at source-image resolution.

    One speaker: three all-ones masks. Two speakers: `bboxes` as `[x1, y1, x2, y2]` per speaker in source pixels
    (x = column, y = row), clipped to the image; without boxes the left / right halves, inset by `face_scale`.
    Background is 1 where no speaker mask is.
    """
    if not 1 <= num_speakers <= MAX_SPEAKERS:
        raise ValueError(f"MultiTalk supports 1 or {MAX_SPEAKERS} speakers, got {num_speakers}")
    if bboxes is not None and len(bboxes) != num_speakers:
        raise ValueError(f"got {len(bboxes)} bounding boxes for {num_speakers} speakers")
    if num_speakers == 1:
        return torch.ones(3, src_h, src_w)

    people = torch.zeros(2, src_h, src_w)
    if bboxes is None:
        top, bottom = int(src_h * face_scale), int(src_h * (1 - face_scale))
        half = src_w // 2
        # The right box is computed as int(offset + half) like the reference (not int(offset) + half).
        people[0, top:bottom, int(half * face_scale) : int(half * (1 - face_scale))] = 1
        people[1, top:bottom, int(half * face_scale + half) : int(half * (1 - face_scale) + half)] = 1
    else:
        for k, box in enumerate(bboxes):
            if len(box) != 4:
                raise ValueError(f"speaker {k + 1}: bounding box must be [x1, y1, x2, y2], got {box}")
            x1, x2 = (min(max(int(v), 0), src_w) for v in (box[0], box[2]))
            y1, y2 = (min(max(int(v), 0), src_h) for v in (box[1], box[3]))
            if x2 <= x1 or y2 <= y1:
                raise SpeakerRegionError(
                    k + 1,
                    f"speaker {k + 1}: bounding box {list(box)} holds no whole pixel of the {src_w}x{src_h} image "
                    "(boxes are [x1, y1, x2, y2] in its pixels, x = column, y = row)",
                )
            people[k, y1:y2, x1:x2] = 1
    background = (people.sum(0) == 0).float()
    return torch.cat([people, background[None]])


def video_masks(
    source_hw: tuple[int, int],
    speakers: int,
    bboxes: Sequence[Sequence[float]] | None,
    height: int,
    width: int,
    face_scale: float = 0.05,
) -> torch.Tensor:
    """The speakers' masks `[3, lat_h, lat_w]` for a `height` x `width` video made from a source of `source_hw`
    pixels: `speaker_masks` cropped as the image and brought to the latent grid by `latent_masks`. Raises
    `SpeakerRegionError` where a speaker's region is empty, so a caller can check boxes before any model work."""
    masks = speaker_masks(*source_hw, speakers, bboxes, face_scale)
    return latent_masks(masks, height, width, height // VAE_STRIDE[1], width // VAE_STRIDE[2], bboxes)


def latent_masks(
    masks: torch.Tensor,
    h: int,
    w: int,
    lat_h: int,
    lat_w: int,
    bboxes: Sequence[Sequence[float]] | None = None,
    patch_hw: tuple[int, int] = (2, 2),
) -> torch.Tensor:
    """Source-resolution masks `[3, H, W]` → `[3, lat_h, lat_w]` float 0/1 (crop as the image, nearest to latent).

    Raises ValueError if a speaker mask is empty at the DiT's token grid (`lat / patch_hw`): the reference would
    divide by zero there and produce NaN positions. `bboxes` only serves the error message.
    """
    cropped = resize_and_center_crop(masks.float(), h, w, "nearest")
    latent = (F.interpolate(cropped[None], size=(lat_h, lat_w), mode="nearest")[0] > 0).float()
    tokens = F.interpolate(latent[None], size=(lat_h // patch_hw[0], lat_w // patch_hw[1]), mode="nearest")[0]
    for k in range(masks.shape[0] - 1):
        if not tokens[k].any():
            box = f" (box {list(bboxes[k])})" if bboxes is not None and k < len(bboxes) else ""
            raise SpeakerRegionError(
                k + 1,
                f"speaker {k + 1} mask{box} is empty after the center crop of the {masks.shape[-1]}x{masks.shape[-2]} "
                f"image to {w}x{h}: the speaker must be inside the cropped frame",
            )
    return latent


def audio_window_index(start: int, frame_num: int, length: int, window: int = 5) -> torch.Tensor:
    """int64 `[frame_num, window]`: embedding frame used for pixel frame `start + f`, slot j (clamped to the audio)."""
    if window % 2 == 0:
        raise ValueError(f"audio window must be odd, got {window}")
    offsets = torch.arange(window) - window // 2
    centers = torch.arange(start, start + frame_num)
    return (centers[:, None] + offsets[None]).clamp(0, length - 1)


def audio_window(full_emb: torch.Tensor, start: int, frame_num: int, window: int = 5) -> torch.Tensor:
    """`[L, layers, ch]` wav2vec2 features → `[frame_num, window, layers, ch]` windows centred on each frame."""
    if full_emb.shape[0] == 0:
        raise ValueError("empty audio embedding")
    return full_emb[audio_window_index(start, frame_num, full_emb.shape[0], window)]


# sRGB (D65) <-> CIE Lab, with the constants of skimage.color (2-degree observer).
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels last `[..., 3]` → Lab (float64)."""
    rgb = rgb.double()
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.to(rgb.device).T / _WHITE_D65.to(rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab `[..., 3]` → sRGB clipped to [0, 1] (float64)."""
    lab = lab.double()
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([a / 500 + fy, fy, (fy - b / 200).clamp_min(0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE_D65.to(lab.device)
    linear = xyz @ torch.linalg.inv(_XYZ_FROM_RGB).to(lab.device).T
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0) ** (1 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0, 1)


def match_colors(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Match each frame's per-channel Lab mean/std to the reference image, blended with weight `strength`.

    `video` `[3, F, H, W]` and `reference` `[3, H', W']` in [-1, 1]; returns `[3, F, H, W]` in [-1, 1].
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"color correction strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return video
    frames = ((video.double().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)  # F, H, W, 3
    ref_lab = rgb_to_lab(((reference.double().permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    ref_mean, ref_std = ref_lab.mean(dim=(0, 1)), ref_lab.std(dim=(0, 1), correction=0)

    lab = rgb_to_lab(frames)
    mean = lab.mean(dim=(1, 2), keepdim=True)
    std = lab.std(dim=(1, 2), correction=0, keepdim=True)
    # A constant channel has nothing to rescale: it takes the reference mean.
    matched = torch.where(std == 0, ref_mean, (lab - mean) * (ref_std / std.where(std != 0, 1.0)) + ref_mean)
    corrected = lab_to_rgb(matched)
    blended = (1 - strength) * frames + strength * corrected
    return (blended * 2 - 1).permute(3, 0, 1, 2).to(video.dtype)
