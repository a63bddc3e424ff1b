"""The source picture: an image file as the RGB picture a viewer shows of it.

Three things a plain `convert("RGB")` gets wrong are put right, since each is common in what people upload: a phone
photo's EXIF orientation is applied (the people stand upright, and boxes are given in the pixels one sees);
transparency is laid over white, as a page shows it (dropping the alpha shows whatever colour the transparent pixels
hide, often black); and a 16-bit greyscale image is scaled to 8 bits (converting it clips all but the darkest
tones to white). Any other image reads exactly as `convert("RGB")` reads it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

PICTURE_HINT = "upload a PNG, JPEG or WebP"
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNG and TIFF open as one of these


class PictureInputError(ValueError):
    """An image input that cannot be used; the message names the input and says what to do."""


def read_picture(path: str | os.PathLike, name: str = "image") -> Image.Image:
    """`path` decoded whole (a truncated file fails here) as the upright RGB picture, transparency over white.
    A file that is no image raises `PictureInputError` naming `name`, without the server's path."""
    try:
        with Image.open(path) as opened:
            return as_shown(opened)
    except Exception as error:  # PIL raises many types for corrupt files
        detail = str(error).replace(repr(os.fspath(path)), "").replace(os.fspath(path), "").strip()
        raise PictureInputError(f"{name}: cannot read the file as an image ({detail}); {PICTURE_HINT}") from error


def as_shown(image: Image.Image) -> Image.Image:
    """`image` as RGB the way a viewer shows it: EXIF orientation applied, 16-bit grey scaled by 255/65535 (rounded),
    transparency composited over white."""
    image = ImageOps.exif_transpose(image)  # loads the pixels; a copy even where the orientation is upright
    if image.mode in WIDE_GREY_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257  # 65535 / 257 = 255
        image = Image.fromarray(np.rint(grey).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")
