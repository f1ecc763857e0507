"""What the gateway checks of an image before accepting it: a known format and a bounded pixel count,
both read from the header alone. Decoding pixels is the model server's work."""

from __future__ import annotations

import io
import warnings
from typing import IO

from PIL import Image, UnidentifiedImageError

from gateway.app.errors import Problem

CONTENT_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff"}
# PIL format names of those types (MPO is how PIL names many camera JPEGs).
FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


def check_image(data: bytes | IO[bytes], max_pixels: int) -> tuple[str, int, int]:
    """(content type, width, height) of an acceptable image, from its bytes or a file that reads only as far
    as the header needs; a 415 or 422 Problem otherwise."""
    if not data:
        raise Problem(415, "not_an_image", "the body is empty, not an image")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; and what PIL says of odd metadata as it reads a header is not
            # for our log: the header reads, or it raises.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
                image_format, (width, height) = image.format, image.size
    except Image.DecompressionBombError as exc:
        raise Problem(422, "too_many_pixels", f"the image is over the limit of {max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise Problem(415, "not_an_image", "cannot identify an image in the body") from exc
    if image_format not in FORMATS:
        supported = ", ".join(sorted(CONTENT_TYPES))
        raise Problem(
            415, "unsupported_image_type", f"{image_format} images are not supported; use {supported}"
        )
    if width * height > max_pixels:
        raise Problem(422, "too_many_pixels", f"{width}x{height} is over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise Problem(422, "invalid_image", f"the image has no pixels ({width}x{height})")
    return FORMATS[image_format], width, height
